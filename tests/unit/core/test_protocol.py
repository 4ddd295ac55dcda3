"""Unit tests for chatd.protocol: strings and bytes in, no socket, no loop."""

from __future__ import annotations

import dataclasses
import json
import struct
from typing import Any

import pytest

from chatd.core import protocol as p
from chatd.core.errors import BadRequest, CloseCode, ProtocolViolation, RateLimited, TooLarge

MISSING = object()  # marks "delete this member" in the tables below
MAX = p.MAX_SAFE_INT
UUID = "3f2b8c1e-9d4a-4e6f-8b7a-1c2d3e4f5a6b"


def dumps(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False)


def decode_error(text: str | bytes, decoder: p.FrameDecoder | None = None) -> p.FrameError:
    decoder = decoder or p.FrameDecoder()
    with pytest.raises(p.FrameError) as info:
        decoder.decode(text)
    return info.value


def violation(text: str | bytes, decoder: p.FrameDecoder | None = None) -> ProtocolViolation:
    decoder = decoder or p.FrameDecoder()
    with pytest.raises(ProtocolViolation) as info:
        decoder.decode(text)
    return info.value


def ping_of_size(size_bytes: int) -> str:
    """A valid ping frame padded to exactly ``size_bytes`` UTF-8 bytes."""
    shell = '{"type":"ping","pad":""}'
    text = shell[:-2] + "x" * (size_bytes - len(shell)) + shell[-2:]
    assert len(text.encode()) == size_bytes
    return text


# --------------------------------------------------------------------------
# Valid client frames
# --------------------------------------------------------------------------

VALID_FRAMES: list[tuple[dict[str, Any], p.ClientFrame]] = [
    ({"type": "join", "room_id": 1}, p.Join(1, None)),
    ({"type": "join", "room_id": 7, "since_seq": 0, "id": "r1"}, p.Join(7, 0, request_id="r1")),
    ({"type": "join", "room_id": MAX, "since_seq": MAX}, p.Join(MAX, MAX)),
    ({"type": "join", "room_id": 3, "since_seq": None}, p.Join(3, None)),
    ({"type": "join", "room_id": 3, "since_seq": 9, "epoch": "3f2a"}, p.Join(3, 9, "3f2a")),
    ({"type": "leave", "room_id": 2, "id": 9}, p.Leave(2, request_id=9)),
    (
        {"type": "send", "room_id": 5, "content": "안녕하세요", "client_msg_id": UUID, "id": 42},
        p.Send(5, "안녕하세요", UUID, request_id=42),
    ),
    (
        {"type": "send", "room_id": 5, "content": "  code\n", "client_msg_id": "a"},
        p.Send(5, "  code\n", "a"),  # content is kept verbatim, not stripped
    ),
    ({"type": "typing", "room_id": 4, "is_typing": True}, p.Typing(4, True)),
    ({"type": "typing", "room_id": 4, "is_typing": False}, p.Typing(4, False)),
    ({"type": "read", "room_id": 4, "seq": 0}, p.Read(4, 0)),
    ({"type": "read", "room_id": 4, "seq": 123, "id": "x"}, p.Read(4, 123, request_id="x")),
    ({"type": "edit", "message_id": 11, "content": "fixed"}, p.Edit(11, "fixed")),
    ({"type": "delete", "message_id": 11, "id": 0}, p.Delete(11, request_id=0)),
    ({"type": "ping"}, p.Ping()),
    ({"type": "ping", "id": -5}, p.Ping(request_id=-5)),
    ({"type": "ping", "future": {"nested": [1, 2]}, "v": 2}, p.Ping()),  # unknown members ignored
    ({"type": "auth", "token": "eyJhbGciOi.x.y", "id": "a1"}, p.Auth("eyJhbGciOi.x.y", request_id="a1")),
    ({"type": "auth", "token": "t" * p.MAX_TOKEN_CHARS}, p.Auth("t" * p.MAX_TOKEN_CHARS)),
    ({"type": "cancel", "message_id": 99}, p.Cancel(99)),
    ({"type": "regenerate", "message_id": 98, "id": "g"}, p.Regenerate(98, request_id="g")),
    ({"type": "ping", "id": "i" * 64}, p.Ping(request_id="i" * 64)),
]


@pytest.mark.parametrize(("obj", "expected"), VALID_FRAMES)
def test_valid_frames_decode(obj: dict[str, Any], expected: p.ClientFrame) -> None:
    decoder = p.FrameDecoder()
    assert decoder.decode(dumps(obj)) == expected
    assert decoder.invalid_strikes == 0


def test_every_frame_type_is_covered_and_named_consistently() -> None:
    covered = {frame.TYPE for _, frame in VALID_FRAMES}
    assert covered == p.CLIENT_FRAME_TYPES
    assert len(p.CLIENT_FRAME_TYPES) == 11


def test_parse_client_frame_accepts_a_decoded_object() -> None:
    frame = p.parse_client_frame({"type": "leave", "room_id": 1, "id": "q"})
    assert frame == p.Leave(1, request_id="q")


def test_frames_are_frozen() -> None:
    frame = p.Join(1, None)
    with pytest.raises(dataclasses.FrozenInstanceError):
        frame.room_id = 2  # type: ignore[misc]


def test_escaped_surrogate_pair_is_valid_and_escaped_backslash_is_not_a_surrogate() -> None:
    decoder = p.FrameDecoder()
    emoji = '{"type":"send","room_id":1,"client_msg_id":"c","content":"\\ud83d\\ude00"}'
    assert decoder.decode(emoji) == p.Send(1, "\U0001f600", "c")
    literal = '{"type":"send","room_id":1,"client_msg_id":"c","content":"\\\\ud800"}'
    assert decoder.decode(literal) == p.Send(1, "\\ud800", "c")
    assert decoder.invalid_strikes == 0


# --------------------------------------------------------------------------
# Invalid fields: BadRequest naming the field, request id preserved, no strike
# --------------------------------------------------------------------------

BASE: dict[str, dict[str, Any]] = {
    "join": {"type": "join", "room_id": 1, "since_seq": 0},
    "leave": {"type": "leave", "room_id": 1},
    "send": {"type": "send", "room_id": 1, "content": "hi", "client_msg_id": "c1"},
    "typing": {"type": "typing", "room_id": 1, "is_typing": True},
    "read": {"type": "read", "room_id": 1, "seq": 0},
    "edit": {"type": "edit", "message_id": 1, "content": "hi"},
    "delete": {"type": "delete", "message_id": 1},
    "auth": {"type": "auth", "token": "t"},
    "cancel": {"type": "cancel", "message_id": 1},
    "regenerate": {"type": "regenerate", "message_id": 1},
}

POSITIVE_ID_BAD = [MISSING, None, True, False, 0, -1, MAX + 1, 1.5, 1.0, "1", [1]]
NON_NEGATIVE_BAD = [MISSING, None, True, -1, MAX + 1, 0.5, "0", {}]
OPTIONAL_SEQ_BAD = [True, -1, MAX + 1, 2.0, "3"]  # missing / null are fine
CONTENT_BAD = [MISSING, None, 123, True, "", "   \n\t", "a\x00b", ["x"]]
CLIENT_MSG_ID_BAD = [MISSING, None, 5, "", "a b", "x" * 65, "ключ", "a\tb"]
BOOL_BAD = [MISSING, None, 1, 0, "true"]
TOKEN_BAD = [MISSING, None, 5, "", "t" * (p.MAX_TOKEN_CHARS + 1)]

FIELD_RULES: list[tuple[str, str, list[Any]]] = [
    ("join", "room_id", POSITIVE_ID_BAD),
    ("join", "since_seq", OPTIONAL_SEQ_BAD),
    ("join", "epoch", ["", 7, "x" * 65, ["e"]]),
    ("leave", "room_id", POSITIVE_ID_BAD),
    ("send", "room_id", POSITIVE_ID_BAD),
    ("send", "content", CONTENT_BAD),
    ("send", "client_msg_id", CLIENT_MSG_ID_BAD),
    ("typing", "room_id", POSITIVE_ID_BAD),
    ("typing", "is_typing", BOOL_BAD),
    ("read", "room_id", POSITIVE_ID_BAD),
    ("read", "seq", NON_NEGATIVE_BAD),
    ("edit", "message_id", POSITIVE_ID_BAD),
    ("edit", "content", CONTENT_BAD),
    ("delete", "message_id", POSITIVE_ID_BAD),
    ("auth", "token", TOKEN_BAD),
    ("cancel", "message_id", POSITIVE_ID_BAD),
    ("regenerate", "message_id", POSITIVE_ID_BAD),
]

BAD_FIELD_CASES = [
    pytest.param(frame_type, name, value, id=f"{frame_type}.{name}={value!r:.20}")
    for frame_type, name, values in FIELD_RULES
    for value in values
]


@pytest.mark.parametrize("request_id", ["req-7", 7])
@pytest.mark.parametrize(("frame_type", "name", "value"), BAD_FIELD_CASES)
def test_bad_field_is_bad_request_naming_the_field(
    frame_type: str, name: str, value: Any, request_id: str | int
) -> None:
    obj = dict(BASE[frame_type], id=request_id)
    if value is MISSING:
        del obj[name]
    else:
        obj[name] = value
    decoder = p.FrameDecoder()
    exc = decode_error(dumps(obj), decoder)
    assert type(exc.error) is BadRequest
    assert exc.error.code == "bad_request"
    assert f"{frame_type}.{name}" in exc.error.message
    assert exc.request_id == request_id
    assert decoder.invalid_strikes == 0  # well-formed JSON costs no strike


@pytest.mark.parametrize(
    ("obj", "message"),
    [
        ({"type": "join", "room_id": -1}, "join.room_id must be a positive integer"),
        ({"type": "join", "room_id": True}, "join.room_id must be a positive integer"),
        ({"type": "join"}, "join.room_id is required"),
        ({"type": "read", "room_id": 1, "seq": -1}, "read.seq must be a non-negative integer"),
        ({"type": "leave", "room_id": MAX + 1}, f"leave.room_id must be at most {MAX}"),
        ({"type": "xyz"}, "unknown frame type 'xyz'"),
        ({"type": "JOIN", "room_id": 1}, "unknown frame type 'JOIN'"),
        ({"room_id": 1}, "frame.type is required"),
        ({"type": 5}, "frame.type must be a string"),
        ({"type": None}, "frame.type must be a string"),
    ],
)
def test_exact_error_messages(obj: dict[str, Any], message: str) -> None:
    exc = decode_error(dumps(dict(obj, id="m")))
    assert type(exc.error) is BadRequest
    assert exc.error.message == message
    assert str(exc) == message
    assert exc.request_id == "m"


def test_unknown_type_echo_is_truncated() -> None:
    exc = decode_error(dumps({"type": "z" * 10_000}))
    assert exc.error.message == f"unknown frame type {'z' * 32!r}"


@pytest.mark.parametrize("bad_id", [True, "", "i" * 65, 1.5, [1], {"a": 1}, MAX + 1, -MAX - 1])
def test_invalid_request_id_is_bad_request_without_reply_to(bad_id: Any) -> None:
    exc = decode_error(dumps({"type": "ping", "id": bad_id}))
    assert type(exc.error) is BadRequest
    assert exc.error.message.startswith("id must be")
    assert exc.request_id is None


# --------------------------------------------------------------------------
# Content size: TooLarge
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("max_message_chars", "frame_type", "content", "too_large"),
    [
        (4000, "send", "a" * 4000, False),
        (4000, "send", "a" * 4001, True),
        (4000, "edit", "a" * 4001, True),
        (4000, "send", "가" * 4000, False),  # limit is characters, not bytes
        (10, "send", "a" * 11, True),
        (10, "edit", "a" * 10, False),
        (10, "send", "\x00" * 11, True),  # size is reported before content rules
    ],
)
def test_content_length_limit(max_message_chars: int, frame_type: str, content: str, too_large: bool) -> None:
    obj = dict(BASE[frame_type], content=content, id="big")
    decoder = p.FrameDecoder(max_message_chars=max_message_chars)
    if not too_large:
        frame = decoder.decode(dumps(obj))
        assert isinstance(frame, (p.Send, p.Edit))
        assert frame.content == content
        return
    exc = decode_error(dumps(obj), decoder)
    assert isinstance(exc.error, TooLarge)
    assert exc.error.code == "too_large"
    assert f"{frame_type}.content" in exc.error.message
    assert exc.request_id == "big"
    assert p.error(exc.error, reply_to=exc.request_id)["reply_to"] == "big"


# --------------------------------------------------------------------------
# Fatal violations: binary, oversize
# --------------------------------------------------------------------------


@pytest.mark.parametrize("data", [b"", b'{"type":"ping"}', b"\xff\xfe"])
def test_binary_frames_close_with_1003(data: bytes) -> None:
    decoder = p.FrameDecoder()
    exc = violation(data, decoder)
    assert exc.close_code is CloseCode.UNSUPPORTED_DATA
    assert int(exc.close_code) == 1003
    assert exc.message == "binary frames are not supported"
    assert decoder.closed


@pytest.mark.parametrize(
    ("max_frame_bytes", "text", "oversize"),
    [
        (64, ping_of_size(64), False),
        (64, ping_of_size(65), True),
        (65536, ping_of_size(65536), False),
        (65536, ping_of_size(65537), True),
        (65536, "x" * 70_000, True),  # not even JSON: size is checked first
        # 30 chars but 78 UTF-8 bytes: the limit is on encoded size.
        (64, '{"type":"ping","p":"' + "가" * 26 + '"}', True),
    ],
)
def test_frame_size_limit(max_frame_bytes: int, text: str, oversize: bool) -> None:
    decoder = p.FrameDecoder(max_frame_bytes=max_frame_bytes)
    if not oversize:
        assert decoder.decode(text) == p.Ping()
        return
    exc = violation(text, decoder)
    assert exc.close_code is CloseCode.MESSAGE_TOO_BIG
    assert int(exc.close_code) == 1009
    assert str(max_frame_bytes) in exc.message
    assert decoder.invalid_strikes == 0


def test_decoder_stays_closed_after_a_violation() -> None:
    decoder = p.FrameDecoder()
    violation(b"\x00", decoder)
    again = violation('{"type":"ping"}', decoder)  # even a valid frame
    assert again.close_code == CloseCode.UNSUPPORTED_DATA


@pytest.mark.parametrize(
    "kwargs",
    [{"max_frame_bytes": 0}, {"max_message_chars": 0}, {"max_invalid_strikes": 0}],
)
def test_decoder_rejects_nonsense_limits(kwargs: dict[str, int]) -> None:
    with pytest.raises(ValueError, match="positive"):
        p.FrameDecoder(**kwargs)


# --------------------------------------------------------------------------
# Invalid JSON: strikes, then 1007
# --------------------------------------------------------------------------

INVALID_PAYLOADS = [
    pytest.param("", id="empty"),
    pytest.param("not json", id="garbage"),
    pytest.param('{"type":"ping"', id="truncated"),
    pytest.param("\ufeff{}", id="bom"),
    pytest.param("[]", id="array"),
    pytest.param('[{"type":"ping"}]', id="array-of-frame"),
    pytest.param("1", id="number"),
    pytest.param('"ping"', id="string"),
    pytest.param("null", id="null"),
    pytest.param("true", id="bool"),
    pytest.param('{"type":"ping","x":NaN}', id="nan"),
    pytest.param('{"type":"ping","x":Infinity}', id="infinity"),
    pytest.param('{"type":"ping","x":-Infinity}', id="-infinity"),
    pytest.param('{"type":"ping","x":1e999}', id="float-overflow"),
    pytest.param('{"type":"ping","x":' + "9" * 5000 + "}", id="huge-int"),
    pytest.param('{"type":"ping","x":"\ud800"}', id="raw-lone-surrogate"),
    pytest.param('{"type":"ping","x":"\\udc00"}', id="escaped-lone-surrogate"),
    pytest.param('{"type":"ping","\\ud800":1}', id="escaped-surrogate-key"),
    pytest.param('{"type":"ping","x":["a","\\ud83d"]}', id="nested-half-pair"),
    pytest.param("[" * 5000 + "]" * 5000, id="deep-nesting"),
]


@pytest.mark.parametrize("text", INVALID_PAYLOADS)
def test_invalid_payload_is_a_strike(text: str) -> None:
    decoder = p.FrameDecoder()
    exc = decode_error(text, decoder)
    assert type(exc.error) is BadRequest
    assert exc.error.message.startswith("invalid JSON: ")
    assert exc.request_id is None
    assert decoder.invalid_strikes == 1
    assert not decoder.closed


def test_nan_is_named_in_the_error() -> None:
    exc = decode_error('{"type":"ping","x":NaN}')
    assert "NaN" in exc.error.message


@pytest.mark.parametrize("max_invalid_strikes", [1, 2, 3, 5])
def test_last_strike_closes_with_1007(max_invalid_strikes: int) -> None:
    decoder = p.FrameDecoder(max_invalid_strikes=max_invalid_strikes)
    for strike in range(1, max_invalid_strikes):
        assert type(decode_error("{", decoder).error) is BadRequest
        assert decoder.invalid_strikes == strike
    exc = violation("[]", decoder)
    assert exc.close_code is CloseCode.INVALID_PAYLOAD
    assert int(exc.close_code) == 1007
    assert "too many invalid frames" in exc.message
    assert decoder.closed


def test_valid_frames_do_not_reset_strikes() -> None:
    decoder = p.FrameDecoder()  # 3 strikes
    decode_error("{", decoder)
    assert decoder.decode('{"type":"ping"}') == p.Ping()
    exc = decode_error("nope", decoder)  # 2nd strike: still only a BadRequest
    assert type(exc.error) is BadRequest
    assert decoder.decode('{"type":"ping"}') == p.Ping()
    decode_error('{"type":"join"}', decoder)  # field error: no strike
    assert decoder.invalid_strikes == 2
    assert violation("null", decoder).close_code == CloseCode.INVALID_PAYLOAD
    assert violation('{"type":"ping"}', decoder).close_code == CloseCode.INVALID_PAYLOAD


# --------------------------------------------------------------------------
# encode
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("frame", "expected"),
    [
        ({"type": "x", "reply_to": None, "a": 1}, '{"type":"x","a":1}'),
        ({"a": [1, 2], "b": {"c": "d"}}, '{"a":[1,2],"b":{"c":"d"}}'),
        ({"deleted": False, "seq": 0, "s": ""}, '{"deleted":false,"seq":0,"s":""}'),
        ({"usage": {"n": None}}, '{"usage":{"n":null}}'),  # only top-level None is dropped
        ({"content": "안녕하세요"}, '{"content":"안녕하세요"}'),
        ({"content": 'é\n"q"'}, '{"content":"é\\n\\"q\\""}'),
    ],
)
def test_encode(frame: dict[str, Any], expected: str) -> None:
    assert p.encode(frame) == expected
    assert p.encode_bytes(frame) == expected.encode("utf-8")


def test_encode_keeps_korean_unescaped_and_is_compact() -> None:
    text = p.encode(p.typing(room_id=1, user_id=2, is_typing=True) | {"content": "안녕하세요"})
    assert "안녕하세요" in text
    assert "\\u" not in text
    assert " " not in text


def test_encode_refuses_nan() -> None:
    with pytest.raises(ValueError):
        p.encode({"x": float("nan")})


# --------------------------------------------------------------------------
# Server frame builders: exact output
# --------------------------------------------------------------------------

BUILDER_CASES: list[tuple[str, dict[str, Any], dict[str, Any]]] = [
    (
        "hello",
        p.hello(user_id=1, connection_id="c-1", server_time_ms=1700000000000, heartbeat_ms=25000),
        {
            "type": "hello",
            "user_id": 1,
            "connection_id": "c-1",
            "server_time": 1700000000000,
            "heartbeat_ms": 25000,
            "protocol": 1,
        },
    ),
    (
        "token_expiring",
        p.token_expiring(expires_in_ms=60000),
        {"type": "token_expiring", "expires_in_ms": 60000},
    ),
    (
        "authenticated",
        p.authenticated(expires_at_ms=1700000900000, reply_to="a1"),
        {"type": "authenticated", "expires_at_ms": 1700000900000, "reply_to": "a1"},
    ),
    (
        "joined",
        p.joined(room_id=5, last_seq=41, epoch="e1", online=[1, 2], reply_to=3),
        {"type": "joined", "room_id": 5, "last_seq": 41, "epoch": "e1", "online": [1, 2], "reply_to": 3},
    ),
    (
        "left",
        p.left(room_id=5, reply_to=None),
        {"type": "left", "room_id": 5, "reply_to": None},
    ),
    (
        "resync_required",
        p.resync_required(room_id=5, last_seq=9000, epoch="e1", reply_to="j"),
        {"type": "resync_required", "room_id": 5, "last_seq": 9000, "epoch": "e1", "reply_to": "j"},
    ),
    (
        "ack",
        p.ack(
            room_id=5,
            client_msg_id=UUID,
            message_id=77,
            seq=42,
            created_at="2026-01-02T03:04:05.678Z",
            reply_to="s1",
            duplicate=True,
        ),
        {
            "type": "ack",
            "room_id": 5,
            "client_msg_id": UUID,
            "message_id": 77,
            "seq": 42,
            "created_at": "2026-01-02T03:04:05.678Z",
            "reply_to": "s1",
            "duplicate": True,
        },
    ),
    (
        "message",
        p.message(
            room_id=5,
            message_id=77,
            seq=42,
            sender_id=None,
            role="assistant",
            kind="text",
            content="안녕하세요",
            client_msg_id=None,
            created_at="2026-01-02T03:04:05.678Z",
        ),
        {
            "type": "message",
            "room_id": 5,
            "message_id": 77,
            "seq": 42,
            "sender_id": None,
            "role": "assistant",
            "kind": "text",
            "content": "안녕하세요",
            "client_msg_id": None,
            "created_at": "2026-01-02T03:04:05.678Z",
            "edited_at": None,
            "deleted": False,
        },
    ),
    (
        "message_updated",
        p.message_updated(room_id=5, message_id=77, seq=43, content="new", edited_at="t2"),
        {
            "type": "message_updated",
            "room_id": 5,
            "message_id": 77,
            "seq": 43,
            "content": "new",
            "edited_at": "t2",
        },
    ),
    (
        "message_deleted",
        p.message_deleted(room_id=5, message_id=77, seq=44),
        {"type": "message_deleted", "room_id": 5, "message_id": 77, "seq": 44},
    ),
    (
        "typing",
        p.typing(room_id=5, user_id=2, is_typing=False),
        {"type": "typing", "room_id": 5, "user_id": 2, "is_typing": False},
    ),
    (
        "read",
        p.read(room_id=5, user_id=2, seq=44),
        {"type": "read", "room_id": 5, "user_id": 2, "seq": 44},
    ),
    (
        "presence",
        p.presence(room_id=5, online=[3], offline=[2]),
        {"type": "presence", "room_id": 5, "online": [3], "offline": [2]},
    ),
    (
        "pong",
        p.pong(server_time_ms=1700000000123, reply_to=8),
        {"type": "pong", "server_time": 1700000000123, "reply_to": 8},
    ),
    (
        "error",
        p.error(RateLimited("slow down", retry_after_ms=1500), reply_to="s2"),
        {
            "type": "error",
            "code": "rate_limited",
            "message": "slow down",
            "reply_to": "s2",
            "retry_after_ms": 1500,
            "details": None,
        },
    ),
    (
        "queued",
        p.queued(room_id=5, reply_to_message_id=77, position=2),
        {"type": "queued", "room_id": 5, "reply_to_message_id": 77, "position": 2},
    ),
    (
        "stream_start",
        p.stream_start(room_id=5, message_id=78, reply_to_message_id=77, model="m-1"),
        {
            "type": "stream_start",
            "room_id": 5,
            "message_id": 78,
            "reply_to_message_id": 77,
            "model": "m-1",
        },
    ),
    (
        "stream_start",
        p.stream_start(room_id=5, message_id=79, reply_to_message_id=77, model="m-1", supersedes=78),
        {
            "type": "stream_start",
            "room_id": 5,
            "message_id": 79,
            "reply_to_message_id": 77,
            "model": "m-1",
            "resumed": True,
            "supersedes": 78,
        },
    ),
    (
        "cancelled",
        p.cancelled(room_id=5, reply_to_message_id=77),
        {"type": "cancelled", "room_id": 5, "reply_to_message_id": 77},
    ),
    (
        "stream_chunk",
        p.stream_chunk(room_id=5, message_id=78, index=0, content="Hel"),
        {"type": "stream_chunk", "room_id": 5, "message_id": 78, "index": 0, "content": "Hel"},
    ),
    (
        "stream_end",
        p.stream_end(
            room_id=5,
            message_id=78,
            seq=45,
            stop_reason="end_turn",
            input_tokens=120,
            output_tokens=30,
            first_token_ms=350,
            latency_ms=2100,
        ),
        {
            "type": "stream_end",
            "room_id": 5,
            "message_id": 78,
            "seq": 45,
            "stop_reason": "end_turn",
            "usage": {"input_tokens": 120, "output_tokens": 30},
            "first_token_ms": 350,
            "latency_ms": 2100,
        },
    ),
]


@pytest.mark.parametrize(("name", "frame", "expected"), BUILDER_CASES, ids=[case[0] for case in BUILDER_CASES])
def test_builder_output(name: str, frame: dict[str, Any], expected: dict[str, Any]) -> None:
    assert frame == expected
    assert frame["type"] == name
    assert next(iter(frame)) == "type"  # "type" leads on the wire, for humans reading logs
    assert json.loads(p.encode(frame)) == {k: v for k, v in expected.items() if v is not None}


def test_every_server_builder_is_tested() -> None:
    builders = {
        "hello", "token_expiring", "authenticated", "joined", "left", "resync_required",
        "ack", "message", "message_updated", "message_deleted", "typing", "read",
        "presence", "pong", "error", "queued", "cancelled", "stream_start", "stream_chunk", "stream_end",
    }  # fmt: skip
    assert {case[0] for case in BUILDER_CASES} == builders
    assert builders <= set(p.__all__)


@pytest.mark.parametrize(
    ("frame", "wire"),
    [
        (
            p.message(
                room_id=5, message_id=77, seq=42, sender_id=None, role="system", kind="system",
                content="방에 입장했습니다", client_msg_id=None, created_at="t",
            ),
            '{"type":"message","room_id":5,"message_id":77,"seq":42,"role":"system",'
            '"kind":"system","content":"방에 입장했습니다","created_at":"t","deleted":false}',
        ),
        (
            p.error(BadRequest("join.room_id must be a positive integer"), reply_to=None),
            '{"type":"error","code":"bad_request","message":"join.room_id must be a positive integer"}',
        ),
        (
            p.error(BadRequest("x", details={"field": "room_id"}), reply_to=3),
            '{"type":"error","code":"bad_request","message":"x","reply_to":3,'
            '"details":{"field":"room_id"}}',
        ),
        (
            p.stream_end(
                room_id=1, message_id=2, seq=3, stop_reason="cancelled", input_tokens=5,
                output_tokens=0, first_token_ms=None, latency_ms=40,
            ),
            '{"type":"stream_end","room_id":1,"message_id":2,"seq":3,"stop_reason":"cancelled",'
            '"usage":{"input_tokens":5,"output_tokens":0},"latency_ms":40}',
        ),
    ],
)  # fmt: skip
def test_encoded_wire_shape(frame: dict[str, Any], wire: str) -> None:
    assert p.encode(frame) == wire


def test_joined_copies_the_online_list() -> None:
    online = [1, 2]
    frame = p.joined(room_id=1, last_seq=0, epoch="e1", online=online, reply_to=None)
    online.append(3)
    assert frame["online"] == [1, 2]


def test_builders_are_keyword_only() -> None:
    with pytest.raises(TypeError):
        p.read(1, 2, 3)  # type: ignore[call-arg]


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
    frame = p.ws_text_frame(payload)
    assert frame == header + payload
    assert parse_ws_frame(frame) == (0x1, payload)


def test_ws_text_frame_round_trips_an_encoded_event() -> None:
    event = p.message(
        room_id=1, message_id=2, seq=3, sender_id=4, role="user", kind="text",
        content="안녕하세요 " * 30, client_msg_id=UUID, created_at="t",
    )  # fmt: skip
    payload = p.encode_bytes(event)
    assert len(payload) > 125  # exercises the 16-bit length form
    opcode, body = parse_ws_frame(p.ws_text_frame(payload))
    assert opcode == 0x1
    assert json.loads(body.decode("utf-8")) == {k: v for k, v in event.items() if v is not None}


# -- stored rows as frames, and frames back to payloads ---------------------------------------------------


def _row(**changes: object) -> dict[str, object]:
    import datetime as dt

    row: dict[str, object] = {
        "id": 9, "room_id": 7, "seq": 3, "sender_id": None, "role": "assistant", "kind": "text", "content": "hi",
        "client_msg_id": None, "reply_to_id": 8, "status": "final", "superseded_at": None, "deleted_at": None,
        "edited_at": None, "created_at": dt.datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=dt.UTC),
    }  # fmt: skip
    row.update(changes)
    return row


def test_message_from_row_marks_answers() -> None:
    frame = p.message_from_row(_row(status="cancelled"))
    assert frame["created_at"] == "2026-01-02T03:04:05.678Z"
    assert frame["reply_to_message_id"] == 8 and frame["status"] == "cancelled" and "superseded" not in frame


def test_change_from_row_is_an_update_or_a_delete() -> None:
    import datetime as dt

    edited = _row(edited_at=dt.datetime(2026, 1, 2, 3, 5, tzinfo=dt.UTC), content="new")
    assert p.change_from_row(edited) == {
        "type": "message_updated", "room_id": 7, "message_id": 9, "seq": 3, "content": "new",
        "edited_at": "2026-01-02T03:05:00.000Z",
    }  # fmt: skip
    assert p.change_from_row(_row(deleted_at=edited["edited_at"]))["type"] == "message_deleted"


@pytest.mark.parametrize(
    ("generation", "stop_reason"),
    [({"g_stop_reason": "max_tokens", "g_output_tokens": 5}, "max_tokens"), ({}, "end_turn")],
)
def test_stream_end_from_row(generation: dict[str, object], stop_reason: str) -> None:
    end = p.stream_end_from_row(_row(**generation))
    assert end["stop_reason"] == stop_reason and end["message_id"] == 9 and end["seq"] == 3
    assert end["usage"]["output_tokens"] == generation.get("g_output_tokens", 0)


def test_ws_frame_payloads_reads_back_concatenated_frames() -> None:
    payloads = [b"a" * 5, b"b" * 200, b"c" * 70_000]
    assert p.ws_frame_payloads(b"".join(p.ws_text_frame(x) for x in payloads)) == payloads
