"""The assistant under faults, from outside: real chatd processes, a Postgres or Valkey of the test's own.

The promise checked in each: every acked prompt ends with exactly one stored answer (or an explicit
error), and every `stream_start` a member saw is followed by its `stream_end`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from chatd.process.embedded import EmbeddedPostgres, EmbeddedValkey
from tests.chat import connect, join, make_room, send
from tests.conftest import Services
from tests.integration.test_assistant import answers, stream_of
from tests.support import WS, Chatd, request
from tests.users import make_users

pytestmark = pytest.mark.slow


async def rest_of_stream(ws: WS, message_id: int, timeout_s: float) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    chunks: list[dict[str, Any]] = []
    while True:
        frame = await ws.expect_any(("stream_chunk", "stream_end"), timeout_s=timeout_s, message_id=message_id)
        if frame["type"] == "stream_end":
            return chunks, frame
        chunks.append(frame)


async def test_postgres_down_mid_answer_ends_the_stream_and_stores_the_text_on_retry(
    chatd_factory: Any, own_postgres: tuple[EmbeddedPostgres, str], services: Services, redis_prefix: str
) -> None:
    pg, url = own_postgres
    server: Chatd = chatd_factory(
        database_url=url,
        CHATD_STORAGE_PG_QUERY_TIMEOUT_S="1",
        CHATD_ASSISTANT_PERSIST_RETRY_S="1",
        CHATD_ASSISTANT_OFFLINE_TOKENS_PER_S="10",
    )
    (alice,) = make_users(url, 1)
    room = await make_room(server, alice, [], kind="assistant")
    a = await connect(server, alice)
    await join(a, room)
    ack = await send(a, room, "keep this answer even when the database goes away")
    start = await a.expect("stream_start", room_id=room, timeout_s=15)
    first = await a.expect("stream_chunk", message_id=start["message_id"], index=0)
    pg.stop()
    try:
        chunks, end = await rest_of_stream(a, start["message_id"], timeout_s=30)
        assert end["stop_reason"] == "error" and end["seq"] == 0  # ended, and says nothing was stored
    finally:
        pg.start()
    text = "".join(c["content"] for c in [first, *chunks])
    # The job was not acked away: its retry writes the text members saw, without generating again.
    final = await a.expect("message", room_id=room, role="assistant", timeout_s=40)
    assert final["message_id"] == start["message_id"] and final["content"] == text
    assert final.get("status", "final") == "final"
    rows = answers(url, ack["message_id"])
    assert [(r[0], r[1], r[3]) for r in rows] == [(start["message_id"], "final", text)]
    with pytest.raises(TimeoutError):
        await a.expect("stream_start", room_id=room, timeout_s=2)
    kv = redis.Redis.from_url(services.redis_url)
    assert kv.scard(f"{redis_prefix}streams:{room}") == 0  # no stream left behind for late joiners
    kv.close()


async def test_redis_down_mid_answer_still_ends_with_one_stored_answer(
    chatd_factory: Any, own_valkey: EmbeddedValkey, services: Services
) -> None:
    server: Chatd = chatd_factory(REDIS_URL=own_valkey.url, CHATD_ASSISTANT_OFFLINE_TOKENS_PER_S="10")
    (alice,) = make_users(services.database_url, 1)
    room = await make_room(server, alice, [], kind="assistant")
    a = await connect(server, alice)
    await join(a, room)
    ack = await send(a, room, "answer me while the cache dies")
    start = await a.expect("stream_start", room_id=room, timeout_s=15)
    first = await a.expect("stream_chunk", message_id=start["message_id"], index=0)
    os.kill(int(own_valkey.pid_file.read_text()), signal.SIGKILL)
    chunks, end = await rest_of_stream(a, start["message_id"], timeout_s=30)
    text = "".join(c["content"] for c in [first, *chunks])
    assert end["stop_reason"] == "end_turn" and end["seq"] > 0
    final = await a.expect("message", room_id=room, seq=end["seq"])
    assert final["content"] == text and final["message_id"] == start["message_id"]
    own_valkey.start()  # back (empty): nothing is answered a second time
    with pytest.raises(TimeoutError):
        await a.expect("stream_start", room_id=room, timeout_s=3)
    assert [(r[1], r[3]) for r in answers(services.database_url, ack["message_id"])] == [("final", text)]


@contextlib.contextmanager
def scripts_refused(redis_url: str) -> Iterator[None]:
    """Valkey refuses EVAL/EVALSHA: the job queue cannot take the enqueue that follows an ack."""
    client = redis.Redis.from_url(redis_url)
    client.execute_command("ACL", "SETUSER", "default", "-evalsha", "-eval")  # type: ignore[no-untyped-call]  # redis-py
    try:
        yield
    finally:
        client.execute_command("ACL", "SETUSER", "default", "+evalsha", "+eval")  # type: ignore[no-untyped-call]  # redis-py
        client.close()


async def test_acked_prompts_are_answered_after_a_shutdown_that_lost_their_enqueue(
    chatd_factory: Any, own_valkey: EmbeddedValkey, services: Services
) -> None:
    env = {"REDIS_URL": own_valkey.url}
    a_srv: Chatd = chatd_factory(**env, CHATD_ASSISTANT_OUTBOX_GRACE_S="600")
    (alice,) = make_users(services.database_url, 1)
    room = await make_room(a_srv, alice, [], kind="assistant")
    a = await connect(a_srv, alice)
    await join(a, room)
    with scripts_refused(own_valkey.url):
        first = await send(a, room, "first prompt, its enqueue lost", cmid="lost-1")
        second = await send(a, room, "second prompt, its enqueue lost", cmid="lost-2")
        assert first["type"] == second["type"] == "ack"  # stored and acked: an answer is owed
        a_srv.stop()  # SIGTERM after the ack, before any enqueue got through
    assert answers(services.database_url, first["message_id"]) == []

    # The client's retry of an acked prompt is a duplicate: it must still bring the answer.
    b_srv: Chatd = chatd_factory(**env, CHATD_ASSISTANT_OUTBOX_SWEEP_S="3600")  # no sweep in this phase
    b = await connect(b_srv, alice)
    await join(b, room)
    retry = await send(b, room, "first prompt, its enqueue lost", cmid="lost-1")
    assert retry["duplicate"] is True and retry["message_id"] == first["message_id"]
    start, _, end = await stream_of(b, room)
    assert start["reply_to_message_id"] == first["message_id"] and end["stop_reason"] == "end_turn"
    b_srv.stop()

    # Nobody retries the second: the sweeper finds it owed and not queued. Its first sweep comes 0.5 s after
    # the worker starts, maybe before `c` has connected and joined: a slow answer (~7 s) is still running then,
    # and the join's catch-up shows its stream_start (at 50 tokens/s it could end first, and stream_of wait in vain).
    c_srv: Chatd = chatd_factory(
        **env,
        CHATD_ASSISTANT_OUTBOX_SWEEP_S="0.5",
        CHATD_ASSISTANT_OUTBOX_GRACE_S="0",
        CHATD_ASSISTANT_OFFLINE_TOKENS_PER_S="5",
    )
    c = await connect(c_srv, alice)
    await join(c, room)
    start, _, end = await stream_of(c, room)
    assert start["reply_to_message_id"] == second["message_id"] and end["stop_reason"] == "end_turn"
    with pytest.raises(TimeoutError):
        await c.expect("stream_start", room_id=room, timeout_s=2)
    for ack in (first, second):
        assert [r[1] for r in answers(services.database_url, ack["message_id"])] == ["final"]


async def test_takeover_tells_members_the_answer_starts_over(chatd_factory: Any, services: Services) -> None:
    a_srv: Chatd = chatd_factory(CHATD_ASSISTANT_JOB_LEASE_S="2", CHATD_ASSISTANT_OFFLINE_TOKENS_PER_S="3")
    alice, bob = make_users(services.database_url, 2)
    room = await make_room(a_srv, alice, [bob], kind="assistant")
    a = await connect(a_srv, alice)
    await join(a, room)
    ack = await send(a, room, "survive a crash of the instance answering")
    orphan = await a.expect("stream_start", room_id=room, timeout_s=15)
    # A second instance, started once the first runs the job; bob follows the stream from there.
    b_srv: Chatd = chatd_factory(CHATD_ASSISTANT_JOB_LEASE_S="2", CHATD_ASSISTANT_OFFLINE_TOKENS_PER_S="20")
    b = await connect(b_srv, bob)
    await join(b, room)
    await b.expect("stream_start", message_id=orphan["message_id"])  # the join's catch-up
    assert a_srv.proc is not None
    os.killpg(a_srv.proc.pid, signal.SIGKILL)
    _, orphan_end = await rest_of_stream(b, orphan["message_id"], timeout_s=30)
    assert orphan_end["stop_reason"] == "error" and orphan_end["seq"] == 0
    start, chunks, end = await stream_of(b, room, timeout_s=30)
    assert start["resumed"] is True and start["supersedes"] == orphan["message_id"]
    assert start["reply_to_message_id"] == ack["message_id"] and end["stop_reason"] == "end_turn"
    rows = answers(services.database_url, ack["message_id"])
    assert [(r[0], r[1]) for r in rows] == [(start["message_id"], "final")]
    assert rows[0][3] == "".join(c["content"] for c in chunks)


def sse_events(body: bytes) -> list[tuple[str, dict[str, Any]]]:
    return [
        (block.split("\n")[0][len("event: ") :], json.loads(block.split("\n")[1][len("data: ") :]))
        for block in body.decode().strip().split("\n\n")
    ]


async def test_sse_retry_reattaches_to_the_running_answer(chatd_factory: Any, services: Services) -> None:
    server: Chatd = chatd_factory(CHATD_ASSISTANT_OFFLINE_TOKENS_PER_S="10")
    (alice,) = make_users(services.database_url, 1)
    room = await make_room(server, alice, [], kind="assistant")
    path = f"/api/v1/rooms/{room}/messages/stream"
    send_body = {"content": "stream me, then lose the connection", "client_msg_id": "sse-1"}
    raw = json.dumps(send_body).encode()
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {alice.token}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(raw)}\r\n\r\n".encode()
        + raw
    )
    seen = b""
    while b"event: stream_chunk" not in seen:
        seen += await asyncio.wait_for(reader.read(65536), 15)
    writer.close()  # the client's connection drops mid-answer
    first = {
        name: json.loads(match)
        for name, match in re.findall(rb"event: (message|stream_start)\ndata: (\{.*?\})\n", seen)
        for name in [name.decode()]
    }
    prompt_id, answer_id = first["message"]["message_id"], first["stream_start"]["message_id"]

    r = await request("POST", server.http + path, send_body, alice.token)  # the retry: same client_msg_id
    events = sse_events(r.body)
    names = [e for e, _ in events]
    assert names[0] == "message" and events[0][1]["message_id"] == prompt_id
    assert "error" not in names and names[-1] == "stream_end"
    assert [d["message_id"] for e, d in events if e == "stream_start"] == [answer_id]  # the same answer
    chunks = [d for e, d in events if e == "stream_chunk"]
    indexes = [c["index"] for c in chunks]
    assert indexes == sorted(set(indexes)) and indexes[0] >= 0  # a catch-up chunk, then live ones
    end = events[-1][1]
    assert end["message_id"] == answer_id and end["stop_reason"] == "end_turn" and end["seq"] > 0
    rows = answers(services.database_url, prompt_id)
    assert [(r[0], r[1]) for r in rows] == [(answer_id, "final")]
    assert rows[0][3] == "".join(c["content"] for c in chunks)

    # Once answered, a retry gets the stored answer at once.
    r = await request("POST", server.http + path, send_body, alice.token)
    events = sse_events(r.body)
    assert [e for e, _ in events] == ["message", "stream_start", "stream_chunk", "stream_end"]
    assert events[2][1]["content"] == rows[0][3] and events[3][1]["seq"] == end["seq"]
