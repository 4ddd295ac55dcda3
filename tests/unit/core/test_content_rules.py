"""Content rules compiled (chatd/core/content_rules.py): validation, words vs regexes, block, mask and flag."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from chatd.core import errors
from chatd.core.content_rules import EMPTY, MASK, Rule, RuleSet, validate


@pytest.mark.parametrize(
    ("kind", "pattern", "says"),
    [
        ("regex", r"(a)\1", "not a valid RE2 regex"),  # backreference: not RE2
        ("regex", r"(?=a)b", "not a valid RE2 regex"),  # lookahead: not RE2
        ("regex", "(open", "not a valid RE2 regex"),
        ("regex", "a*", "matches the empty string"),
        ("regex", "x|", "matches the empty string"),
        ("word", " spaced", "no leading or trailing whitespace"),
        ("word", "x" * 201, "at most 200 characters"),
        ("word", "   ", "non-blank"),
        ("phrase", "x", "kind must be"),
    ],
)
def test_bad_rules_are_refused_with_what_is_wrong(kind: str, pattern: str, says: str) -> None:
    with pytest.raises(errors.BadRequest) as exc:
        validate(kind, pattern, "block")
    assert says in exc.value.message


def test_an_unknown_action_is_refused() -> None:
    with pytest.raises(errors.BadRequest, match="action"):
        validate("word", "x", "shout")


def test_block_raises_with_the_rule_ids_and_before_anything_else() -> None:
    rules = RuleSet(
        3, [Rule(1, "word", "spam", "block"), Rule(2, "word", "spam", "mask"), Rule(3, "word", "x", "flag")]
    )
    with pytest.raises(errors.ContentBlocked) as exc:
        rules.screen("buy SPAM now")
    assert exc.value.details == {"rules": [1]} and exc.value.code == "content_blocked"
    assert rules.screen("spammer x").content == "spammer x"  # a word is a whole word
    assert rules.screen("spammer x").flagged == (3,)


def test_mask_replaces_every_match_and_flag_reads_the_original() -> None:
    rules = RuleSet(1, [Rule(1, "regex", r"\d{4}-\d{4}", "mask"), Rule(2, "regex", r"card \d", "flag")])
    out = rules.screen("card 1234-5678 and 9999-0000")
    assert out.content == f"card {MASK} and {MASK}" and out.masked and out.flagged == (2,)
    assert rules.screen("nothing here").content == "nothing here"


def test_a_word_with_non_ascii_ends_matches_as_a_substring() -> None:
    rules = RuleSet(1, [Rule(1, "word", "café", "mask"), Rule(2, "word", "c++", "mask")])
    assert rules.screen("Café und Cafés, not xcafé").content == f"{MASK} und {MASK}s, not xcafé"
    assert rules.screen("I like C++ a lot").content == f"I like {MASK} a lot"


def test_no_rules_changes_nothing() -> None:
    assert EMPTY.empty and EMPTY.screen("anything").content == "anything"


@given(st.text(max_size=200))
def test_screen_is_linear_and_total(text: str) -> None:
    """Whatever the text, a screen answers (no exception but a block) and masks only with MASK."""
    rules = RuleSet(1, [Rule(1, "regex", r"(a|a)*b", "mask"), Rule(2, "regex", r"\w*\w*\w*z", "flag")])
    out = rules.screen(text)
    assert MASK in out.content or out.content == text
