"""chatd's assistant driving the real ``anthropic`` SDK against the local fake Messages API."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from tests.chat import connect, join, make_room, send
from tests.conftest import Services
from tests.fake_anthropic import FakeLLM
from tests.integration.test_assistant import answers, stream_of
from tests.support import Chatd
from tests.users import make_users


@pytest.fixture
def fake_llm() -> Iterator[FakeLLM]:
    llm = FakeLLM()
    yield llm
    llm.stop()


@pytest.fixture
def chatd_claude(chatd_factory: Any, fake_llm: FakeLLM) -> Chatd:
    server: Chatd = chatd_factory(
        workers=2,
        ANTHROPIC_API_KEY="sk-ant-test",
        ANTHROPIC_BASE_URL=fake_llm.url,
        CHATD_ASSISTANT_MODEL="claude-test",
        CHATD_ASSISTANT_PROVIDER_RETRIES="2",
    )
    return server


async def test_streams_through_the_sdk_and_sends_the_context(
    chatd_claude: Chatd, fake_llm: FakeLLM, services: Services
) -> None:
    fake_llm.script(reply="Seoul is sunny today and the rest is history.", tokens_per_s=200)
    (alice,) = make_users(services.database_url, 1)
    room = await make_room(chatd_claude, alice, [], kind="assistant")
    a = await connect(chatd_claude, alice)
    await join(a, room)
    ack = await send(a, room, "How is the weather?")
    start, chunks, end = await stream_of(a, room)
    assert start["model"] == "claude-test"
    assert "".join(c["content"] for c in chunks) == "Seoul is sunny today and the rest is history."
    assert end["stop_reason"] == "end_turn" and end["usage"]["output_tokens"] == 9
    sent = fake_llm.requests()[-1]
    assert sent["model"] == "claude-test" and sent["stream"] is True
    assert sent["messages"][-1] == {"role": "user", "content": "How is the weather?"}
    assert answers(services.database_url, ack["message_id"])[0][1] == "final"


async def test_overloaded_then_success_is_retried_before_the_first_token(
    chatd_claude: Chatd, fake_llm: FakeLLM, services: Services
) -> None:
    fake_llm.script(reply="after two 529s", fail_status=529, fail_count=2)
    (alice,) = make_users(services.database_url, 1)
    room = await make_room(chatd_claude, alice, [], kind="assistant")
    a = await connect(chatd_claude, alice)
    await join(a, room)
    await send(a, room, "hi")
    _, chunks, end = await stream_of(a, room)
    assert end["stop_reason"] == "end_turn" and "".join(c["content"] for c in chunks) == "after two 529s"
    assert len(fake_llm.requests()) == 3


async def test_failure_after_first_token_ends_with_error_and_keeps_partial(
    chatd_claude: Chatd, fake_llm: FakeLLM, services: Services
) -> None:
    fake_llm.script(reply="one two three four five six", cut_after_tokens=3)
    (alice,) = make_users(services.database_url, 1)
    room = await make_room(chatd_claude, alice, [], kind="assistant")
    a = await connect(chatd_claude, alice)
    await join(a, room)
    ack = await send(a, room, "hi")
    _, chunks, end = await stream_of(a, room)
    assert end["stop_reason"] == "error"
    partial = "".join(c["content"] for c in chunks)
    assert partial == "one two three "
    err = await a.expect("error")
    assert err["code"] == "llm_unavailable"
    assert len(fake_llm.requests()) == 1  # not retried after the first token
    rows = answers(services.database_url, ack["message_id"])
    assert len(rows) == 1 and rows[0][1] == "error" and rows[0][3] == partial


async def test_error_event_mid_stream_and_exhausted_retries(
    chatd_claude: Chatd, fake_llm: FakeLLM, services: Services
) -> None:
    fake_llm.script(reply="alpha beta gamma", error_after_tokens=1, error_type="overloaded_error")
    (alice,) = make_users(services.database_url, 1)
    room = await make_room(chatd_claude, alice, [], kind="assistant")
    a = await connect(chatd_claude, alice)
    await join(a, room)
    await send(a, room, "first")
    _, chunks, end = await stream_of(a, room)
    assert end["stop_reason"] == "error" and "".join(c["content"] for c in chunks) == "alpha "
    fake_llm.reset()
    fake_llm.script(fail_status=529, fail_count=10)
    await send(a, room, "second")
    _, chunks, end = await stream_of(a, room)
    assert end["stop_reason"] == "error" and chunks == []
    assert len(fake_llm.requests()) == 3  # 1 + provider_retries
    for _ in range(2):  # one per failed answer: a clean message; the provider's own words only in the log
        err = await a.expect("error")
        assert err["code"] == "llm_unavailable"
        assert "scripted" not in err["message"] and "overloaded" not in err["message"], err
    assert any("scripted overloaded_error" in e["error"] for e in chatd_claude.events("provider_failed"))


def seed_history(database_url: str, room: int, texts: list[str]) -> None:
    """Old messages written straight to Postgres (as if sent long ago), seqs 1..n."""
    import psycopg

    with psycopg.connect(database_url) as conn:
        row = conn.execute("SELECT owner_id FROM rooms WHERE id = %s", (room,)).fetchone()
        assert row is not None
        owner = row[0]
        conn.execute(
            "INSERT INTO messages (room_id, seq, sender_id, role, content)"
            " SELECT %s, n, %s, 'user', t FROM unnest(%s::text[]) WITH ORDINALITY AS x(t, n)",
            (room, owner, texts),
        )
        conn.execute("UPDATE rooms SET last_seq = %s WHERE id = %s", (len(texts), room))


async def wait_indexed(database_url: str, room: int, count: int) -> None:
    import asyncio

    import psycopg

    for _ in range(150):
        with psycopg.connect(database_url) as conn:
            row = conn.execute("SELECT count(*) FROM message_embeddings WHERE room_id = %s", (room,)).fetchone()
            assert row is not None
            n = row[0]
        if n >= count:
            return
        await asyncio.sleep(0.2)
    raise AssertionError(f"only {n} of {count} messages embedded")


@pytest.mark.parametrize(
    ("needle", "question"),
    [
        ("내일 서울의 날씨는 비가 오고 기온은 12도입니다", "서울 날씨 어때?"),
        ("The staging database password rotates every Tuesday at noon", "When does the database password rotate?"),
    ],
)
async def test_retrieval_brings_an_old_relevant_message_into_the_context(
    chatd_factory: Any, fake_llm: FakeLLM, services: Services, needle: str, question: str
) -> None:
    server: Chatd = chatd_factory(
        ANTHROPIC_API_KEY="sk-ant-test",
        ANTHROPIC_BASE_URL=fake_llm.url,
        CHATD_ASSISTANT_MODEL="claude-test",
        CHATD_ASSISTANT_CONTEXT_BUDGET_TOKENS="100",  # only the newest few messages fit
        CHATD_ASSISTANT_RETRIEVAL_TOP_K="3",
        CHATD_ASSISTANT_INDEX_PRIORITY="normal",  # the test waits for the indexer: a busy shared machine starves idle
    )
    fake_llm.script(reply="ok")
    (alice,) = make_users(services.database_url, 1)
    room = await make_room(server, alice, [], kind="assistant")
    filler = [
        f"잡담 {i}: 점심 메뉴는 김밥이었어요" if i % 2 else f"chatter {i}: the build is green again" for i in range(40)
    ]
    texts = [*filler[:5], needle, *filler[5:]]
    seed_history(services.database_url, room, texts)
    await wait_indexed(services.database_url, room, len(texts))
    a = await connect(server, alice)
    await join(a, room)
    await send(a, room, question)
    await stream_of(a, room)
    sent = fake_llm.requests()[-1]
    recent = " ".join(m["content"] if isinstance(m["content"], str) else str(m["content"]) for m in sent["messages"])
    assert needle not in recent  # too old for the recent window...
    assert needle in str(sent["system"])  # ...so it came in by retrieval
    generation = answers(services.database_url, (await a.expect("message", role="assistant"))["reply_to_message_id"])
    assert generation
