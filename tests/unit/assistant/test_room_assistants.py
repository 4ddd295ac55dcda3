"""Several assistants per room (issue 21): how one assistant reads the others' answers, and how an answer
says who gave it."""

from __future__ import annotations

import datetime as dt
from typing import Any

from chatd.assistant.context import build_context
from chatd.assistant.generation import relabel_history
from chatd.core import server_frames

GPT = {"id": 3, "name": "gpt", "model": "gpt-4.1"}


def row(i: int, role: str, content: str, by: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "id": i,
        "room_id": 7,
        "seq": i,
        "sender_id": None if role == "assistant" else 42,
        "role": role,
        "kind": "text",
        "content": content,
        "client_msg_id": None,
        "reply_to_id": i - 1 if role == "assistant" else None,
        "created_at": dt.datetime(2026, 1, 1, tzinfo=dt.UTC),
        "edited_at": None,
        "deleted_at": None,
        "status": "final",
        "superseded_at": None,
        "data": {"answered_by": by} if by else None,
    }


HISTORY = [
    row(1, "user", "hi"),
    row(2, "assistant", "default says hi"),
    row(3, "user", "@gpt and you?"),
    row(4, "assistant", "gpt says hi", GPT),
    row(5, "user", "@echo your turn"),
]


def test_an_assistant_reads_its_own_answers_as_its_turns_and_the_others_as_labelled_user_turns() -> None:
    as_gpt = relabel_history(HISTORY, 3)
    assert [(r["role"], r["content"]) for r in as_gpt] == [
        ("user", "hi"),
        ("user", "[the default assistant answered:] default says hi"),
        ("user", "@gpt and you?"),
        ("assistant", "gpt says hi"),
        ("user", "@echo your turn"),
    ]
    as_echo = relabel_history(HISTORY, 4)
    assert as_echo[3] == HISTORY[3] | {"role": "user", "content": "[@gpt answered:] gpt says hi"}
    assert all(r["role"] == "user" for r in as_echo)
    assert HISTORY[3]["role"] == "assistant"  # the rows read from Postgres are not changed


def test_the_default_assistant_reads_the_room_as_before_except_room_assistants_answers() -> None:
    as_default = relabel_history(HISTORY, 0)
    assert as_default[:3] == HISTORY[:3]
    assert as_default[3]["role"] == "user" and as_default[3]["content"].startswith("[@gpt answered:]")
    ctx = build_context("sys", as_default, [], 3000)
    assert [m.role for m in ctx.messages] == ["user", "assistant", "user", "user", "user"]


def test_an_answer_frame_says_who_answered_and_why_it_failed() -> None:
    error = {"code": "llm_unavailable", "message": "@gpt could not answer this time; try again later"}
    answer = row(4, "assistant", "", GPT) | {"status": "error"}
    answer["data"] = {"answered_by": GPT, "error": error}
    frame = server_frames.message_from_row(answer)
    assert frame["answered_by"] == GPT and frame["error"] == error and "data" not in frame
    plain = server_frames.message_from_row(row(2, "assistant", "default says hi"))
    assert "answered_by" not in plain and "error" not in plain
    start = server_frames.stream_start(room_id=7, message_id=9, reply_to_message_id=8, model="m", answered_by=GPT)
    assert start["answered_by"] == GPT
    assert "answered_by" not in server_frames.stream_start(room_id=7, message_id=9, reply_to_message_id=8, model="m")
    end = server_frames.stream_end_from_row(answer)
    assert end["stop_reason"] == "error" and end["error"] == error
