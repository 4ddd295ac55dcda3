"""Attachments: the streamed upload (``POST /rooms/{id}/files``) and the ranged download (``/files/{id}``)."""

from __future__ import annotations

import json
import re
from typing import Any
from urllib.parse import quote

import tornado.web

from chatd.api.base import ApiHandler, RoomAccess, message_json
from chatd.api.openapi import STR, obj, op
from chatd.api.responses import Message
from chatd.core import errors
from chatd.services.files import MAX_CAPTION_CHARS, Files, Upload

# Bodies these routes stream and cap themselves (web.RequestLimits leaves them alone).
STREAMED_BODIES = (re.compile(r"^/api/v1/rooms/[^/]+/files$"),)


@tornado.web.stream_request_body
class FileUploadHandler(RoomAccess):
    """``POST /rooms/{id}/files``: the body is parsed as it arrives, into a temporary file on disk."""

    files: Files

    def initialize(self, files: Files, **deps: Any) -> None:  # type: ignore[override]
        super().initialize(**deps)
        self.files = files
        self.upload: Upload | None = None
        self.refused: errors.ChatdError | None = None

    async def prepare(self) -> None:  # type: ignore[override]
        super().prepare()
        if self.request.method != "POST":
            return
        self.upload_room = (await self._room(self.path_args[0]))[1]
        cap = self.config.files.max_bytes + 65536
        declared = self.request.headers.get("Content-Length")
        if declared is not None and declared.isdigit() and int(declared) > cap:
            raise errors.TooLarge(f"file over {self.config.files.max_bytes} bytes")  # refused before any byte
        # Tornado's own bound is looser (it refuses a chunk before reading it, with a bare 400): the exact
        # cap is Upload's, checked on every chunk as it arrives.
        self.request.connection.set_max_body_size(2 * cap)  # type: ignore[union-attr]
        self.upload = self.files.begin(self.request.headers.get("Content-Type", ""))

    def data_received(self, chunk: bytes) -> None:
        if self.refused is not None or self.upload is None:
            return
        try:
            self.upload.feed(chunk)
        except errors.ChatdError as err:
            # Answer now, mid-body: Tornado reads no more of it and closes the connection once the
            # response is written (the only way not to read the rest of a body).
            self.refused = err
            self.upload.discard()
            self._render_error(err)

    def on_connection_close(self) -> None:
        if self.upload is not None:
            self.upload.discard()
        super().on_connection_close()

    @op(
        summary="Attach a file: multipart (file + optional caption), streamed, sniffed; a message of kind file",
        tag="files",
        multipart=obj(
            {
                "file": {"type": "string", "contentMediaType": "application/octet-stream", "minLength": 1},
                "caption": {"type": "string", "maxLength": MAX_CAPTION_CHARS},
            },
            required=["file"],
        ),
        description="The type is sniffed from the bytes: one outside files.allowed_types is 415 unsupported_type; "
        "a file over files.max_bytes is 413 too_large.",
        responses={201: ("The file message", Message)},
    )
    async def post(self, room_id: str) -> None:
        principal = self.principal
        assert principal is not None and self.upload is not None
        if self.refused is not None:
            raise self.refused
        try:
            row = await self.files.complete(self.upload, self.upload_room["id"], principal.user_id)
        finally:
            self.upload.discard()
        self.send_json(message_json(row), 201)


_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """One byte range of ``Range`` as (start, end) inclusive; None for the whole file."""
    if not header:
        return None
    m = _RANGE.match(header.strip())
    if m is None or (not m.group(1) and not m.group(2)):
        return None  # multiple or malformed ranges: the whole file (RFC 9110 allows ignoring Range)
    if not m.group(1):
        n = int(m.group(2))
        if n == 0:
            raise errors.RangeNotSatisfiable(f"size {size}")
        return max(0, size - n), size - 1
    start = int(m.group(1))
    end = int(m.group(2)) if m.group(2) else size - 1
    if start >= size or end < start:
        raise errors.RangeNotSatisfiable(f"size {size}")
    return start, min(end, size - 1)


class FileHandler(ApiHandler):
    files: Files

    def initialize(self, files: Files, **deps: Any) -> None:  # type: ignore[override]
        super().initialize(**deps)
        self.files = files

    @op(
        summary="Download an attachment (members of its room only; Range supported)",
        tag="files",
        content_type="*/*",  # the file's own (sniffed) type
        responses={200: ("The file", STR), 206: ("Part of the file", STR)},
    )
    async def get(self, file_id: str) -> None:
        principal = await self.auth()
        row = await self.files.for_member(self.path_id(file_id, "file"), principal.user_id)
        size = int(row["size"])
        try:
            wanted = parse_range(self.request.headers.get("Range"), size)
        except errors.RangeNotSatisfiable as err:
            self.set_status(416)
            self.set_header("Content-Range", f"bytes */{size}")
            self.finish(json.dumps({"error": err.to_dict()}))
            return
        start, end = wanted if wanted is not None else (0, size - 1)
        inline = self.files.inline(row["content_type"])
        name = row["name"]
        fallback = "".join(c if c.isascii() and c.isprintable() and c not in '"\\' else "_" for c in name)
        self.set_header("Content-Type", row["content_type"])
        self.set_header(
            "Content-Disposition",
            f"{'inline' if inline else 'attachment'}; filename=\"{fallback}\"; filename*=UTF-8''{quote(name)}",
        )
        self.set_header("Content-Security-Policy", "sandbox; default-src 'none'; frame-ancestors 'none'")
        self.set_header("Cache-Control", "private, max-age=3600")
        self.set_header("Accept-Ranges", "bytes")
        self.set_header("ETag", f'"{row["sha256"]}"')
        self.set_header("Content-Length", str(end - start + 1))
        if wanted is not None:
            self.set_status(206)
            self.set_header("Content-Range", f"bytes {start}-{end}/{size}")
        async for chunk in self.files.storage.read(row["storage_key"], start, end):
            self.write(chunk)
            await self.flush()
        self.finish()
