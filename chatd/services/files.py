"""Attachments: blob storage behind a small interface, the streaming upload, the sweeper.

* ``Storage``: ``put`` (a finished temporary file), ``read`` (a byte range, in
  chunks), ``delete``.  ``LocalStorage`` keeps blobs in a directory (default
  ``<data_dir>/files``); ``S3Storage`` in an S3-compatible bucket (boto3,
  run in threads: its calls block).
* ``Upload``: one multipart upload fed chunk by chunk (python-multipart's
  streaming parser) into a temporary file on disk, never whole in memory:
  the size cap is checked on every chunk (``TooLarge`` at once), the type is
  sniffed from the first bytes (puremagic) against the allowlist
  (``UnsupportedType`` as soon as it is known), sha256 as it streams, image
  size from the header (imagesize).
* ``Files``: the service the handlers use (finish an upload: store the blob,
  the row, and the ``file`` message through the group commit) and the sweep
  loop (blobs of deleted messages and of uploads never attached).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import secrets
import tempfile
import unicodedata
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, Protocol

import imagesize
import puremagic
from python_multipart.multipart import MultipartParser, parse_options_header

from chatd.core import errors
from chatd.process.config import FileSettings, Settings
from chatd.process.logs import app_log, fields
from chatd.realtime.writer import MessageWriter
from chatd.services.content_rules import ContentRules
from chatd.storage import files as files_db
from chatd.storage.db import Database
from chatd.storage.messages import PendingMessage

SNIFF_BYTES = 8192  # enough for every magic number puremagic knows of the allowed types
CHUNK = 65536
MAX_CAPTION_CHARS = 4000
MAX_NAME_CHARS = 255


class Storage(Protocol):
    name: str

    async def put(self, key: str, source: Path, content_type: str) -> None: ...

    def read(self, key: str, start: int, end: int) -> AsyncIterator[bytes]:
        """Bytes ``start..end`` (inclusive) in chunks."""
        ...

    async def delete(self, key: str) -> None: ...


class LocalStorage:
    name = "local"

    def __init__(self, root: Path) -> None:
        self.root = root

    def _path(self, key: str) -> Path:
        path = (self.root / key).resolve()
        if self.root.resolve() not in path.parents:
            raise errors.Internal("bad storage key")
        return path

    async def put(self, key: str, source: Path, content_type: str) -> None:
        target = self._path(key)
        await asyncio.to_thread(_move, source, target)

    async def read(self, key: str, start: int, end: int) -> AsyncIterator[bytes]:
        try:
            fh = await asyncio.to_thread(open, self._path(key), "rb")
        except FileNotFoundError:
            raise errors.NotFound("file not found") from None
        try:
            await asyncio.to_thread(fh.seek, start)
            left = end - start + 1
            while left > 0:
                data = await asyncio.to_thread(fh.read, min(CHUNK, left))
                if not data:
                    break
                left -= len(data)
                yield data
        finally:
            fh.close()

    async def delete(self, key: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            await asyncio.to_thread(os.unlink, self._path(key))


def _move(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    os.replace(source, target)  # same filesystem (the temp dir is under the storage root): atomic


class S3Storage:
    name = "s3"

    def __init__(self, settings: FileSettings) -> None:
        import boto3  # imported only when configured: boto3 takes a while to load

        self.bucket = settings.s3_bucket
        self.prefix = settings.s3_prefix
        self.client = boto3.client(
            "s3",
            endpoint_url=settings.s3_endpoint_url or None,
            region_name=settings.s3_region,
            aws_access_key_id=settings.s3_access_key_id or None,
            aws_secret_access_key=settings.s3_secret_access_key or None,
        )

    async def put(self, key: str, source: Path, content_type: str) -> None:
        try:
            # upload_file streams from disk (multipart above 8 MiB); the temp file is removed after.
            await asyncio.to_thread(
                self.client.upload_file,
                str(source),
                self.bucket,
                self.prefix + key,
                ExtraArgs={"ContentType": content_type},
            )
        except Exception as exc:
            app_log.warning("s3_put_failed", extra=fields(error=repr(exc)[:300]))
            raise errors.Unavailable("file storage unavailable, try again") from None
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(source)

    async def read(self, key: str, start: int, end: int) -> AsyncIterator[bytes]:
        try:
            obj = await asyncio.to_thread(
                self.client.get_object, Bucket=self.bucket, Key=self.prefix + key, Range=f"bytes={start}-{end}"
            )
        except Exception as exc:
            app_log.warning("s3_get_failed", extra=fields(error=repr(exc)[:300]))
            raise errors.Unavailable("file storage unavailable, try again") from None
        body = obj["Body"]
        try:
            while True:
                data = await asyncio.to_thread(body.read, CHUNK)
                if not data:
                    break
                yield data
        finally:
            body.close()

    async def delete(self, key: str) -> None:
        try:
            await asyncio.to_thread(self.client.delete_object, Bucket=self.bucket, Key=self.prefix + key)
        except Exception as exc:
            app_log.warning("s3_delete_failed", extra=fields(error=repr(exc)[:300]))
            raise errors.Unavailable("file storage unavailable") from None


def make_storage(settings: Settings) -> Storage:
    files = settings.files
    if files.backend == "s3":
        return S3Storage(files)
    root = Path(files.local_dir or os.path.join(settings.storage.data_dir, "files"))
    return LocalStorage(root)


def sniff(head: bytes) -> str | None:
    """The content type of a file from its first bytes; plain UTF-8 text without NULs is text/plain."""
    if not head:
        return None
    try:
        mime = puremagic.from_string(head, mime=True)
    except puremagic.PureError:
        mime = ""
    if mime:
        return str(mime)
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as exc:
        if exc.start < len(head) - 4:  # not merely a character cut at the end of the sniffed bytes
            return None
    return "text/plain" if b"\x00" not in head else None


def clean_name(raw: str | None) -> str:
    """A display/download name: no path, no control characters, bounded."""
    name = (raw or "").replace("\\", "/").rsplit("/", 1)[-1]
    name = "".join(ch for ch in name if unicodedata.category(ch)[0] != "C").strip()
    return name[:MAX_NAME_CHARS] or "file"


class Upload:
    """One ``multipart/form-data`` body (parts ``file`` and optional ``caption``), fed as it arrives."""

    def __init__(self, content_type_header: str, settings: FileSettings, tmp_dir: Path) -> None:
        ctype, options = parse_options_header(content_type_header)
        boundary = options.get(b"boundary")
        if ctype != b"multipart/form-data" or not boundary:
            raise errors.BadRequest("body must be multipart/form-data with a boundary")
        self.max_bytes = settings.max_bytes
        self.allowed = set(settings.allowed_types)
        self.tmp_dir = tmp_dir
        self.size = 0
        self.received = 0  # body bytes read, all parts
        self.sha256 = hashlib.sha256()
        self.head = bytearray()
        self.content_type: str | None = None
        self.name: str | None = None
        self.caption: bytearray | None = None
        self.path: Path | None = None
        self._fh: Any = None
        self._part: str | None = None
        self._header_field = bytearray()
        self._header_value = bytearray()
        self._headers: dict[str, bytes] = {}
        self._error: errors.ChatdError | None = None
        self.files = 0
        self.parser = MultipartParser(
            boundary,
            {
                "on_part_begin": self._part_begin,
                "on_header_field": lambda d, s, e: self._header_field.extend(d[s:e]),
                "on_header_value": lambda d, s, e: self._header_value.extend(d[s:e]),
                "on_header_end": self._header_end,
                "on_headers_finished": self._headers_finished,
                "on_part_data": self._part_data,
                "on_part_end": self._part_end,
            },
        )

    # -- parser callbacks --------------------------------------------------------------

    def _part_begin(self) -> None:
        self._headers = {}
        self._part = None

    def _header_end(self) -> None:
        # Raw bytes: browsers send UTF-8 file names in the header
        self._headers[bytes(self._header_field).decode("latin-1").lower()] = bytes(self._header_value)
        self._header_field.clear()
        self._header_value.clear()

    def _headers_finished(self) -> None:
        _, options = parse_options_header(self._headers.get("content-disposition", b""))
        field_name = options.get(b"name", b"").decode("utf-8", "replace")
        if field_name == "file":
            self.files += 1
            if self.files > 1:
                self._fail(errors.BadRequest("one file per upload"))
                return
            self._part = "file"
            self.name = clean_name(options.get(b"filename", b"").decode("utf-8", "replace"))
            fd, path = tempfile.mkstemp(prefix="upload-", dir=self.tmp_dir)
            self.path = Path(path)
            self._fh = os.fdopen(fd, "wb")
        elif field_name == "caption":
            self._part = "caption"
            self.caption = bytearray()
        else:
            self._part = None  # unknown parts are ignored (bounded by the body cap)

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        if self._error is not None:
            return
        chunk = data[start:end]
        if self._part == "file":
            self.size += len(chunk)
            if self.size > self.max_bytes:
                self._fail(errors.TooLarge(f"file over {self.max_bytes} bytes"))
                return
            self.sha256.update(chunk)
            if self.content_type is None:
                self.head.extend(chunk[: SNIFF_BYTES - len(self.head)])
                if len(self.head) >= SNIFF_BYTES:
                    self._decide_type()
            self._fh.write(chunk)
        elif self._part == "caption" and self.caption is not None:
            self.caption.extend(chunk)
            if len(self.caption) > MAX_CAPTION_CHARS * 4:
                self._fail(errors.TooLarge(f"caption over {MAX_CAPTION_CHARS} characters"))

    def _part_end(self) -> None:
        if self._part == "file" and self._fh is not None:
            self._fh.close()
            self._fh = None
            if self.content_type is None and self._error is None:
                self._decide_type()
        self._part = None

    def _decide_type(self) -> None:
        mime = sniff(bytes(self.head))
        if mime is None or mime not in self.allowed:
            self._fail(errors.UnsupportedType(f"content type {mime or 'unknown'} is not allowed"))
            return
        self.content_type = mime

    def _fail(self, err: errors.ChatdError) -> None:
        if self._error is None:
            self._error = err

    # -- driving -----------------------------------------------------------------------

    def feed(self, chunk: bytes) -> None:
        """Parse a chunk of the body; raises the first error (too large, type refused) at once."""
        self.received += len(chunk)
        if self.received > self.max_bytes + 65536:  # the file plus a bounded envelope (caption, headers)
            self._fail(errors.TooLarge(f"file over {self.max_bytes} bytes"))
        if self._error is None:
            try:
                self.parser.write(chunk)
            except Exception as exc:  # python-multipart raises its own errors on a malformed body
                self._fail(errors.BadRequest(f"malformed multipart body: {str(exc)[:100]}"))
        if self._error is not None:
            raise self._error

    def finish(self) -> None:
        self.parser.finalize()
        if self._error is not None:
            raise self._error
        if self.path is None or self._fh is not None:
            raise errors.BadRequest("a part named file is required")
        if self.size == 0:
            raise errors.BadRequest("the file is empty")
        if self.content_type is None:
            raise errors.UnsupportedType("content type unknown")

    def caption_text(self) -> str:
        if self.caption is None:
            return ""
        try:
            text = self.caption.decode("utf-8")
        except UnicodeDecodeError:
            raise errors.BadRequest("caption must be UTF-8") from None
        if len(text) > MAX_CAPTION_CHARS:
            raise errors.TooLarge(f"caption over {MAX_CAPTION_CHARS} characters")
        return text

    def discard(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        if self.path is not None:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()


class Files:
    def __init__(self, db: Database, writer: MessageWriter, storage: Storage, settings: Settings) -> None:
        self.db = db
        self.writer = writer
        self.storage = storage
        self.settings = settings.files
        # Temporary files next to the local blobs (one rename to store), else in data_dir.
        base = storage.root if isinstance(storage, LocalStorage) else Path(settings.storage.data_dir)
        self.tmp_dir = base / ".uploads"
        self.content_rules: ContentRules | None = None  # a caption follows the send's content rules

    def begin(self, content_type_header: str) -> Upload:
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        return Upload(content_type_header, self.settings, self.tmp_dir)

    async def complete(self, upload: Upload, room_id: int, user_id: int) -> dict[str, Any]:
        """Store the blob and its row, then commit the ``file`` message (seq, ack, fan-out like any message)."""
        upload.finish()
        caption = upload.caption_text()
        flagged: tuple[int, ...] = ()
        if caption and self.content_rules is not None and not self.content_rules.current.empty:
            screened = self.content_rules.screen(caption)  # blocked: before the blob is kept
            caption, flagged = screened.content, screened.flagged
        assert upload.path is not None and upload.content_type is not None and upload.name is not None
        width = height = None
        if upload.content_type.startswith("image/"):
            w, h = await asyncio.to_thread(imagesize.get, str(upload.path))
            if w > 0 and h > 0:
                width, height = int(w), int(h)
        key = f"{room_id}/{secrets.token_hex(16)}"
        sha = upload.sha256.hexdigest()
        await self.storage.put(key, upload.path, upload.content_type)
        try:
            row = await files_db.create_file(
                self.db,
                room_id=room_id,
                uploader_id=user_id,
                storage_key=key,
                name=upload.name,
                content_type=upload.content_type,
                size=upload.size,
                sha256=sha,
                width=width,
                height=height,
            )
        except BaseException:
            await self._forget_blob(key)
            raise
        data = {
            "file_id": row["id"],
            "name": upload.name,
            "content_type": upload.content_type,
            "size": upload.size,
            "sha256": sha,
            "width": width,
            "height": height,
        }
        pending = PendingMessage(room_id, user_id, "user", "file", caption, None, data=data, file_id=row["id"])
        try:
            result = await self.writer.submit(pending)
        except BaseException:
            await self._forget(row)
            raise
        if result.error is not None:  # not a member, archived: the blob and row go
            await self._forget(row)
            raise result.error
        assert result.row is not None
        if flagged and self.content_rules is not None and not result.duplicate:
            await self.content_rules.flag(int(result.row["id"]), flagged)
        return result.row

    async def _forget(self, row: dict[str, Any]) -> None:
        await self._forget_blob(row["storage_key"])
        with contextlib.suppress(errors.ChatdError):
            await files_db.forget_file(self.db, row["id"])

    async def _forget_blob(self, key: str) -> None:
        try:
            await self.storage.delete(key)
        except errors.ChatdError:
            pass  # the row stays unattached: the sweeper removes it later

    async def for_member(self, file_id: int, user_id: int) -> dict[str, Any]:
        row = await files_db.file_for_member(self.db, file_id, user_id)
        if row is None:
            raise errors.NotFound("file not found")
        return row

    def inline(self, content_type: str) -> bool:
        return content_type in self.settings.inline_types

    async def sweep_once(self) -> int:
        rows = await files_db.files_to_sweep(self.db, self.settings.orphan_after_s, 100)
        done = []
        for row in rows:
            try:
                await self.storage.delete(row["storage_key"])
            except errors.ChatdError:
                continue  # tried again next round
            done.append(row["id"])
        if done:
            await files_db.mark_files_purged(self.db, done)
            app_log.info("files_swept", extra=fields(count=len(done)))
        return len(done)

    async def run_sweeper(self) -> None:
        """The sweep loop (a supervised task): every worker; deletes are idempotent."""
        while True:
            await asyncio.sleep(self.settings.sweep_interval_s)
            try:
                await self.sweep_once()
            except errors.Unavailable:
                pass  # Postgres down: next round
