"""A lean asyncio WebSocket client for load generation (RFC 6455, client side only).

Why not a library: a load generator that must hold 20,000 sockets and parse
tens of thousands of frames per second on ONE core cannot afford a task and a
queue per socket.  This is an ``asyncio.Protocol``: the event loop calls
``data_received`` and the frame parser calls ``on_text(payload)`` directly.

Deliberate shortcuts, fine against a server on loopback:

* client frames are masked with the all-zero key (RFC 6455 5.3 requires the
  mask bit and a key; a zero key makes XOR a no-op and costs nothing);
* ``Sec-WebSocket-Accept`` is not verified (the status line 101 is);
* no fragmentation, no extensions (the servers under test send whole text
  frames and compression is off).

Server pings are answered with pongs, so idle connections survive the
server's heartbeat.  Sockets are opened by hand so that they can be bound to
a chosen loopback source address (``127.0.0.2`` ...) with
``IP_BIND_ADDRESS_NO_PORT``: each source address has its own ephemeral port
range, so more than ~28,000 connections to one server port are possible.
"""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import Callable, Mapping
from typing import cast

IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)

OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA
_ZERO_MASK = b"\x00\x00\x00\x00"
_KEY = "dGhlIHNhbXBsZSBub25jZQ=="  # any 16 bytes base64; the server does not care


class HandshakeError(ConnectionError):
    def __init__(self, status: int, body: str) -> None:
        super().__init__(f"HTTP {status}: {body[:200]}")
        self.status = status


def client_frame(payload: bytes, opcode: int = OP_TEXT) -> bytes:
    """A complete masked (zero key) client frame."""
    n = len(payload)
    if n < 126:
        header = struct.pack("!BB", 0x80 | opcode, 0x80 | n)
    elif n <= 0xFFFF:
        header = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, n)
    else:
        header = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, n)
    return header + _ZERO_MASK + payload


class WSProtocol(asyncio.Protocol):
    """Handshake + frame parsing.  Subclasses implement ``on_text`` (and may override ``on_open``)."""

    def __init__(self, host: str, path: str, headers: Mapping[str, str] | None = None) -> None:
        self._request = self._build_request(host, path, headers or {})
        self.transport: asyncio.Transport | None = None
        self._buf = bytearray()
        self._upgraded = False
        self.closed = False
        self.close_code: int | None = None
        self.close_reason = ""
        loop = asyncio.get_running_loop()
        self.upgraded: asyncio.Future[None] = loop.create_future()  # 101 received
        self.lost: asyncio.Future[None] = loop.create_future()  # connection gone

    @staticmethod
    def _build_request(host: str, path: str, headers: Mapping[str, str]) -> bytes:
        lines = [
            f"GET {path} HTTP/1.1",
            f"Host: {host}",
            "Upgrade: websocket",
            "Connection: Upgrade",
            f"Sec-WebSocket-Key: {_KEY}",
            "Sec-WebSocket-Version: 13",
            *(f"{k}: {v}" for k, v in headers.items()),
            "",
            "",
        ]
        return "\r\n".join(lines).encode()

    # -- asyncio.Protocol -------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream connection's transport: uvloop's implements asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)
        self.transport.write(self._request)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if not self.upgraded.done():
            self.upgraded.set_exception(exc or ConnectionError("closed during handshake"))
        if not self.lost.done():
            self.lost.set_result(None)
        self.on_close()

    def data_received(self, data: bytes) -> None:
        if not self._upgraded:
            self._buf += data
            end = self._buf.find(b"\r\n\r\n")
            if end < 0:
                if len(self._buf) > 65536:
                    self._fail_handshake(0, "response head too large")
                return
            head = bytes(self._buf[:end]).decode("latin-1")
            rest = bytes(self._buf[end + 4 :])
            self._buf.clear()
            try:
                status = int(head.split(" ", 2)[1])
            except (IndexError, ValueError):
                status = 0
            if status != 101:
                self._fail_handshake(status, rest.decode(errors="replace") or head)
                return
            self._upgraded = True
            if not self.upgraded.done():
                self.upgraded.set_result(None)
            self.on_open()
            if not rest:
                return
            data = rest
        buf = self._buf
        if buf:
            buf += data
            data = bytes(buf)
            buf.clear()
        n = len(data)
        pos = 0
        while n - pos >= 2:
            b0 = data[pos]
            ln = data[pos + 1] & 0x7F
            hl = 2
            if ln == 126:
                if n - pos < 4:
                    break
                ln = (data[pos + 2] << 8) | data[pos + 3]
                hl = 4
            elif ln == 127:
                if n - pos < 10:
                    break
                ln = int.from_bytes(data[pos + 2 : pos + 10], "big")
                hl = 10
            end = pos + hl + ln
            if end > n:
                break
            op = b0 & 0x0F
            payload = data[pos + hl : end]
            pos = end
            if op == OP_TEXT:
                self.on_text(payload)
            elif op == OP_PING:
                self._write(client_frame(payload, OP_PONG))
            elif op == OP_CLOSE:
                self._on_close_frame(payload)
                return
            # binary, continuation and pong frames are ignored
        if pos < n:
            buf += data[pos:]

    # -- helpers ----------------------------------------------------------------

    def _fail_handshake(self, status: int, body: str) -> None:
        if not self.upgraded.done():
            self.upgraded.set_exception(HandshakeError(status, body))
        if self.transport is not None:
            self.transport.close()

    def _on_close_frame(self, payload: bytes) -> None:
        if len(payload) >= 2:
            self.close_code = (payload[0] << 8) | payload[1]
            self.close_reason = payload[2:].decode(errors="replace")
        else:
            self.close_code = 1005
        self._write(client_frame(payload[:2], OP_CLOSE))
        if self.transport is not None:
            self.transport.close()

    def _write(self, data: bytes) -> None:
        if self.transport is not None and not self.closed and not self.transport.is_closing():
            self.transport.write(data)

    def send_text(self, payload: bytes) -> None:
        self._write(client_frame(payload))

    def close(self, code: int = 1000) -> None:
        """Send a close frame and drop the connection (no wait for the echo: load tests end fast)."""
        if self.transport is not None and not self.transport.is_closing():
            self._write(client_frame(struct.pack("!H", code), OP_CLOSE))
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    # -- for subclasses -----------------------------------------------------------

    def on_open(self) -> None:
        """The 101 arrived."""

    def on_text(self, payload: bytes) -> None:
        """One complete text message."""

    def on_close(self) -> None:
        """The TCP connection is gone."""


async def open_socket(
    host: str, port: int, local_ip: str | None = None, timeout_s: float = 10.0
) -> socket.socket:
    """A connected non-blocking TCP socket, bound to ``local_ip`` when given."""
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if local_ip:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
            except OSError:
                pass
            sock.bind((local_ip, 0))
        await asyncio.wait_for(loop.sock_connect(sock, (host, port)), timeout_s)
    except BaseException:
        sock.close()
        raise
    return sock


async def connect(
    factory: Callable[[], WSProtocol],
    host: str,
    port: int,
    *,
    local_ip: str | None = None,
    timeout_s: float = 10.0,
) -> WSProtocol:
    """Open a socket, run ``factory()`` (a WSProtocol) on it, and wait for the 101."""
    loop = asyncio.get_running_loop()
    sock = await open_socket(host, port, local_ip, timeout_s)
    try:
        _, proto = await loop.create_connection(factory, sock=sock)
    except BaseException:
        sock.close()
        raise
    assert isinstance(proto, WSProtocol)
    try:
        await asyncio.wait_for(asyncio.shield(proto.upgraded), timeout_s)
    except BaseException:
        proto.abort()
        raise
    return proto
