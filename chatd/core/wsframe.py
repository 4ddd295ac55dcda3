"""Pre-framed RFC 6455 text frames for fan-out: serialize and frame an event once, write it to every socket."""

from __future__ import annotations

import struct
from typing import Final

_MAX_WS_PAYLOAD_BYTES: Final = 2**63 - 1  # RFC 6455: the 64-bit length's MSB must be 0


def ws_frame(first: int, payload: bytes) -> bytes:
    """One unmasked frame: ``first`` is the header's first byte (FIN, RSV1, opcode), then the minimal length."""
    length = len(payload)
    if length < 126:
        return bytes((first, length)) + payload
    if length <= 0xFFFF:
        return struct.pack("!BBH", first, 126, length) + payload
    return struct.pack("!BBQ", first, 127, length) + payload


def ws_text_frame(payload: bytes) -> bytes:
    """One complete, unmasked, FIN=1 text frame (RFC 6455 section 5.2).

    Lets fan-out serialize and frame an event once and write the same bytes
    to every socket.  Server frames are never masked (section 5.1).  With
    permessage-deflate negotiated this is still valid: RSV1=0 marks the
    message as uncompressed (RFC 7692 section 6).  ``payload`` must be UTF-8
    (use ``encode_bytes``); it is not re-validated here.
    """
    length = len(payload)
    if length < 126:
        header = struct.pack("!BB", 0x81, length)
    elif length <= 0xFFFF:
        header = struct.pack("!BBH", 0x81, 126, length)
    elif length <= _MAX_WS_PAYLOAD_BYTES:
        header = struct.pack("!BBQ", 0x81, 127, length)
    else:  # pragma: no cover - not representable in memory
        raise ValueError("payload too large for a WebSocket frame")
    return header + payload


def ws_frame_payloads(data: bytes) -> list[bytes]:
    """The payloads of ``ws_text_frame`` output (one or several frames back to back)."""
    out = []
    while data:
        length = data[1] & 0x7F
        offset = 2
        if length == 126:
            length, offset = struct.unpack("!H", data[2:4])[0], 4
        elif length == 127:
            length, offset = struct.unpack("!Q", data[2:10])[0], 10
        out.append(data[offset : offset + length])
        data = data[offset + length :]
    return out
