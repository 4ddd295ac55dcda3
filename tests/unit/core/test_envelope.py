"""The wire format between workers (pure)."""

from __future__ import annotations

import pytest

from chatd.core import envelope


def test_round_trip_with_payloads() -> None:
    origin = envelope.new_origin()
    assert len(origin) == envelope.ORIGIN_CHARS
    frames = [b'{"type":"message","seq":1}', b'{"type":"message","seq":2,"content":"a\\nb"}']
    data = envelope.encode(origin, {"o": "m", "s": [1, 2]}, frames)
    assert data.startswith(origin)  # a worker drops its own publishes by this prefix, before parsing
    env = envelope.decode(data)
    assert env == envelope.Envelope(origin, {"o": "m", "s": [1, 2]}, frames)


def test_without_payload() -> None:
    data = envelope.encode(b"abcdefabcdef", {"o": "close", "code": 4001, "fam": None})
    assert envelope.decode(data).payloads == [] and envelope.decode(data).header["code"] == 4001


@pytest.mark.parametrize(
    "data",
    [b"", b"short", b"abcdefabcdefX{}", b'abcdefabcdef {"no":"op"}', b"abcdefabcdef [1]", b"abcdefabcdef {bad"],
)
def test_anything_else_is_rejected(data: bytes) -> None:
    with pytest.raises(ValueError):
        envelope.decode(data)
