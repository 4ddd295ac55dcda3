"""The wire format between workers (pure): encode, and decode to a checked value or one ``BadEnvelope``."""

from __future__ import annotations

import json
from typing import Any

import pytest

from chatd.core import envelope
from chatd.core.envelope import BadEnvelope, Change, Close, Control, Frame, Kick, Messages, Presence

ORG = b"abcdefabcdef"


def test_round_trip_with_payloads() -> None:
    origin = envelope.new_origin()
    assert len(origin) == envelope.ORIGIN_CHARS
    frames = [b'{"type":"message","seq":1}', b'{"type":"message","seq":2,"content":"a\\nb"}']
    data = envelope.encode(origin, {"o": "m", "s": [1, 2]}, frames)
    assert data.startswith(origin)  # a worker drops its own publishes by this prefix, before parsing
    assert envelope.decode(data, "room") == Messages([1, 2], frames)


def test_encode_writes_the_version_first() -> None:
    data = envelope.encode(ORG, {"o": "kick", "room": 5})
    assert data == ORG + b' {"v":1,"o":"kick","room":5}'
    assert json.loads(data[len(ORG) + 1 :]) == {"v": 1, "o": "kick", "room": 5}


@pytest.mark.parametrize("header", [{"v": 2, "o": "f"}, {}, {"x": "no op"}])
def test_encode_refuses_a_version_field_or_no_op(header: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        envelope.encode(ORG, header)


def _old(header: dict[str, Any], *payloads: bytes) -> bytes:
    """An envelope as chatd before versions (today's main) writes it: no "v"."""
    return b"\n".join([ORG + b" " + json.dumps(header, separators=(",", ":")).encode(), *payloads])


P = b'{"type":"typing"}'

# (scope, envelope, what it decodes to): every op, in both readable versions.
VALID: list[tuple[envelope.Scope, bytes, envelope.Body]] = [
    ("room", envelope.encode(ORG, {"o": "m", "s": [7]}, [P]), Messages([7], [P])),
    ("room", envelope.encode(ORG, {"o": "m", "s": [7, 8]}, [P, P]), Messages([7, 8], [P, P])),
    ("room", envelope.encode(ORG, {"o": "f"}, [P]), Frame(P)),
    ("room", envelope.encode(ORG, {"o": "f", "x": "c1", "m": 9, "i": -1}, [P]), Frame(P, "c1", (9, -1))),
    ("room", envelope.encode(ORG, {"o": "u", "r": 3}, [P]), Change(3, P)),
    ("room", envelope.encode(ORG, {"o": "u", "r": 3, "m": 77}, [P]), Change(3, P, 77)),
    ("room", envelope.encode(ORG, {"o": "p", "on": [1], "off": []}, [P]), Presence([1], [], P)),
    ("user", envelope.encode(ORG, {"o": "f", "x": "c1"}, [P]), Frame(P, "c1")),
    ("user", envelope.encode(ORG, {"o": "close", "code": 4001, "reason": "x", "fam": None}), Close(4001, "x", None)),
    ("user", envelope.encode(ORG, {"o": "close", "code": 1008, "fam": "f1"}), Close(1008, "", "f1")),
    ("user", envelope.encode(ORG, {"o": "kick", "room": 4}), Kick(4)),
    ("control", envelope.encode(ORG, {"o": "cancel", "message_id": 5}), Control("cancel", {})),
    ("room", envelope.encode(ORG, {"o": "f", "new": "field"}, [P]), Frame(P)),  # unknown fields: ignored
    # The format before versions (no "v"), as a not yet upgraded instance publishes it: read as v1.
    ("room", _old({"o": "m", "s": [7, 8]}, P, P), Messages([7, 8], [P, P])),
    ("room", _old({"o": "f", "x": "c1", "m": 9, "i": 0}, P), Frame(P, "c1", (9, 0))),
    ("room", _old({"o": "u", "r": 3}, P), Change(3, P)),
    ("room", _old({"o": "p", "on": [], "off": [2]}, P), Presence([], [2], P)),
    ("user", _old({"o": "close", "code": 4001, "reason": "logged out", "fam": None}), Close(4001, "logged out", None)),
    ("user", _old({"o": "kick", "room": 4}), Kick(4)),
]


@pytest.mark.parametrize(("scope", "data", "body"), VALID)
def test_valid_envelopes_decode_to_their_op(scope: envelope.Scope, data: bytes, body: envelope.Body) -> None:
    got = envelope.decode(data, scope)
    if isinstance(body, Control):
        assert isinstance(got, Control) and got.op == body.op and got.fields["message_id"] == 5
    else:
        assert got == body


def test_both_versions_decode_alike() -> None:
    cases: list[tuple[dict[str, Any], list[bytes]]] = [
        ({"o": "m", "s": [3, 4]}, [P, P]),
        ({"o": "f", "x": "c", "m": 1, "i": 2}, [P]),
    ]
    for header, payloads in cases:
        assert envelope.decode(_old(header, *payloads), "room") == envelope.decode(
            envelope.encode(ORG, header, payloads), "room"
        )


# (scope, envelope, reason): each is dropped, counted by its reason.
BAD: list[tuple[envelope.Scope, bytes, str]] = [
    ("room", b"", "framing"),
    ("room", b"short", "framing"),
    ("room", ORG + b"X{}", "framing"),
    ("room", ORG + b" ", "framing"),
    ("room", b"\xff" * 40, "framing"),
    ("room", ORG + b" {bad", "json"),
    ("room", ORG + b" [1]", "json"),
    ("room", ORG + b' "o"', "json"),
    ("room", ORG + b" \xff\xfe", "json"),
    ("room", ORG + b" " + b"[" * 100_000, "json"),  # nested past the decoder's recursion limit
    ("room", ORG + b' {"v":2,"o":"f"}\n{}', "version"),
    ("room", ORG + b' {"v":"1","o":"f"}\n{}', "version"),
    ("room", ORG + b' {"v":true,"o":"f"}\n{}', "version"),
    ("room", ORG + b' {"v":null,"o":"f"}\n{}', "version"),
    ("room", ORG + b' {"v":1}', "op"),
    ("room", ORG + b' {"no":"op"}', "op"),
    ("room", ORG + b' {"v":1,"o":5}', "op"),
    ("room", ORG + b' {"v":1,"o":"zz"}\n{}', "op"),
    ("room", ORG + b' {"v":1,"o":"close","code":1000}', "op"),  # a user channel's op
    ("user", ORG + b' {"v":1,"o":"m","s":[1]}\n{}', "op"),  # a room channel's op
    ("user", ORG + b' {"v":1,"o":"cancel"}', "op"),
    ("room", ORG + b' {"v":1,"o":"m"}\n{}', "header"),
    ("room", ORG + b' {"v":1,"o":"m","s":[]}', "header"),
    ("room", ORG + b' {"v":1,"o":"m","s":1}\n{}', "header"),
    ("room", ORG + b' {"v":1,"o":"m","s":["1"]}\n{}', "header"),
    ("room", ORG + b' {"v":1,"o":"m","s":[true]}\n{}', "header"),
    ("room", ORG + b' {"v":1,"o":"m","s":[1.5]}\n{}', "header"),
    ("room", ORG + b' {"v":1,"o":"m","s":[0]}\n{}', "header"),
    ("room", ORG + b' {"v":1,"o":"f","x":5}\n{}', "header"),
    ("room", ORG + b' {"v":1,"o":"f","m":7}\n{}', "header"),  # a stream frame without its index
    ("room", ORG + b' {"v":1,"o":"f","m":"7","i":0}\n{}', "header"),
    ("room", ORG + b' {"v":1,"o":"u"}\n{}', "header"),
    ("room", ORG + b' {"v":1,"o":"u","r":"abc"}\n{}', "header"),
    ("room", ORG + b' {"v":1,"o":"u","r":1,"m":"x"}\n{}', "header"),
    ("room", ORG + b' {"v":1,"o":"p","on":5,"off":[]}\n{}', "header"),
    ("room", ORG + b' {"v":1,"o":"p","on":[],"off":["2"]}\n{}', "header"),
    ("user", ORG + b' {"v":1,"o":"close"}', "header"),
    ("user", ORG + b' {"v":1,"o":"close","code":"4001"}', "header"),
    ("user", ORG + b' {"v":1,"o":"close","code":4001,"reason":7}', "header"),
    ("user", ORG + b' {"v":1,"o":"close","code":4001,"fam":1}', "header"),
    ("user", ORG + b' {"v":1,"o":"kick","room":"x"}', "header"),
    ("room", ORG + b' {"v":1,"o":"m","s":[1,2]}\n{}', "payloads"),
    ("room", ORG + b' {"v":1,"o":"m","s":[1]}\n{}\n{}', "payloads"),
    ("room", ORG + b' {"v":1,"o":"m","s":[1]}', "payloads"),
    ("room", ORG + b' {"v":1,"o":"m","s":[1]}\n', "payloads"),  # an empty payload
    ("room", ORG + b' {"v":1,"o":"f"}', "payloads"),
    ("room", ORG + b' {"v":1,"o":"f"}\n{}\n{}', "payloads"),
    ("room", ORG + b' {"v":1,"o":"u","r":1}', "payloads"),
    ("room", ORG + b' {"v":1,"o":"p","on":[],"off":[]}', "payloads"),
    ("user", ORG + b' {"v":1,"o":"close","code":4001}\n{}', "payloads"),
    ("user", ORG + b' {"v":1,"o":"kick","room":1}\n{}', "payloads"),
    ("control", ORG + b' {"v":1,"o":"cancel","message_id":5}\n{}', "payloads"),
]


@pytest.mark.parametrize(("scope", "data", "reason"), BAD)
def test_anything_else_is_one_bad_envelope_with_its_reason(scope: envelope.Scope, data: bytes, reason: str) -> None:
    with pytest.raises(BadEnvelope) as caught:
        envelope.decode(data, scope)
    assert caught.value.reason == reason
    assert isinstance(caught.value, ValueError)
    assert reason in envelope.REASONS


@pytest.mark.parametrize(
    ("channel", "expected"),
    [
        (b"chatd:room:12", 12),
        (b"chatd:room:0", 0),
        (b"chatd:room:x", None),
        (b"chatd:room:", None),
        (b"chatd:room:-1", None),
        (b"chatd:room:1 ", None),
        (b"chatd:room:\xd9\xa3", None),  # a non-ASCII digit
        (b"chatd:room:" + b"9" * 30, None),
    ],
)
def test_channel_id(channel: bytes, expected: int | None) -> None:
    if expected is None:
        with pytest.raises(BadEnvelope) as caught:
            envelope.channel_id(channel, len(b"chatd:room:"))
        assert caught.value.reason == "channel"
    else:
        assert envelope.channel_id(channel, len(b"chatd:room:")) == expected
