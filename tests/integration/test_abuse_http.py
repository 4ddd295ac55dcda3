"""Abusive HTTP clients before any authentication: slow and endless bodies, huge bodies and headers, slowloris.

Each client here is a raw TCP socket (asyncio streams) so it can misbehave the
way an attacker does; chatd must answer with its JSON error shape or close the
connection within a bound, and its memory must not follow the attacker's bytes.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import psutil
import pytest

from tests.support import Chatd

pytestmark = pytest.mark.reliability

LOGIN = "/api/v1/auth/login"
BODY_TIMEOUT_S = 3.0
# RELIABILITY.md's bound: closed within the timeout plus this much (the server's timer granularity, a loaded box).
CLOSE_SLACK_S = 2.0
FAST = {"CHATD_SERVER_BODY_TIMEOUT_S": str(BODY_TIMEOUT_S), "CHATD_AUTH_AUTH_ATTEMPTS_PER_MIN": "100000"}


async def _open(server: Chatd) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", server.port)


def _head(path: str, extra: str = "", length: int | None = None, chunked: bool = False) -> bytes:
    size = f"Content-Length: {length}\r\n" if length is not None else ""
    te = "Transfer-Encoding: chunked\r\n" if chunked else ""
    return (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n{size}{te}{extra}\r\n"
    ).encode()


async def _response(reader: asyncio.StreamReader, timeout_s: float = 20) -> tuple[int, dict[str, Any] | bytes]:
    """Status and parsed JSON body of one response (or the raw bytes when it is not JSON)."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout_s)
    status = int(head.split(b" ", 2)[1])
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":", 1)[1])
    body = await asyncio.wait_for(reader.readexactly(length), timeout_s) if length else b""
    try:
        return status, json.loads(body)
    except ValueError:
        return status, body


async def _closed_within(reader: asyncio.StreamReader, timeout_s: float) -> float | None:
    """Seconds until the server closed the connection (EOF or reset), None if it did not within ``timeout_s``."""
    started = time.monotonic()
    try:
        while await asyncio.wait_for(reader.read(65536), timeout_s - (time.monotonic() - started)):
            pass
    except TimeoutError:
        return None
    except ConnectionError:
        pass
    return time.monotonic() - started


def _rss_mib(server: Chatd) -> float:
    assert server.proc is not None
    return float(psutil.Process(server.proc.pid).memory_info().rss) / 2**20


async def test_every_body_over_max_body_bytes_gets_a_json_413(chatd_factory: Any) -> None:
    server: Chatd = chatd_factory(**FAST)
    limit = 1024 * 1024
    for size in (limit + 1, 4 * limit + 1, 16 * limit):
        reader, writer = await _open(server)
        writer.write(_head(LOGIN, length=size))
        sent = 0
        block = b"x" * 65536
        while sent < size:  # the whole body, as an HTTP client does before it reads the answer
            writer.write(block[: size - sent])
            sent += min(len(block), size - sent)
            await writer.drain()
        status, body = await _response(reader)
        writer.close()
        assert (size, status) == (size, 413), body
        assert isinstance(body, dict) and body["error"]["code"] == "too_large", body
    # chunked, no Content-Length: the same cap and the same answer
    reader, writer = await _open(server)
    writer.write(_head(LOGIN, chunked=True))
    for _ in range(20):
        writer.write(b"10000\r\n" + b"y" * 0x10000 + b"\r\n")
    writer.write(b"0\r\n\r\n")
    await writer.drain()
    status, body = await _response(reader)
    writer.close()
    assert status == 413 and isinstance(body, dict) and body["error"]["code"] == "too_large", (status, body)


async def test_headers_over_the_limit_get_431(chatd_factory: Any) -> None:
    server: Chatd = chatd_factory(**FAST)
    reader, writer = await _open(server)
    writer.write(f"GET /health/live HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Junk: {'a' * 100_000}\r\n\r\n".encode())
    await writer.drain()
    try:
        status, body = await _response(reader)
    except (asyncio.IncompleteReadError, ConnectionError) as exc:
        pytest.fail(f"connection dropped instead of 431: {exc!r}")
    writer.close()
    assert status == 431, body
    assert isinstance(body, dict) and body["error"]["code"] == "headers_too_large", body


async def test_slow_and_endless_bodies_are_cut_at_the_body_timeout(chatd_factory: Any) -> None:
    """100 bodies at 1 byte/s and 100 endless chunked bodies: all closed within body_timeout_s (+ slack)."""
    server: Chatd = chatd_factory(**FAST)
    conns = [await _open(server) for _ in range(200)]
    for i, (_, writer) in enumerate(conns):
        writer.write(_head(LOGIN, length=1000) if i % 2 == 0 else _head(LOGIN, chunked=True))
    stop = asyncio.Event()

    async def trickle() -> None:
        while not stop.is_set():
            for i, (_, writer) in enumerate(conns):
                if not writer.is_closing():
                    writer.write(b"x" if i % 2 == 0 else b"1\r\nx\r\n")
            await asyncio.sleep(1)

    trickling = asyncio.ensure_future(trickle())
    closed = await asyncio.gather(*(_closed_within(reader, BODY_TIMEOUT_S + 10) for reader, _ in conns))
    stop.set()
    await trickling
    for _, writer in conns:
        writer.close()
    still_open = sum(1 for c in closed if c is None)
    assert still_open == 0, f"{still_open} of 200 slow bodies still open after {BODY_TIMEOUT_S + 10} s"
    slowest = max(c for c in closed if c is not None)
    print(f"200 slow bodies closed, the last after {slowest:.2f} s (body timeout {BODY_TIMEOUT_S} s)")
    assert slowest <= BODY_TIMEOUT_S + CLOSE_SLACK_S, f"a slow body stayed open {slowest:.1f} s"
    status, _ = await _get_live(server)
    assert status == 200


async def _get_live(server: Chatd) -> tuple[int, Any]:
    reader, writer = await _open(server)
    writer.write(b"GET /health/live HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    await writer.drain()
    try:
        return await _response(reader)
    finally:
        writer.close()


async def test_stalled_big_bodies_do_not_grow_memory(chatd_factory: Any) -> None:
    """50 clients each announce 4 MiB, send it, and stall before the end: nothing is buffered."""
    server: Chatd = chatd_factory(**{**FAST, "CHATD_SERVER_BODY_TIMEOUT_S": "30"})
    await _get_live(server)
    before = _rss_mib(server)
    size = 4 * 1024 * 1024
    conns = [await _open(server) for _ in range(50)]
    block = b"z" * 65536
    for _, writer in conns:
        writer.write(_head(LOGIN, length=size))
        for _ in range(size // len(block) - 1):  # all but the last 64 KiB
            writer.write(block)
        await writer.drain()
    await asyncio.sleep(1)
    grown = _rss_mib(server) - before
    for _, writer in conns:
        writer.close()
    print(f"RSS of the worker: {before:.0f} MiB, +{grown:.0f} MiB with 50 stalled 4 MiB bodies")
    assert grown < 40, f"worker RSS grew by {grown:.0f} MiB"


async def test_slowloris_headers_are_closed_within_idle_timeout(chatd_factory: Any) -> None:
    server: Chatd = chatd_factory(**FAST, CHATD_WS_IDLE_TIMEOUT_S="3")
    conns = [await _open(server) for _ in range(50)]
    for _, writer in conns:
        writer.write(b"GET /health/live HTTP/1.1\r\nHost: 127.0.0.1\r\n")
    stop = asyncio.Event()

    async def drip() -> None:
        while not stop.is_set():
            for _, writer in conns:
                if not writer.is_closing():
                    writer.write(b"X-a: b\r\n")
            await asyncio.sleep(1)

    dripping = asyncio.ensure_future(drip())
    closed = await asyncio.gather(*(_closed_within(reader, 3 + 10) for reader, _ in conns))
    stop.set()
    await dripping
    for _, writer in conns:
        writer.close()
    assert all(c is not None for c in closed), f"{sum(c is None for c in closed)} of 50 still open"
    slowest = max(c for c in closed if c is not None)
    print(f"50 slowloris heads closed, the last after {slowest:.2f} s (idle timeout 3 s)")
    assert slowest <= 3 + CLOSE_SLACK_S, f"a trickled head stayed open {slowest:.1f} s"
