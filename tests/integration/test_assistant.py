"""The assistant end to end: real chatd processes, Postgres, Valkey; the offline provider."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
import uuid
from typing import Any

import psycopg
import pytest

from tests.chat import connect, join, make_room, send
from tests.conftest import Services
from tests.support import WS, Chatd, request
from tests.users import make_users

API = "/api/v1"
# ~3.5 s per answer (30-36 tokens): the window in which a test joins, cancels, queues behind or kills a running
# answer. At 20 tokens/s it was ~1.6 s after the chunk the test waits for, a stall a loaded 2-core CI can have:
# the answer then ends first and the test fails without any fault of chatd's.
SLOW = {"CHATD_ASSISTANT_OFFLINE_TOKENS_PER_S": "10"}


async def stream_of(
    ws: WS, room: int, timeout_s: float = 30
) -> tuple[dict[str, Any], list[dict[str, Any]], dict[str, Any]]:
    start = await ws.expect("stream_start", timeout_s=timeout_s, room_id=room)
    chunks: list[dict[str, Any]] = []
    while True:
        frame = await ws.expect_any(("stream_chunk", "stream_end"), timeout_s=timeout_s, message_id=start["message_id"])
        if frame["type"] == "stream_end":
            return start, chunks, frame
        chunks.append(frame)


def answers(database_url: str, prompt_id: int) -> list[tuple[Any, ...]]:
    with psycopg.connect(database_url) as conn:
        return conn.execute(
            "SELECT id, status, superseded_at IS NOT NULL, content FROM messages"
            " WHERE reply_to_id = %s AND role = 'assistant' ORDER BY id",
            (prompt_id,),
        ).fetchall()


@pytest.mark.smoke
async def test_answer_streams_to_members_on_two_instances(chatd_factory: Any, services: Services) -> None:
    a_srv: Chatd = chatd_factory()
    b_srv: Chatd = chatd_factory(workers=2)
    alice, bob = make_users(services.database_url, 2)
    room = await make_room(a_srv, alice, [bob], kind="assistant")
    a, b = await connect(a_srv, alice), await connect(b_srv, bob)
    await join(a, room)
    await join(b, room)
    ack = await send(a, room, "Tell me about chatd")
    queued = await b.expect("queued", room_id=room)
    assert queued["reply_to_message_id"] == ack["message_id"] and queued["position"] >= 1
    results = await asyncio.gather(stream_of(a, room), stream_of(b, room))
    for start, chunks, end in results:
        assert start["reply_to_message_id"] == ack["message_id"] and start["model"] == "offline"
        assert [c["index"] for c in chunks] == list(range(len(chunks)))  # consecutive from 0
        assert end["stop_reason"] == "end_turn" and end["seq"] == ack["seq"] + 1
        assert end["usage"]["output_tokens"] > 0 and end["latency_ms"] >= end["first_token_ms"] >= 0
    text_a = "".join(c["content"] for c in results[0][1])
    assert text_a == "".join(c["content"] for c in results[1][1])
    assert text_a.startswith("[offline assistant]") and "Tell me about chatd" in text_a
    final = await b.expect("message", room_id=room, seq=ack["seq"] + 1)
    assert final["role"] == "assistant" and final["content"] == text_a
    assert final["reply_to_message_id"] == ack["message_id"]
    assert [row[1:3] for row in answers(services.database_url, ack["message_id"])] == [("final", False)]


async def test_late_joiner_gets_text_so_far_then_live(chatd_factory: Any, services: Services) -> None:
    server: Chatd = chatd_factory(workers=2, **SLOW)
    alice, bob = make_users(services.database_url, 2)
    room = await make_room(server, alice, [bob], kind="assistant")
    a = await connect(server, alice)
    await join(a, room)
    await send(a, room, "a question that needs a long answer")
    await a.expect("stream_chunk", room_id=room, index=2, timeout_s=15, keep=True)
    b = await connect(server, bob)
    await join(b, room)
    start, chunks, end = await stream_of(b, room)
    assert chunks[0]["index"] >= 2  # the catch-up chunk: everything so far in one
    assert [c["index"] for c in chunks] == list(range(chunks[0]["index"], chunks[0]["index"] + len(chunks)))
    _, full_chunks, _ = await stream_of(a, room)
    assert "".join(c["content"] for c in chunks) == "".join(c["content"] for c in full_chunks)
    assert end["stop_reason"] == "end_turn" and start["message_id"] == end["message_id"]


@pytest.mark.smoke
async def test_cancel_keeps_partial_text(chatd_factory: Any, services: Services) -> None:
    server: Chatd = chatd_factory(workers=2, **SLOW)
    alice, bob = make_users(services.database_url, 2)
    room = await make_room(server, alice, [bob], kind="assistant")
    a, b = await connect(server, alice), await connect(server, bob)
    await join(a, room)
    await join(b, room)
    ack = await send(a, room, "please ramble on for a while")
    start = await a.expect("stream_start", room_id=room)
    await a.expect("stream_chunk", room_id=room, index=1, keep=True)
    await b.send({"type": "cancel", "message_id": start["message_id"], "id": "not-mine"})
    assert (await b.expect("error", reply_to="not-mine"))["code"] == "forbidden"
    asked = time.monotonic()
    await a.send({"type": "cancel", "message_id": start["message_id"]})
    end = await a.expect("stream_end", message_id=start["message_id"], timeout_s=10)
    took_s = time.monotonic() - asked
    assert end["stop_reason"] == "cancelled"
    assert took_s < 5  # the 500 ms target is measured in docs/BENCHMARKS.md, not asserted here
    final = await a.expect("message", room_id=room, seq=end["seq"])
    assert final["status"] == "cancelled" and final["content"].startswith("[offline")
    rows = answers(services.database_url, ack["message_id"])
    assert len(rows) == 1 and rows[0][1] == "cancelled" and rows[0][3] == final["content"]


async def test_cancel_while_queued(chatd_factory: Any, services: Services) -> None:
    # The first answer must outlast the steps up to Alice's cancel (about 0.5 s, 3 s seen on a loaded CI box), or
    # the second starts and the cancel finds it running, not queued: 4 tokens/s makes it about 8 s.
    server: Chatd = chatd_factory(CHATD_ASSISTANT_PER_USER_CONCURRENCY="1", CHATD_ASSISTANT_OFFLINE_TOKENS_PER_S="4")
    other: Chatd = chatd_factory()
    alice, bob = make_users(services.database_url, 2)
    room = await make_room(server, alice, [bob], kind="assistant")
    a, b = await connect(server, alice), await connect(other, bob)
    await join(a, room)
    await join(b, room)
    await send(a, room, "first")
    second = await send(a, room, "second")
    await b.expect("queued", room_id=room, reply_to_message_id=second["message_id"])
    # Only the prompt's author, the room owner (Alice is both) or an admin may cancel it: Bob's cancel finds
    # nothing to cancel (not_found, PROTOCOL.md §3), and the answer stays queued.
    await b.send({"type": "cancel", "message_id": second["message_id"], "id": "not-mine"})
    assert (await b.expect("error", reply_to="not-mine"))["code"] == "not_found"
    await a.send({"type": "cancel", "message_id": second["message_id"], "id": "c"})
    # Every member, on every instance, learns that the queued answer will not come.
    for ws in (a, b):
        gone = await ws.expect("cancelled", room_id=room)
        assert gone["reply_to_message_id"] == second["message_id"]
    first_end = await stream_of(a, room)
    assert first_end[2]["stop_reason"] == "end_turn"
    with pytest.raises(asyncio.TimeoutError):
        await a.expect("stream_start", room_id=room, timeout_s=3)
    assert answers(services.database_url, second["message_id"]) == []


async def test_regenerate_supersedes(chatd: Chatd, services: Services) -> None:
    (alice,) = make_users(services.database_url, 1)
    room = await make_room(chatd, alice, [], kind="assistant")
    a = await connect(chatd, alice)
    await join(a, room)
    ack = await send(a, room, "hello")
    first = (await stream_of(a, room))[2]
    await a.send({"type": "regenerate", "message_id": first["message_id"], "id": "r"})
    second = (await stream_of(a, room))[2]
    assert second["message_id"] != first["message_id"] and second["seq"] == first["seq"] + 1
    rows = answers(services.database_url, ack["message_id"])
    assert [(r[0], r[2]) for r in rows] == [(first["message_id"], True), (second["message_id"], False)]
    await a.send({"type": "regenerate", "message_id": first["message_id"], "id": "r2"})
    assert (await a.expect("error", reply_to="r2"))["code"] == "conflict"
    await a.send({"type": "regenerate", "message_id": ack["message_id"], "id": "r3"})
    assert (await a.expect("error", reply_to="r3"))["code"] == "bad_request"


async def test_busy_and_quota(chatd_factory: Any, services: Services) -> None:
    server: Chatd = chatd_factory(
        CHATD_ASSISTANT_QUEUE_MAX_DEPTH="1",
        CHATD_ASSISTANT_PER_USER_CONCURRENCY="1",
        CHATD_ASSISTANT_CONCURRENCY="1",
        **SLOW,
    )
    alice, bob = make_users(services.database_url, 2)
    room = await make_room(server, alice, [bob], kind="assistant")
    a = await connect(server, alice)
    await join(a, room)
    await send(a, room, "one")  # runs
    await a.expect("stream_start", room_id=room)
    await send(a, room, "two")  # waits: depth 1
    cmid = uuid.uuid4().hex
    await a.send({"type": "send", "room_id": room, "content": "three", "client_msg_id": cmid, "id": cmid})
    ack = await a.expect("ack", reply_to=cmid)
    busy = await a.expect("error", reply_to=cmid)
    assert busy["code"] == "busy" and ack["seq"] > 0  # stored and acked; only the answer is refused

    quota: Chatd = chatd_factory(CHATD_ASSISTANT_DAILY_TOKEN_BUDGET="10")
    room2 = await make_room(quota, bob, [], kind="assistant")
    b = await connect(quota, bob)
    await join(b, room2)
    await send(b, room2, "spend my budget")
    await stream_of(b, room2)
    cmid = uuid.uuid4().hex
    await b.send({"type": "send", "room_id": room2, "content": "more", "client_msg_id": cmid, "id": cmid})
    await b.expect("ack", reply_to=cmid)
    assert (await b.expect("error", reply_to=cmid))["code"] == "quota_exceeded"


async def test_mention_mode_in_group_rooms(chatd: Chatd, services: Services) -> None:
    alice, bob = make_users(services.database_url, 2)
    r = await request(
        "POST",
        chatd.http + API + "/rooms",
        {"name": "g", "kind": "group", "members": [bob.id], "assistant": {"mode": "mention"}},
        alice.token,
    )
    room = r.body["id"]
    a = await connect(chatd, alice)
    await join(a, room)
    await send(a, room, "just chatting")
    with pytest.raises(asyncio.TimeoutError):
        await a.expect("stream_start", room_id=room, timeout_s=1.5)
    await send(a, room, "@assistant what do you think?")
    _, _, end = await stream_of(a, room)
    assert end["stop_reason"] == "end_turn"


async def test_sse_endpoint_and_sockets_see_the_same_stream(chatd: Chatd, services: Services) -> None:
    alice, bob = make_users(services.database_url, 2)
    room = await make_room(chatd, alice, [bob], kind="assistant")
    b = await connect(chatd, bob)
    await join(b, room)
    r = await request(
        "POST",
        f"{chatd.http}{API}/rooms/{room}/messages/stream",
        {"content": "stream me", "client_msg_id": "s1"},
        alice.token,
    )
    assert r.status == 200 and r.headers["Content-Type"].startswith("text/event-stream")
    events = [
        (block.split("\n")[0][len("event: ") :], json.loads(block.split("\n")[1][len("data: ") :]))
        for block in r.body.decode().strip().split("\n\n")
    ]
    names = [e for e, _ in events]
    assert names[0] == "message" and "stream_start" in names and names[-1] == "stream_end"
    chunks = [d for e, d in events if e == "stream_chunk"]
    assert [c["index"] for c in chunks] == list(range(len(chunks)))
    _, socket_chunks, end = await stream_of(b, room)
    assert [c["content"] for c in socket_chunks] == [c["content"] for c in chunks]
    assert events[-1][1]["message_id"] == end["message_id"]


async def test_worker_killed_mid_job_answer_completed_elsewhere_once(chatd_factory: Any, services: Services) -> None:
    server: Chatd = chatd_factory(workers=2, CHATD_ASSISTANT_JOB_LEASE_S="2", CHATD_SERVER_REUSE_PORT="true", **SLOW)
    (alice,) = make_users(services.database_url, 1)
    room = await make_room(server, alice, [], kind="assistant")
    # Follow the stream from a socket on whichever worker; the job may run on either.
    a = await connect(server, alice)
    await join(a, room)
    ack = await send(a, room, "survive a crash")
    start = await a.expect("stream_start", room_id=room)
    await a.expect("stream_chunk", message_id=start["message_id"], index=1)
    started = [e for e in server.events("generation_started") if e["message_id"] == start["message_id"]]
    assert len(started) == 1
    victim = started[0]["pid"]
    os.kill(victim, signal.SIGKILL)
    # The socket may have been on the killed worker; the database and a fresh socket tell the outcome.
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not any(
        r[1] == "final" for r in answers(services.database_url, ack["message_id"])
    ):
        await asyncio.sleep(0.2)
    rows = answers(services.database_url, ack["message_id"])
    assert len(rows) == 1 and rows[0][1] == "final"
    assert rows[0][0] != start["message_id"]  # a new attempt, by the other worker
    taken = server.events("generation_taken_over")
    assert taken and taken[0]["orphan_message_id"] == start["message_id"] and taken[0]["pid"] != victim
    b = await WS.connect(server.ws, alice.token)
    await b.expect("hello")
    await join(b, room, since_seq=ack["seq"])
    answer = await b.expect("message", room_id=room, role="assistant")
    assert answer["message_id"] == rows[0][0]


async def test_cancel_reaches_an_answer_running_on_another_instance(chatd_factory: Any, services: Services) -> None:
    """The answer runs on A (B is started after A claimed it); the cancel comes from the same user's socket on
    B, so only the control channel (or the durable cancel flag) can carry it to A."""
    crawl = {"CHATD_ASSISTANT_OFFLINE_TOKENS_PER_S": "1"}  # ~33 s per answer: B starts in time on a busy machine
    a_srv: Chatd = chatd_factory(**crawl)
    b_srv: Chatd = chatd_factory(start=False, **crawl)
    (alice,) = make_users(services.database_url, 1)
    room = await make_room(a_srv, alice, [], kind="assistant")
    a = await connect(a_srv, alice)
    await join(a, room)
    await send(a, room, "please ramble on for a while")
    start = await a.expect("stream_start", room_id=room)
    await asyncio.to_thread(b_srv.start)
    b = await connect(b_srv, alice)
    await join(b, room)
    asked = time.monotonic()
    await b.send({"type": "cancel", "message_id": start["message_id"], "id": "c"})
    end = await a.expect("stream_end", message_id=start["message_id"], timeout_s=30)
    took_s = time.monotonic() - asked
    assert end["stop_reason"] == "cancelled", (end, took_s)
    assert took_s < 5, took_s
