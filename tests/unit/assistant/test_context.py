from __future__ import annotations

from typing import Any

import pytest

from chatd.assistant.context import Coalescer, build_context, estimate_tokens


def row(i: int, content: str, role: str = "user") -> dict[str, Any]:
    return {"id": i, "seq": i, "role": role, "content": content}


@pytest.mark.parametrize(
    ("text", "expected"),
    [("", 1), ("abcd", 1), ("a" * 40, 10), ("안녕하세요", 4), ("hi 안녕", 3)],
)
def test_estimate_tokens(text: str, expected: int) -> None:
    assert estimate_tokens(text) == expected


def test_newest_messages_within_budget_prompt_always_included() -> None:
    history = [row(i, "x" * 40) for i in range(1, 11)]  # 10 tokens + 4 overhead each
    ctx = build_context("sys", history, [], budget_tokens=45)
    assert ctx.recent_ids == (8, 9, 10)
    huge = [row(1, "y" * 4000)]
    assert build_context("sys", huge, [], budget_tokens=10).recent_ids == (1,)


def test_retrieved_older_messages_go_to_the_system_prompt_once() -> None:
    history = [row(i, f"m{i}") for i in range(50, 53)]
    retrieved = [row(7, "서울의 날씨는 맑음"), row(51, "m51")]  # 51 is already recent
    ctx = build_context("You help.", history, retrieved, budget_tokens=1000)
    assert ctx.retrieved_ids == (7,)
    assert "서울의 날씨는 맑음" in ctx.system and "#7" in ctx.system
    assert [m.content for m in ctx.messages] == ["m50", "m51", "m52"]


def test_roles_map_to_provider_roles() -> None:
    ctx = build_context("s", [row(1, "q"), row(2, "a", "assistant"), row(3, "sys note", "system")], [], 100)
    assert [m.role for m in ctx.messages] == ["user", "assistant", "user"]


def test_coalescer_first_token_immediately_then_at_most_one_chunk_per_interval() -> None:
    c = Coalescer(base_interval_s=0.04)
    assert c.add("Hel", now=0.0) == "Hel"  # first token at once
    assert c.add("lo", now=0.01) is None
    assert c.add(" wor", now=0.03) is None
    assert c.due_in(now=0.03) == pytest.approx(0.01)
    assert c.add("ld", now=0.045) == "lo world"
    assert c.flush(now=0.05) is None
    c.add("!", now=0.06)
    assert c.flush(now=0.07) == "!"
    assert c.index == 3


@pytest.mark.parametrize(("sockets", "interval"), [(1, 0.04), (200, 0.04), (400, 0.08), (1000, 0.2), (10_000, 0.5)])
def test_interval_grows_with_room_size(sockets: int, interval: float) -> None:
    assert Coalescer(0.04, sockets).interval_s == pytest.approx(interval)


def test_interval_doubles_when_behind() -> None:
    c = Coalescer(0.04)
    c.add("a", now=0.0)
    c.add("b", now=0.2)  # due at 0.04, served 0.16 late
    assert c.interval_s == pytest.approx(0.08)


@pytest.mark.parametrize(
    ("content", "mentions"),
    [
        ("hello", False),
        ("@assistant hello", True),
        ("hey @Assistant, help", True),
        ("mail me at bob@assistant.io", False),
        ("see x.@assistant.dev", False),
        ("@assistant", True),
        ("@assistants are here", False),
    ],
)
def test_mentions_assistant(content: str, mentions: bool) -> None:
    from chatd.assistant.context import mentions_assistant

    assert mentions_assistant(content) is mentions
