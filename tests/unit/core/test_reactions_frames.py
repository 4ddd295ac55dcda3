"""The `react` frame: the emoji rule, its words, and the published schema agreeing with the decoder on it."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from jsonschema import Draft202012Validator

from chatd.core import client_frames
from chatd.core.errors import BadRequest

EMOJI = [
    "👍", "👍🏽", "❤️", "☕", "©", "⭐", "🇫🇷", "1️⃣", "#⃣", "*⃣",
    "👨‍👩‍👧", "🧑🏿‍🚀", "🏳️‍🌈", "🏴󠁧󠁢󠁥󠁮󠁧󠁿",  # ZWJ sequences, a subdivision flag
    ":tada:", ":+1:", ":party_parrot:", ":a-b:", ":" + "x" * 32 + ":",
]  # fmt: skip
NOT_EMOJI = [
    "", "a", "1", "hello", "👍👍", "👍 ", " 👍", "👍\n", "🇫", "🏽", "\u200d", "\u200d👍", "👍\u200d", "\ufe0f",
    ":Bad:", "::", ":a b:", ":a:b:", ":" + "x" * 33 + ":", "<b>", "©x", "x" * 40,
]  # fmt: skip


@pytest.mark.parametrize("emoji", EMOJI)
def test_an_emoji_is_taken_as_sent(emoji: str) -> None:
    frame = client_frames.FrameDecoder().decode(json.dumps({"type": "react", "message_id": 3, "emoji": emoji}))
    assert frame == client_frames.React(3, emoji, True)


@pytest.mark.parametrize("value", [*NOT_EMOJI, None, 5, ["👍"]])
def test_anything_else_is_refused_in_words_naming_the_field(value: Any) -> None:
    obj = {"type": "react", "id": "r", "message_id": 3, "emoji": value}
    with pytest.raises(client_frames.FrameError) as info:
        client_frames.FrameDecoder().decode(json.dumps(obj))
    assert type(info.value.error) is BadRequest and info.value.request_id == "r"
    assert info.value.error.message == "react.emoji must be one emoji or a :shortcode: (a-z, 0-9, _ + -, at most 32)"


@pytest.mark.parametrize(
    ("obj", "message"),
    [
        ({"type": "react", "emoji": "👍"}, "react.message_id is required"),
        ({"type": "react", "message_id": 0, "emoji": "👍"}, "react.message_id must be a positive integer"),
        ({"type": "react", "message_id": 1}, "react.emoji is required"),
        ({"type": "react", "message_id": 1, "emoji": "👍", "add": "no"}, "react.add must be a boolean"),
    ],
)
def test_the_other_members(obj: dict[str, Any], message: str) -> None:
    with pytest.raises(client_frames.FrameError) as info:
        client_frames.parse_client_frame(obj)
    assert info.value.error.message == message


_VALIDATOR = Draft202012Validator(client_frames.json_schema())
_CHARS = st.sampled_from(
    [*"ax:_-+ 1#*", "👍", "🏽", "\u200d", "\ufe0f", "\u20e3", "🇫", "🇷", "\U000e0067", "\U000e007f"]
)


@settings(max_examples=500, deadline=None)
@example(emoji="👍")
@example(emoji="👍👍")
@given(emoji=st.sampled_from(EMOJI + NOT_EMOJI) | st.text(_CHARS, max_size=6))
def test_the_schema_accepts_exactly_the_emoji_the_decoder_accepts(emoji: str) -> None:
    obj = {"type": "react", "message_id": 1, "emoji": emoji}
    try:
        client_frames.FrameDecoder().decode(json.dumps(obj))
        accepted = True
    except client_frames.FrameError:
        accepted = False
    assert accepted == _VALIDATOR.is_valid(obj), emoji
