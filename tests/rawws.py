"""A raw RFC 6455 client over a plain TCP socket: frames exactly as a test writes them.

Real client libraries refuse to send what the abuse and conformance tests need
(unmasked frames, reserved close codes, a fragment of invalid UTF-8 with no final
frame, a header that announces 8 MiB), so these tests frame by hand.
"""

from __future__ import annotations

import asyncio
import base64
import os
import struct
from dataclasses import dataclass

OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA


def frame(
    opcode: int,
    payload: bytes = b"",
    *,
    fin: bool = True,
    mask: bool = True,
    length: int | None = None,
    rsv1: bool = False,
    length_form: int | None = None,
) -> bytes:
    """One client frame; ``length`` overrides the announced payload length (the payload may follow later);
    ``length_form`` (7, 16 or 64) forces that encoding of the length, minimal or not; ``rsv1`` marks a
    permessage-deflate compressed message."""
    n = len(payload) if length is None else length
    head = bytes([(0x80 if fin else 0) | (0x40 if rsv1 else 0) | opcode])
    bit = 0x80 if mask else 0
    form = length_form or (7 if n < 126 else 16 if n <= 0xFFFF else 64)
    if form == 7:
        head += bytes([bit | n])
    elif form == 16:
        head += bytes([bit | 126]) + struct.pack("!H", n)
    else:
        head += bytes([bit | 127]) + struct.pack("!Q", n)
    if not mask:
        return head + payload
    key = os.urandom(4)
    return head + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


def close_payload(code: int, reason: bytes = b"") -> bytes:
    return struct.pack("!H", code) + reason


@dataclass
class Frame:
    fin: bool
    opcode: int
    payload: bytes

    @property
    def close_code(self) -> int | None:
        return struct.unpack("!H", self.payload[:2])[0] if self.opcode == OP_CLOSE and len(self.payload) >= 2 else None


class RawWS:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, response: bytes) -> None:
        self.reader = reader
        self.writer = writer
        self.response = response  # the handshake response head

    @classmethod
    async def connect(
        cls, port: int, path: str = "/ws", token: str | None = None, extensions: str | None = None
    ) -> RawWS:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        key = base64.b64encode(os.urandom(16)).decode()
        auth = f"Authorization: Bearer {token}\r\n" if token else ""
        if extensions:
            auth += f"Sec-WebSocket-Extensions: {extensions}\r\n"
        writer.write(
            (
                f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n{auth}\r\n"
            ).encode()
        )
        response = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        if not response.startswith(b"HTTP/1.1 101"):
            writer.close()
            raise ConnectionError(response.decode(errors="replace"))
        return cls(reader, writer, response)

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def recv(self, timeout_s: float = 10) -> Frame | None:
        """The next server frame; None at EOF."""
        try:
            head = await asyncio.wait_for(self.reader.readexactly(2), timeout_s)
            n = head[1] & 0x7F
            if n == 126:
                n = struct.unpack("!H", await self.reader.readexactly(2))[0]
            elif n == 127:
                n = struct.unpack("!Q", await self.reader.readexactly(8))[0]
            payload = await asyncio.wait_for(self.reader.readexactly(n), timeout_s)
        except asyncio.IncompleteReadError:
            return None
        return Frame(bool(head[0] & 0x80), head[0] & 0x0F, payload)

    async def close_code(self, timeout_s: float = 10) -> int | None:
        """Read until the server's close frame: its code (None if the TCP connection ended without one)."""
        while True:
            got = await self.recv(timeout_s)
            if got is None:
                return None
            if got.opcode == OP_CLOSE:
                return got.close_code

    def close(self) -> None:
        self.writer.close()
