"""client_frames: text in, frames or errors out; no socket, no loop."""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from jsonschema import Draft202012Validator

from chatd.core import client_frames, server_frames
from chatd.core.errors import BadRequest, CloseCode, ProtocolViolation, TooLarge

MISSING = object()  # marks "delete this member" in the tables below
MAX = client_frames.MAX_SAFE_INT
UUID = "3f2b8c1e-9d4a-4e6f-8b7a-1c2d3e4f5a6b"



def dumps(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False)


def decode_error(text: str | bytes, decoder: client_frames.FrameDecoder | None = None) -> client_frames.FrameError:
    decoder = decoder or client_frames.FrameDecoder()
    with pytest.raises(client_frames.FrameError) as info:
        decoder.decode(text)
    return info.value


def violation(text: str | bytes, decoder: client_frames.FrameDecoder | None = None) -> ProtocolViolation:
    decoder = decoder or client_frames.FrameDecoder()
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

VALID_FRAMES: list[tuple[dict[str, Any], client_frames.ClientFrame]] = [
    ({"type": "join", "room_id": 1}, client_frames.Join(1, None)),
    ({"type": "join", "room_id": 7, "since_seq": 0, "id": "r1"}, client_frames.Join(7, 0, request_id="r1")),
    ({"type": "join", "room_id": MAX, "since_seq": MAX}, client_frames.Join(MAX, MAX)),
    ({"type": "join", "room_id": 3, "since_seq": None}, client_frames.Join(3, None)),
    ({"type": "join", "room_id": 3, "since_seq": 9, "epoch": "3f2a"}, client_frames.Join(3, 9, "3f2a")),
    ({"type": "leave", "room_id": 2, "id": 9}, client_frames.Leave(2, request_id=9)),
    (
        {"type": "send", "room_id": 5, "content": "안녕하세요", "client_msg_id": UUID, "id": 42},
        client_frames.Send(5, "안녕하세요", UUID, request_id=42),
    ),
    (
        {"type": "send", "room_id": 5, "content": "  code\n", "client_msg_id": "a"},
        client_frames.Send(5, "  code\n", "a"),  # content is kept verbatim, not stripped
    ),
    ({"type": "typing", "room_id": 4, "is_typing": True}, client_frames.Typing(4, True)),
    ({"type": "typing", "room_id": 4, "is_typing": False}, client_frames.Typing(4, False)),
    ({"type": "read", "room_id": 4, "seq": 0}, client_frames.Read(4, 0)),
    ({"type": "read", "room_id": 4, "seq": 123, "id": "x"}, client_frames.Read(4, 123, request_id="x")),
    ({"type": "edit", "message_id": 11, "content": "fixed"}, client_frames.Edit(11, "fixed")),
    ({"type": "delete", "message_id": 11, "id": 0}, client_frames.Delete(11, request_id=0)),
    ({"type": "react", "message_id": 11, "emoji": "👍"}, client_frames.React(11, "👍", True)),
    ({"type": "react", "message_id": 11, "emoji": ":tada:", "add": False}, client_frames.React(11, ":tada:", False)),
    ({"type": "ping"}, client_frames.Ping()),
    ({"type": "ping", "id": -5}, client_frames.Ping(request_id=-5)),
    ({"type": "ping", "future": {"nested": [1, 2]}, "v": 2}, client_frames.Ping()),  # unknown members ignored
    ({"type": "auth", "token": "eyJhbGciOi.x.y", "id": "a1"}, client_frames.Auth("eyJhbGciOi.x.y", request_id="a1")),
    (
        {"type": "auth", "token": "t" * client_frames.MAX_TOKEN_CHARS},
        client_frames.Auth("t" * client_frames.MAX_TOKEN_CHARS),
    ),
    ({"type": "cancel", "message_id": 99}, client_frames.Cancel(99)),
    ({"type": "regenerate", "message_id": 98, "id": "g"}, client_frames.Regenerate(98, request_id="g")),
    ({"type": "ping", "id": "i" * 64}, client_frames.Ping(request_id="i" * 64)),
]


@pytest.mark.parametrize(("obj", "expected"), VALID_FRAMES)
def test_valid_frames_decode(obj: dict[str, Any], expected: client_frames.ClientFrame) -> None:
    decoder = client_frames.FrameDecoder()
    assert decoder.decode(dumps(obj)) == expected
    assert decoder.invalid_strikes == 0


def test_every_frame_type_is_covered_and_named_consistently() -> None:
    covered = {frame.TYPE for _, frame in VALID_FRAMES}
    assert covered == client_frames.CLIENT_FRAME_TYPES
    assert len(client_frames.CLIENT_FRAME_TYPES) == 12


def test_parse_client_frame_accepts_a_decoded_object() -> None:
    frame = client_frames.parse_client_frame({"type": "leave", "room_id": 1, "id": "q"})
    assert frame == client_frames.Leave(1, request_id="q")


def test_frames_are_frozen() -> None:
    frame = client_frames.Join(1, None)
    with pytest.raises(AttributeError):  # msgspec's frozen models refuse assignment
        frame.room_id = 2  # type: ignore[misc]


def test_escaped_surrogate_pair_is_valid_and_escaped_backslash_is_not_a_surrogate() -> None:
    decoder = client_frames.FrameDecoder()
    emoji = '{"type":"send","room_id":1,"client_msg_id":"c","content":"\\ud83d\\ude00"}'
    assert decoder.decode(emoji) == client_frames.Send(1, "\U0001f600", "c")
    literal = '{"type":"send","room_id":1,"client_msg_id":"c","content":"\\\\ud800"}'
    assert decoder.decode(literal) == client_frames.Send(1, "\\ud800", "c")
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
TOKEN_BAD = [MISSING, None, 5, "", "t" * (client_frames.MAX_TOKEN_CHARS + 1)]

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
    decoder = client_frames.FrameDecoder()
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
    decoder = client_frames.FrameDecoder(max_message_chars=max_message_chars)
    if not too_large:
        frame = decoder.decode(dumps(obj))
        assert isinstance(frame, (client_frames.Send, client_frames.Edit))
        assert frame.content == content
        return
    exc = decode_error(dumps(obj), decoder)
    assert isinstance(exc.error, TooLarge)
    assert exc.error.code == "too_large"
    assert f"{frame_type}.content" in exc.error.message
    assert exc.request_id == "big"
    assert server_frames.error(exc.error, reply_to=exc.request_id)["reply_to"] == "big"


# --------------------------------------------------------------------------
# Fatal violations: binary, oversize
# --------------------------------------------------------------------------


@pytest.mark.parametrize("data", [b"", b'{"type":"ping"}', b"\xff\xfe"])
def test_binary_frames_close_with_1003(data: bytes) -> None:
    decoder = client_frames.FrameDecoder()
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
    decoder = client_frames.FrameDecoder(max_frame_bytes=max_frame_bytes)
    if not oversize:
        assert decoder.decode(text) == client_frames.Ping()
        return
    exc = violation(text, decoder)
    assert exc.close_code is CloseCode.MESSAGE_TOO_BIG
    assert int(exc.close_code) == 1009
    assert str(max_frame_bytes) in exc.message
    assert decoder.invalid_strikes == 0


def test_decoder_stays_closed_after_a_violation() -> None:
    decoder = client_frames.FrameDecoder()
    violation(b"\x00", decoder)
    again = violation('{"type":"ping"}', decoder)  # even a valid frame
    assert again.close_code == CloseCode.UNSUPPORTED_DATA


@pytest.mark.parametrize(
    "kwargs",
    [{"max_frame_bytes": 0}, {"max_message_chars": 0}, {"max_invalid_strikes": 0}],
)
def test_decoder_rejects_nonsense_limits(kwargs: dict[str, int]) -> None:
    with pytest.raises(ValueError, match="positive"):
        client_frames.FrameDecoder(**kwargs)


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
    pytest.param('{"room_id":' + "[" * 5000 + "]" * 5000 + ',"type":"leave"}', id="deep-nesting-before-the-type"),
]


@pytest.mark.parametrize("text", INVALID_PAYLOADS)
def test_invalid_payload_is_a_strike(text: str) -> None:
    decoder = client_frames.FrameDecoder()
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
    decoder = client_frames.FrameDecoder(max_invalid_strikes=max_invalid_strikes)
    for strike in range(1, max_invalid_strikes):
        assert type(decode_error("{", decoder).error) is BadRequest
        assert decoder.invalid_strikes == strike
    exc = violation("[]", decoder)
    assert exc.close_code is CloseCode.INVALID_PAYLOAD
    assert int(exc.close_code) == 1007
    assert "too many invalid frames" in exc.message
    assert decoder.closed


def test_valid_frames_do_not_reset_strikes() -> None:
    decoder = client_frames.FrameDecoder()  # 3 strikes
    decode_error("{", decoder)
    assert decoder.decode('{"type":"ping"}') == client_frames.Ping()
    exc = decode_error("nope", decoder)  # 2nd strike: still only a BadRequest
    assert type(exc.error) is BadRequest
    assert decoder.decode('{"type":"ping"}') == client_frames.Ping()
    decode_error('{"type":"join"}', decoder)  # field error: no strike
    assert decoder.invalid_strikes == 2
    assert violation("null", decoder).close_code == CloseCode.INVALID_PAYLOAD
    assert violation('{"type":"ping"}', decoder).close_code == CloseCode.INVALID_PAYLOAD


# --------------------------------------------------------------------------
# The models: msgspec decodes the usual frame itself; json and parse_client_frame judge the rest
# --------------------------------------------------------------------------


def test_frames_are_hashable_match_positionally_and_take_the_request_id_by_keyword() -> None:
    frame = client_frames.FrameDecoder().decode('{"type":"read","room_id":4,"seq":2,"id":"r"}')
    assert hash(frame) == hash(client_frames.Read(4, 2, request_id="r"))
    match frame:
        case client_frames.Read(room_id, seq):
            assert (room_id, seq, frame.request_id) == (4, 2, "r")
        case _:
            pytest.fail(f"not a Read: {frame!r}")
    with pytest.raises(AttributeError):
        del frame.seq  # type: ignore[misc]
    with pytest.raises(TypeError):
        client_frames.Read(4, 2, False, "r")  # type: ignore[misc]


def test_a_frame_with_unknown_members_keeps_its_request_id() -> None:
    frame = client_frames.FrameDecoder().decode('{"type":"leave","room_id":3,"id":"q","v":[1.5,{"a":null}]}')
    assert frame == client_frames.Leave(3, request_id="q")


MAX_CHARS = 10  # the decoder's content limit in the property below
_NO_SURROGATES = st.characters(blacklist_categories=["Cs"])
_EDGES: list[object] = [None, True, False, 0, 1, -1, MAX, MAX + 1, -MAX, -MAX - 1, 2**64, 1.0, 2.5, -0.0, 1e300]
_EDGES += [[1], {"a": 1}]
_EDGES += ["", " ", "x", " x", "a\x00", "\u3000", "\x85", "a b", "c-1", "ключ", "\U0001f600", "x" * 64, "x" * 65]
_EDGES += ["join", "\x00" * (MAX_CHARS + 1), " " * (MAX_CHARS + 1), "t" * client_frames.MAX_TOKEN_CHARS]
_EDGES += [c * n for c in "y\x00" for n in (MAX_CHARS, MAX_CHARS + 1, 4000, 4001)]
_MEMBER_VALUES = st.sampled_from(_EDGES) | st.integers() | st.text(_NO_SURROGATES, max_size=12)


@st.composite
def _objects(draw: st.DrawFn) -> dict[str, Any]:
    """A valid frame with up to two members changed or added and one removed."""
    obj = dict(draw(st.sampled_from([*BASE.values(), {"type": "ping"}])))
    names = st.sampled_from([*obj, "id", "epoch", "extra"])
    obj.update(draw(st.dictionaries(names, _MEMBER_VALUES, max_size=2)))
    for name in draw(st.lists(names, max_size=1)):
        obj.pop(name, None)
    return obj


def _outcome(parse: Any) -> tuple[Any, ...]:
    try:
        return ("frame", parse())
    except client_frames.FrameError as exc:
        return ("error", type(exc.error), exc.error.message, exc.request_id)


@settings(max_examples=500, deadline=None)
@given(obj=_objects(), ascii_only=st.booleans())
def test_the_fast_path_agrees_with_json_and_parse_client_frame(obj: dict[str, Any], ascii_only: bool) -> None:
    """What msgspec decodes straight from the text (every member declared) is what the reference path makes of
    the same object (json, then member by member): the same frame, or the same error, message and request id."""
    decoder = client_frames.FrameDecoder(max_message_chars=MAX_CHARS)
    fast = _outcome(lambda: decoder.decode(json.dumps(obj, ensure_ascii=ascii_only)))
    reference = _outcome(lambda: client_frames.parse_client_frame(obj, max_message_chars=MAX_CHARS))
    assert fast == reference
    assert decoder.invalid_strikes == 0


# --------------------------------------------------------------------------
# The published schema, generated from the models (docs/client-frames.schema.json)
# --------------------------------------------------------------------------


def test_the_schema_doc_is_current() -> None:
    # generated: `make docs` rewrites it
    doc = Path(__file__).resolve().parents[3] / "docs" / "client-frames.schema.json"
    assert doc.read_text() == client_frames.json_schema_text()


def test_the_schema_is_valid_json_schema_with_a_definition_per_frame_type() -> None:
    schema = client_frames.json_schema()
    Draft202012Validator.check_schema(schema)
    tags = {d["properties"]["type"]["enum"][0] for d in schema["$defs"].values()}
    assert tags == client_frames.CLIENT_FRAME_TYPES
    assert all("additionalProperties" not in d for d in schema["$defs"].values())  # unknown members: ignored


@cache
def _schema_validator() -> Draft202012Validator:
    return Draft202012Validator(client_frames.json_schema())


def _integral_float(value: Any) -> bool:
    return isinstance(value, float) and value.is_integer()


@settings(max_examples=500, deadline=None)
@example(obj=dict(BASE["send"], content="y" * 4000))
@example(obj=dict(BASE["edit"], content="y" * 4001))
@given(obj=_objects().filter(lambda obj: not any(map(_integral_float, obj.values()))))
def test_the_schema_accepts_exactly_what_the_decoder_accepts(obj: dict[str, Any]) -> None:
    """With the default ws.max_message_chars.  Not generated: ``1.0`` where an integer goes, which JSON Schema's
    ``integer`` matches and a frame may not use (the schema's description says so)."""
    validator = _schema_validator()
    accepted = _outcome(lambda: client_frames.FrameDecoder().decode(json.dumps(obj)))[0] == "frame"
    assert accepted == validator.is_valid(obj), obj
