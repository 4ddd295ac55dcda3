"""Issue 11: attachments — streamed upload, cap enforced while streaming, sniffed type, Range, storage backends."""

from __future__ import annotations

import asyncio
import hashlib
import os
import select
import socket
import struct
import subprocess
import sys
import time
import uuid
import zlib
from pathlib import Path
from typing import Any

import psycopg
import pytest

from tests.chat import API, connect, join, make_room
from tests.openapi_check import Api, contract_for
from tests.support import free_port
from tests.users import make_users

CAP = 1_048_576


def png(width: int, height: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    raw = b"".join(b"\x00" + bytes([x % 256, 0, 0] * width) for x in range(height))
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(raw))
        + chunk(b"IEND", b"")
    )


def multipart(content: bytes, filename: str, declared_type: str, caption: str | None = None) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    parts = []
    if caption is not None:
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="caption"\r\n\r\n{caption}\r\n'.encode())
    parts.append(
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{filename}"\r\n'
        f"Content-Type: {declared_type}\r\n\r\n".encode()
        + content
        + b"\r\n"
    )
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


async def upload(
    call: Api, room: int, token: str, content: bytes, name: str, ctype: str, caption: str | None = None
) -> Any:
    body, header = multipart(content, name, ctype, caption)
    return await call("POST", f"{API}/rooms/{room}/files", token=token, raw_body=body, headers={"Content-Type": header})


async def round_trip(server: Any, services: Any, blobs: Any) -> None:
    """Upload, fan-out, download with Range, refusals, delete and sweep: ``blobs()`` lists stored blob keys."""
    call = Api(server.http, await contract_for(server.http))
    owner, member, outsider = make_users(services.database_url, 3)
    room = await make_room(server, owner, [member])
    ws = await connect(server, member)
    await join(ws, room)

    image = png(7, 5)
    r = await upload(call, room, owner.token, image, "../../etc/사진.png", "application/octet-stream", "look 👀")
    assert r.status == 201, r.body
    data = r.body["data"]
    assert r.body["kind"] == "file" and r.body["content"] == "look 👀" and r.body["seq"] == 1
    assert data["content_type"] == "image/png" and data["size"] == len(image)
    assert data["sha256"] == hashlib.sha256(image).hexdigest()
    assert (data["width"], data["height"]) == (7, 5) and data["name"] == "사진.png"
    live = await ws.expect("message", room_id=room, kind="file")
    assert live["data"] == data and live["seq"] == 1
    assert len(blobs()) == 1

    url = f"{API}/files/{data['file_id']}"
    got = await call("GET", url, token=member.token)
    assert got.status == 200 and got.body == image
    assert got.headers["Content-Type"] == "image/png"
    assert got.headers["Content-Disposition"].startswith("inline;")
    assert "filename*=UTF-8''%EC%82%AC%EC%A7%84.png" in got.headers["Content-Disposition"]
    assert got.headers["X-Content-Type-Options"] == "nosniff"
    assert got.headers["Content-Security-Policy"].startswith("sandbox")
    part = await call("GET", url, token=member.token, headers={"Range": "bytes=8-15"})
    assert part.status == 206 and part.body == image[8:16]
    assert part.headers["Content-Range"] == f"bytes 8-15/{len(image)}"
    tail = await call("GET", url, token=member.token, headers={"Range": "bytes=-4"})
    assert tail.status == 206 and tail.body == image[-4:]
    bad = await call("GET", url, token=member.token, headers={"Range": f"bytes={len(image)}-"})
    assert bad.status == 416 and bad.headers["Content-Range"] == f"bytes */{len(image)}"
    # not a member: 404 like a file that does not exist; no upload either
    assert (await call("GET", url, token=outsider.token)).status == 404
    assert (await upload(call, room, outsider.token, image, "x.png", "image/png")).status == 404

    # anything but allowlisted images is an attachment, never inline
    text = await upload(call, room, owner.token, b"<b>plain</b> words\n" * 10, "notes.txt", "text/html")
    assert text.status == 201 and text.body["data"]["content_type"] == "text/plain"
    got = await call("GET", f"{API}/files/{text.body['data']['file_id']}", token=member.token)
    assert got.headers["Content-Disposition"].startswith("attachment;")

    # spoofed type: HTML sent as image/png is refused, nothing kept
    spoof = await upload(call, room, owner.token, b"<html><script>alert(1)</script></html>", "a.png", "image/png")
    assert spoof.status == 415 and spoof.body["error"]["code"] == "unsupported_type"
    exe = await upload(call, room, owner.token, b"MZ\x90\x00" + os.urandom(4000), "a.pdf", "application/pdf")
    assert exe.status == 415
    assert len(blobs()) == 2

    # deleting the message deletes its file: 404 at once, blob swept
    owner_ws = await connect(server, owner)
    await owner_ws.send({"type": "delete", "id": "d1", "message_id": r.body["message_id"]})
    await ws.expect("message_deleted", message_id=r.body["message_id"])
    assert (await call("GET", url, token=member.token)).status == 404

    def purged_at() -> Any:
        with psycopg.connect(services.database_url) as conn:
            row = conn.execute("SELECT purged_at FROM files WHERE id = %s", (data["file_id"],)).fetchone()
        assert row is not None
        return row[0]

    # The sweeper deletes the blob, then marks the row purged (a crash between leaves a row to sweep again,
    # never a blob nobody knows of): both are polled, a poll between the two steps is no failure.
    deadline = time.monotonic() + 15
    while (len(blobs()) != 1 or purged_at() is None) and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
    assert len(blobs()) == 1
    assert purged_at() is not None


@pytest.mark.smoke
async def test_local_storage_round_trip(chatd_factory: Any, services: Any, tmp_path: Path) -> None:
    root = tmp_path / "files"
    server = chatd_factory(
        CHATD_FILES_LOCAL_DIR=str(root), CHATD_FILES_MAX_BYTES=str(CAP), CHATD_FILES_SWEEP_INTERVAL_S="1"
    )
    await round_trip(
        server, services, lambda: [p for p in root.rglob("*") if p.is_file() and ".uploads" not in p.parts]
    )
    assert not list((root / ".uploads").iterdir())  # no temporary file left behind


async def test_upload_over_the_cap_stops_early(chatd_factory: Any, services: Any, tmp_path: Path) -> None:
    server = chatd_factory(CHATD_FILES_LOCAL_DIR=str(tmp_path / "files"), CHATD_FILES_MAX_BYTES=str(CAP))
    owner = make_users(services.database_url, 1)[0]
    room = await make_room(server, owner, [])
    total = 64 * CAP  # what the client would send: 64 MiB
    boundary = "b0undary"
    head = (
        f"POST {API}/rooms/{room}/files HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {owner.token}\r\n"
        f"Content-Type: multipart/form-data; boundary={boundary}\r\nTransfer-Encoding: chunked\r\n\r\n"
    ).encode()
    part = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="big.png"\r\n'
        "Content-Type: image/png\r\n\r\n"
    ).encode() + png(4, 4)
    sent_at_answer, answer = await asyncio.to_thread(_stream_until_answered, server.port, head, part, total)
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert b'"code":"too_large"' in answer
    # Stopped well before the end: within the cap plus what the kernels' socket buffers hold.
    assert sent_at_answer < total // 8, sent_at_answer  # < 8 MiB of 64

    # A declared Content-Length over the cap is refused before any byte of the body is read.
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(head.replace(b"Transfer-Encoding: chunked", f"Content-Length: {total}".encode()))
    await writer.drain()
    answer = await asyncio.wait_for(reader.read(65536), 10)
    writer.close()
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]


def _stream_until_answered(port: int, head: bytes, part: bytes, total: int) -> tuple[int, bytes]:
    """Send a chunked body of ``total`` bytes, looking for the answer after every chunk; (bytes sent, answer)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(head + f"{len(part):x}\r\n".encode() + part + b"\r\n")
    sent, block = len(part), b"\x00" * 65536
    try:
        while sent < total:
            if select.select([sock], [], [], 0)[0]:
                break  # the server answered mid-body
            sock.sendall(f"{len(block):x}\r\n".encode() + block + b"\r\n")
            sent += len(block)
    except OSError:
        pass  # reset mid-body: what was answered before is still readable
    answer = b""
    try:
        while not answer.endswith(b"}"):
            data = sock.recv(65536)
            if not data:
                break
            answer += data
    except OSError:
        pass
    sock.close()
    return sent, answer


@pytest.fixture
def s3_server(tmp_path: Path) -> Any:
    port = free_port()
    log = (tmp_path / "moto.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], stdout=log, stderr=log
    )
    import boto3

    client = boto3.client(
        "s3",
        endpoint_url=f"http://127.0.0.1:{port}",
        region_name="us-east-1",
        aws_access_key_id="test",
        aws_secret_access_key="test",
    )
    deadline = time.monotonic() + 30
    while True:
        try:
            client.create_bucket(Bucket="chatd-test")
            break
        except Exception:
            if time.monotonic() > deadline or proc.poll() is not None:
                raise
            time.sleep(0.2)
    yield port, client
    proc.terminate()
    proc.wait(10)


async def test_s3_storage_round_trip(chatd_factory: Any, services: Any, s3_server: Any) -> None:
    port, client = s3_server
    server = chatd_factory(
        CHATD_FILES_BACKEND="s3",
        CHATD_FILES_S3_ENDPOINT_URL=f"http://127.0.0.1:{port}",
        CHATD_FILES_S3_BUCKET="chatd-test",
        CHATD_FILES_S3_ACCESS_KEY_ID="test",
        CHATD_FILES_S3_SECRET_ACCESS_KEY="test",
        CHATD_FILES_MAX_BYTES=str(CAP),
        CHATD_FILES_SWEEP_INTERVAL_S="1",
    )

    def blobs() -> list[str]:
        listed = client.list_objects_v2(Bucket="chatd-test", Prefix="chatd/")
        return [o["Key"] for o in listed.get("Contents", [])]

    await round_trip(server, services, blobs)
