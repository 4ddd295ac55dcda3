"""The message core under faults, from outside: real chatd processes, real Postgres and Valkey.

Each test breaks something (a PUBLISH refused, Valkey killed, Postgres paused,
an instance SIGKILLed, SIGTERM mid-burst, a consumer that stops reading) and
checks that the core's promise still holds: every acknowledged message is
stored and reaches every member exactly once, in order, and every send gets
an answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import signal
import socket
import time
import uuid
from typing import Any

import psycopg
import pytest
from tornado.httpclient import HTTPClientError

from chatd.process.embedded import EmbeddedPostgres, EmbeddedValkey
from tests.chat import API, collect_messages, connect, join, make_room, send, send_many
from tests.conftest import Services
from tests.faults import kill_valkey, paused, publish_refused, scripts_refused
from tests.support import WS, Chatd, http_get, request
from tests.users import make_users

pytestmark = pytest.mark.slow

UNLIMITED = {"CHATD_WS_SEND_RATE_COUNT": "1000000"}


# Fault injectors: tests/faults.py; a Postgres or Valkey of one test alone: own_postgres / own_valkey.


# -- item 1 and 3: nothing committed is ever skipped, even with every publish lost ------------


async def test_lost_publish_in_a_quiet_room_reaches_the_other_instance(chatd_factory: Any, services: Services) -> None:
    a_srv: Chatd = chatd_factory(CHATD_WS_PROBE_INTERVAL_S="0.5")
    b_srv: Chatd = chatd_factory(CHATD_WS_PROBE_INTERVAL_S="0.5")
    alice, bob = make_users(services.database_url, 2)
    room = await make_room(a_srv, alice, [bob])
    a, b = await connect(a_srv, alice), await connect(b_srv, bob)
    await join(a, room)
    await join(b, room)
    first = await send(a, room, "before")
    assert (await b.expect("message", room_id=room))["seq"] == first["seq"]

    with publish_refused(services.redis_url):
        ack = await send(a, room, "published into the void")
        assert ack["type"] == "ack"
        started = time.monotonic()
        got = await b.expect("message", room_id=room, timeout_s=5)  # nothing else is sent meanwhile
        waited_s = time.monotonic() - started
        assert got["seq"] == ack["seq"] and got["content"] == "published into the void"
        assert waited_s < 2.5, waited_s  # the promise: within 2 s (+ slack for a loaded test machine)

        # Edits and deletes whose publish is lost arrive too.
        await a.send({"type": "edit", "message_id": ack["message_id"], "content": "edited unseen", "id": "e"})
        upd = await b.expect("message_updated", message_id=ack["message_id"], timeout_s=5)
        assert upd["content"] == "edited unseen"
        await a.send({"type": "delete", "message_id": first["message_id"], "id": "d"})
        gone = await b.expect("message_deleted", message_id=first["message_id"], timeout_s=5)
        assert gone["seq"] == first["seq"]

    after = await send(a, room, "after")
    got = await b.expect("message", room_id=room)
    assert got["seq"] == after["seq"] == ack["seq"] + 1  # once each: the repaired one is not delivered again
    with pytest.raises(TimeoutError):
        await b.expect("message", room_id=room, timeout_s=1)


async def test_valkey_killed_under_load_loses_nothing(
    chatd_factory: Any, services: Services, own_valkey: EmbeddedValkey
) -> None:
    """Two instances on a Valkey of their own, killed and restarted while 12 sockets chat."""
    valkey = own_valkey
    redis_url = valkey.url
    env = {**UNLIMITED, "REDIS_URL": redis_url, "CHATD_WS_PROBE_INTERVAL_S": "0.5"}
    servers: list[Chatd] = []
    try:
        servers = [chatd_factory(**env), chatd_factory(**env)]
        users = make_users(services.database_url, 12)
        rooms = [await make_room(servers[0], users[i], users[i + 1 : i + 4]) for i in (0, 4, 8)]
        sockets: list[tuple[WS, int]] = []
        for i, user in enumerate(users):
            ws = await connect(servers[i % 2], user)
            room = rooms[i // 4]
            await join(ws, room)
            sockets.append((ws, room))

        acked: dict[int, set[int]] = {room: set() for room in rooms}
        stop = asyncio.Event()

        async def chat(ws: WS, room: int) -> None:
            while not stop.is_set():
                cmid = uuid.uuid4().hex
                await ws.send({"type": "send", "room_id": room, "content": cmid, "client_msg_id": cmid, "id": cmid})
                reply = await ws.expect_any(("ack", "error"), timeout_s=30, reply_to=cmid)
                if reply["type"] == "ack":
                    acked[room].add(reply["seq"])
                await asyncio.sleep(0.05)

        talkers = [asyncio.ensure_future(chat(ws, room)) for ws, room in sockets]
        await asyncio.sleep(2)
        kill_valkey(valkey)
        await asyncio.sleep(1.5)
        valkey.start()  # same socket path: both instances reconnect
        await asyncio.sleep(3)
        stop.set()
        await asyncio.gather(*talkers)

        # Every socket receives every message of its room exactly once, in order, from its join on.
        for ws, room in sockets:
            last = max(acked[room])
            seqs: list[int] = []
            deadline = time.monotonic() + 10  # repaired within seconds, not minutes
            with contextlib.suppress(TimeoutError):
                while not seqs or seqs[-1] < last:
                    remaining_s = max(0.1, deadline - time.monotonic())
                    seqs.append((await ws.expect("message", room_id=room, timeout_s=remaining_s))["seq"])
            missing = sorted(set(range(1, last + 1)) - set(seqs))
            assert seqs == list(range(1, last + 1)), f"room {room}: {len(seqs)} received, missing {missing[:20]}"
    finally:
        for server in servers:
            server.stop()


# -- item 2: a failing socket write closes that socket, never the worker's writer ----------------


async def test_writer_survives_a_slow_compressed_consumer(chatd_factory: Any, services: Services) -> None:
    server: Chatd = chatd_factory(CHATD_WS_COMPRESSION="true", CHATD_WS_MAX_BUFFER_BYTES="65536", **UNLIMITED)
    alice, bob, slow = make_users(services.database_url, 3)
    room = await make_room(server, alice, [bob, slow])
    a, b = await connect(server, alice), await connect(server, bob)
    await join(a, room)
    await join(b, room)
    # A raw socket that negotiates permessage-deflate, joins, then never reads.
    raw = socket.socket()
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    raw.connect(("127.0.0.1", server.port))
    raw.sendall(
        (
            "GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
            "Sec-WebSocket-Extensions: permessage-deflate\r\n"
            f"Authorization: Bearer {slow.token}\r\n\r\n"
        ).encode()
    )
    assert b"permessage-deflate" in raw.recv(4096)
    join_frame = json.dumps({"type": "join", "room_id": room}).encode()
    raw.sendall(bytes([0x81, 0x80 | len(join_frame)]) + b"\x00\x00\x00\x00" + join_frame)
    await a.expect_presence(slow.id, "online")  # its join was served: it is a member socket of the room
    # Random text deflates little: up to ~7 MB, past the kernel buffers and the 64 KiB bound. The sends stop
    # 200 messages after the slow socket was closed (the writer carries on past it), not at a fixed count.
    count = 2500
    contents = [secrets.token_urlsafe(2900) for _ in range(count)]
    expected: list[int] = []  # how many messages b is to read, once known

    async def receive() -> list[dict[str, Any]]:
        got: list[dict[str, Any]] = []
        while not expected or len(got) < expected[0]:
            got.append(await b.expect("message", timeout_s=60, room_id=room))
        return got

    receiving = asyncio.ensure_future(receive())
    acks: list[dict[str, Any]] = []
    closed_after: int | None = None  # acks when the close was first seen in the log
    for i in range(0, count, 100):  # alice reads her own echoes between bursts: only `slow` lags
        acks += await send_many(a, room, contents[i : i + 100])
        a.backlog = [f for f in a.backlog if f["type"] != "message"]
        if closed_after is None and "slow_consumer_closed" in server.log():
            closed_after = len(acks)
        if closed_after is not None and len(acks) >= closed_after + 200:
            break
    assert all(x["type"] == "ack" for x in acks)
    assert "slow_consumer_closed" in server.log()
    sent = len(acks)
    expected.append(sent + 1)  # and the one below
    later = await send(a, room, "the writer still commits")
    assert later["type"] == "ack"
    got = await receiving
    assert [m["seq"] for m in got] == list(range(1, sent + 2))
    print(f"the slow socket closed by {closed_after} messages; {sent} sent")
    status, body = http_get(server.http + "/health/ready")
    assert status == 200, body
    raw.close()


# -- item 4: SIGTERM answers every send it read before closing -------------------------------------


async def test_sigterm_acks_every_send_it_read(chatd_factory: Any, services: Services) -> None:
    server: Chatd = chatd_factory(**UNLIMITED)
    (alice,) = make_users(services.database_url, 1)
    room = await make_room(server, alice, [])
    ws = await connect(server, alice)
    await join(ws, room)
    ids = [f"s{i:05d}" for i in range(3000)]
    # One burst, framed here (masked with a zero key): at SIGTERM many sends are read but not yet acked.
    burst = b"".join(
        _client_frame(json.dumps({"type": "send", "room_id": room, "content": c, "client_msg_id": c, "id": c}))
        for c in ids
    )
    assert ws.conn.stream is not None
    writing = asyncio.ensure_future(ws.conn.stream.write(burst))
    await ws.expect("ack", timeout_s=10, keep=True)  # sends are flowing
    server.signal(signal.SIGTERM)
    answered: dict[str, str] = {}
    while True:
        frame = await ws.recv(timeout_s=30)
        if frame is None:
            break
        if frame["type"] in ("ack", "error") and frame.get("reply_to") in ids:
            answered[frame["reply_to"]] = frame["type"] if frame["type"] == "ack" else frame["code"]
    with contextlib.suppress(Exception):  # the server stopped reading, then closed
        await writing
    assert ws.conn.close_code == 1001
    with psycopg.connect(services.database_url) as conn:
        stored = {r[0] for r in conn.execute("SELECT client_msg_id FROM messages WHERE room_id = %s", (room,))}
    acked = {cmid for cmid, what in answered.items() if what == "ack"}
    assert stored, "some sends were committed before the shutdown"
    assert stored == acked, f"{len(stored)} stored, {len(acked)} acked"
    assert all(what in ("ack", "unavailable") for what in answered.values())
    assert server.proc is not None and server.proc.wait(30) == 0


def _client_frame(text: str) -> bytes:
    payload = text.encode()
    n = len(payload)
    head = bytes([0x81, 0x80 | n]) if n < 126 else bytes([0x81, 0x80 | 126]) + n.to_bytes(2, "big")
    return head + b"\x00\x00\x00\x00" + payload


# -- item 5: presence of a dead instance heals by itself ---------------------------------------------


async def test_presence_of_a_killed_instance_goes_offline(chatd_factory: Any, services: Services) -> None:
    fast = {"CHATD_WS_PRESENCE_TTL_S": "3", "CHATD_WS_PRESENCE_GRACE_S": "0.5"}
    a_srv: Chatd = chatd_factory(**fast)
    b_srv: Chatd = chatd_factory(**fast)
    alice, bob = make_users(services.database_url, 2)
    room = await make_room(a_srv, alice, [bob])
    a = await connect(a_srv, alice)
    await join(a, room)
    b = await connect(b_srv, bob)
    await join(b, room)
    await a.expect_presence(bob.id, "online")

    assert b_srv.proc is not None
    os.killpg(b_srv.proc.pid, signal.SIGKILL)  # the whole instance, without a goodbye
    started = time.monotonic()
    await a.expect_presence(bob.id, "offline", timeout_s=20)
    assert time.monotonic() - started < 3 + 0.5 + 1 + 3  # TTL + grace + a heartbeat + slack
    b.close()

    # The counts healed: bob comes back on the live instance and leaves again, both are announced.
    b2 = await connect(a_srv, bob)
    joined = await join(b2, room)
    assert bob.id in joined["online"]
    await a.expect_presence(bob.id, "online")
    await b2.send({"type": "leave", "room_id": room})
    await a.expect_presence(bob.id, "offline", timeout_s=15)  # grace 0.5 s


# -- issue 17, item 6: presence heals after a lost frame, a failed final flush ------------------------


async def test_presence_view_heals_after_lost_presence_frames(chatd_factory: Any, services: Services) -> None:
    """A's presence frames are lost (PUBLISH refused): B's sockets and B's next joiners still learn."""
    fast = {"CHATD_WS_PRESENCE_GRACE_S": "0.5", "CHATD_WS_PROBE_INTERVAL_S": "0.5"}
    a_srv: Chatd = chatd_factory(**fast)
    b_srv: Chatd = chatd_factory(**fast)
    alice, bob, carol = make_users(services.database_url, 3)
    room = await make_room(a_srv, alice, [bob, carol])
    b = await connect(b_srv, bob)
    await join(b, room)

    with publish_refused(services.redis_url):
        a = await connect(a_srv, alice)
        await join(a, room)  # alice comes online on A: A announces it, the PUBLISH is refused
        online_s = await _presence_within(b, alice.id, "online", 5)
        c = await connect(b_srv, carol)
        fresh = await join(c, room)  # a fresh join on B: its `joined.online` comes from B's view
        await a.send({"type": "leave", "room_id": room})
        offline_s = await _presence_within(b, alice.id, "offline", 5)  # grace 0.5 s; lost if A announces it
        c2 = await connect(b_srv, carol)
        later = await join(c2, room)
    print(f"\nhealed on B: online after {online_s} s, offline after {offline_s} s (grace 0.5 s)")
    assert online_s is not None and alice.id in fresh["online"], (
        f"B's socket got alice online: {online_s is not None}; B's fresh join saw {fresh['online']}"
    )
    assert offline_s is not None and alice.id not in later["online"], (
        f"B's socket got alice offline: {offline_s is not None}; B's later join saw {later['online']}"
    )
    assert online_s < 0.5 + 0.5 + 1.5, online_s  # a probe interval + a tick + slack
    assert offline_s < 0.5 + 0.5 + 0.5 + 1.5, offline_s  # the grace + a due check + a probe interval + slack


async def _presence_within(ws: WS, user_id: int, status: str, timeout_s: float) -> float | None:
    started = time.monotonic()
    try:
        await ws.expect_presence(user_id, status, timeout_s=timeout_s)
    except TimeoutError:
        return None
    return round(time.monotonic() - started, 2)


async def test_presence_of_a_failed_final_flush_goes_offline(chatd_factory: Any, services: Services) -> None:
    """A's shutdown cannot write its presence (scripts refused while it stops): its users still go offline."""
    fast = {"CHATD_WS_PRESENCE_TTL_S": "3", "CHATD_WS_PRESENCE_GRACE_S": "0.5"}
    a_srv: Chatd = chatd_factory(**fast)
    b_srv: Chatd = chatd_factory(**fast)
    alice, bob = make_users(services.database_url, 2)
    room = await make_room(a_srv, alice, [bob])
    b = await connect(b_srv, bob)
    await join(b, room)
    a = await connect(a_srv, alice)
    await join(a, room)
    await b.expect_presence(alice.id, "online")

    assert a_srv.proc is not None
    with scripts_refused(services.redis_url):  # every presence script of A's shutdown fails
        signalled = time.monotonic()
        a_srv.signal(signal.SIGTERM)
        assert await asyncio.to_thread(a_srv.proc.wait, 30) == 0
    stopped = time.monotonic()
    assert a_srv.events("presence_retire_failed"), "the final presence write did fail"
    await b.expect_presence(alice.id, "offline", timeout_s=20)
    offline_s = time.monotonic() - stopped
    print(
        f"\nalice offline {offline_s:.2f} s after A stopped, {time.monotonic() - signalled:.2f} s after its"
        " SIGTERM (TTL 3 s, grace 0.5 s)"
    )
    assert offline_s < 3 + 0.5 + 1 + 3  # TTL + grace + a heartbeat + slack


# -- item 6: a hung Postgres answers 'unavailable', never silence ----------------------------------


async def test_paused_postgres_gives_unavailable_not_silence(
    chatd_factory: Any, own_postgres: tuple[EmbeddedPostgres, str]
) -> None:
    pg, url = own_postgres
    server: Chatd = chatd_factory(database_url=url, CHATD_STORAGE_PG_QUERY_TIMEOUT_S="1.5")
    (alice,) = make_users(url, 1)
    room = await make_room(server, alice, [])
    ws = await connect(server, alice)
    await join(ws, room)
    assert (await send(ws, room, "before"))["type"] == "ack"

    with paused(pg):
        started = time.monotonic()
        reply = await send(ws, room, "while paused")
        assert reply["type"] == "error" and reply["code"] == "unavailable"
        assert time.monotonic() - started < 4
        started = time.monotonic()
        rest = await request("GET", f"{server.http}{API}/rooms", token=alice.token)
        assert rest.status == 503 and rest.body["error"]["code"] == "unavailable"
        assert time.monotonic() - started < 4
        status, _ = http_get(server.http + "/health/ready", timeout_s=5)
        assert status == 503
        started = time.monotonic()
        with pytest.raises(HTTPClientError) as refused:  # a handshake: refused in bounded time, not hung
            await WS.connect(server.ws, alice.token)
        assert refused.value.code == 503 and time.monotonic() - started < 4

    deadline = time.monotonic() + 30  # connections that were cut by the deadline are replaced
    after = await send(ws, room, "after")
    while after["type"] != "ack" and time.monotonic() < deadline:
        await asyncio.sleep(0.25)
        after = await send(ws, room, "after")
    assert after["type"] == "ack"
    with psycopg.connect(url) as conn:
        seqs = [r[0] for r in conn.execute("SELECT seq FROM messages WHERE room_id = %s ORDER BY seq", (room,))]
    assert seqs == list(range(1, len(seqs) + 1))  # gap-free, whatever landed


# -- item 7: bounded queues; over the bound a send gets 'busy', nothing is lost ---------------------


async def test_full_commit_queue_answers_busy_and_loses_nothing(
    chatd_factory: Any, own_postgres: tuple[EmbeddedPostgres, str]
) -> None:
    pg, url = own_postgres
    server: Chatd = chatd_factory(
        database_url=url, CHATD_WS_SEND_QUEUE_MAX="20", CHATD_STORAGE_PG_QUERY_TIMEOUT_S="10", **UNLIMITED
    )
    users = make_users(url, 3)
    room = await make_room(server, users[0], users[1:])
    sockets = [await connect(server, u) for u in users]
    for ws in sockets:
        await join(ws, room)
    with paused(pg):  # commits stall: the queue fills up
        sending = [asyncio.ensure_future(send_many(ws, room, [f"m{i}" for i in range(30)])) for ws in sockets]
        await asyncio.sleep(2)
    replies = [r for batch in await asyncio.gather(*sending) for r in batch]
    busy = [r for r in replies if r["type"] == "error" and r["code"] == "busy"]
    acks = [r for r in replies if r["type"] == "ack"]
    assert busy and all(r["retry_after_ms"] > 0 for r in busy)
    assert len(acks) + len(busy) == len(replies) == 90
    with psycopg.connect(url) as conn:
        stored = {r[0] for r in conn.execute("SELECT client_msg_id FROM messages WHERE room_id = %s", (room,))}
    assert stored == {r["client_msg_id"] for r in acks}  # acked = stored; a busy send was not stored


async def test_a_socket_at_its_pending_bound_is_not_read_until_acks_return(
    chatd_factory: Any, own_postgres: tuple[EmbeddedPostgres, str]
) -> None:
    pg, url = own_postgres
    server: Chatd = chatd_factory(
        database_url=url, CHATD_WS_MAX_PENDING_SENDS="5", CHATD_STORAGE_PG_QUERY_TIMEOUT_S="10", **UNLIMITED
    )
    (alice,) = make_users(url, 1)
    room = await make_room(server, alice, [])
    ws = await connect(server, alice)
    await join(ws, room)
    with paused(pg):
        sending = asyncio.ensure_future(send_many(ws, room, [f"m{i}" for i in range(50)]))
        await asyncio.sleep(1.5)
        metrics = (await request("GET", server.http + "/metrics")).body
        assert isinstance(metrics, bytes)
        prefix = 'chatd_ws_frames_received_total{type="send"}'
        frames = [line for line in metrics.decode().splitlines() if line.startswith(prefix)]
        read = float(frames[0].split()[-1]) if frames else 0.0
        assert read <= 6, f"the server read {read} sends of a socket at its bound"
    replies = await sending
    assert [r["type"] for r in replies] == ["ack"] * 50
    assert [r["seq"] for r in replies] == list(range(1, 51))


async def test_commits_overlap_under_a_backlog_and_seqs_stay_gap_free(chatd_factory: Any, services: Services) -> None:
    """A full batch waiting behind a slow transaction starts another one (ws.commit_concurrency), on rooms no
    running transaction holds: seqs stay gap-free and a socket's sends to a room keep their order."""
    server: Chatd = chatd_factory(
        CHATD_WS_BATCH_MAX_MESSAGES="3",
        CHATD_WS_COMMIT_CONCURRENCY="3",
        CHATD_STORAGE_PG_QUERY_TIMEOUT_S="20",
        **UNLIMITED,
    )
    users = make_users(services.database_url, 4)
    rooms = sorted([await make_room(server, users[0], users[1:]) for _ in range(12)])
    sockets = [await connect(server, u) for u in users]
    for ws in sockets:
        for room in rooms:
            await join(ws, room)
    plan = {k: [(rooms[i % len(rooms)], f"u{k}-{i:02d}") for i in range(36)] for k in range(len(sockets))}
    waiting = 0
    # The probe in autocommit: pg_stat_activity is read once per transaction.
    with (
        psycopg.connect(services.database_url) as holder,
        psycopg.connect(services.database_url, autocommit=True) as probe,
    ):
        # An outside transaction holds every room's row: each commit transaction waits on the lock.
        holder.execute("SELECT 1 FROM rooms WHERE id = ANY(%s) ORDER BY id FOR UPDATE", (rooms,))
        for k, ws in enumerate(sockets):
            for room, cmid in plan[k]:
                await ws.send({"type": "send", "room_id": room, "content": cmid, "client_msg_id": cmid, "id": cmid})
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and waiting < 3:
            row = probe.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                " AND wait_event_type = 'Lock' AND query LIKE '%chatd_commit_messages%'"
            ).fetchone()
            waiting = max(waiting, int(row[0]) if row else 0)
            await asyncio.sleep(0.1)
        holder.rollback()  # the lock goes; the waiting transactions commit
    assert waiting == 3, f"{waiting} commit transactions in flight behind the lock (ws.commit_concurrency 3)"
    seqs: dict[int, list[int]] = {room: [] for room in rooms}
    for k, ws in enumerate(sockets):
        mine: dict[int, list[int]] = {room: [] for room in rooms}
        for room, cmid in plan[k]:
            reply = await ws.expect_any(("ack", "error"), timeout_s=30, reply_to=cmid)
            assert reply["type"] == "ack", reply
            mine[room].append(reply["seq"])
        for room in rooms:
            assert mine[room] == sorted(mine[room]), "a socket's sends to a room keep their order"
            seqs[room] += mine[room]
    for room in rooms:
        assert sorted(seqs[room]) == list(range(1, 13)), "12 sends per room, seqs 1..12 without gap or repeat"
        for ws in sockets:
            got = [m["seq"] for m in await collect_messages(ws, room, 12)]
            assert got == list(range(1, 13)), "every member gets every message once, in seq order"
