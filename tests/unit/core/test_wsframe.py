"""wsframe: pre-framed text frames, byte for byte."""

from __future__ import annotations

import json
import struct

import pytest

from chatd.core import client_frames, server_frames, wsframe

MISSING = object()  # marks "delete this member" in the tables below
MAX = client_frames.MAX_SAFE_INT
UUID = "3f2b8c1e-9d4a-4e6f-8b7a-1c2d3e4f5a6b"

# --------------------------------------------------------------------------
# ws_text_frame
# --------------------------------------------------------------------------


def parse_ws_frame(frame: bytes) -> tuple[int, bytes]:
    """Tiny RFC 6455 5.2 parser for one server frame: returns (opcode, payload)."""
    first, second = frame[0], frame[1]
    assert first & 0x80, "FIN must be set"
    assert first & 0x70 == 0, "RSV bits must be clear"
    assert second & 0x80 == 0, "server frames must not be masked"
    length, offset = second & 0x7F, 2
    if length == 126:
        (length,) = struct.unpack_from("!H", frame, offset)
        offset += 2
        assert length >= 126, "length must use the minimal encoding"
    elif length == 127:
        (length,) = struct.unpack_from("!Q", frame, offset)
        offset += 8
        assert 0xFFFF < length < 2**63, "length must use the minimal encoding"
    payload = frame[offset:]
    assert len(payload) == length, "frame must hold exactly one payload"
    return first & 0x0F, payload


@pytest.mark.parametrize(
    ("length", "header"),
    [
        (0, b"\x81\x00"),
        (1, b"\x81\x01"),
        (125, b"\x81\x7d"),
        (126, b"\x81\x7e\x00\x7e"),
        (65535, b"\x81\x7e\xff\xff"),
        (65536, b"\x81\x7f\x00\x00\x00\x00\x00\x01\x00\x00"),
        (70000, b"\x81\x7f\x00\x00\x00\x00\x00\x01\x11\x70"),
    ],
)
def test_ws_text_frame_bytes(length: int, header: bytes) -> None:
    payload = bytes(i % 251 for i in range(length))
    frame = wsframe.ws_text_frame(payload)
    assert frame == header + payload
    assert parse_ws_frame(frame) == (0x1, payload)


def test_ws_text_frame_round_trips_an_encoded_event() -> None:
    event = server_frames.message(
        room_id=1, message_id=2, seq=3, sender_id=4, role="user", kind="text",
        content="안녕하세요 " * 30, client_msg_id=UUID, created_at="t",
    )  # fmt: skip
    payload = server_frames.encode_bytes(event)
    assert len(payload) > 125  # exercises the 16-bit length form
    opcode, body = parse_ws_frame(wsframe.ws_text_frame(payload))
    assert opcode == 0x1
    assert json.loads(body.decode("utf-8")) == {k: v for k, v in event.items() if v is not None}



def test_ws_frame_payloads_reads_back_concatenated_frames() -> None:
    payloads = [b"a" * 5, b"b" * 200, b"c" * 70_000]
    assert wsframe.ws_frame_payloads(b"".join(wsframe.ws_text_frame(x) for x in payloads)) == payloads
