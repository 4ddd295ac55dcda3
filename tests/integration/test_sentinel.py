"""Redis Sentinel: chatd finds the primary through the sentinels and follows a failover.

A real Sentinel set (tests/sentinel.py: a primary, a replica and three
sentinels, all valkey-server on loopback).  The failover test runs two chatd
instances on it under a chat load, SIGKILLs the primary, and checks the
promise of the message core: every acknowledged message is stored and reaches
every member exactly once, in order.  It prints the figures quoted in
docs/DEPLOY.md (section "Redis high availability"):

    .venv/bin/python -m pytest -s tests/integration/test_sentinel.py -k failover
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import psycopg
import pytest

from tests.chat import connect, join, make_room
from tests.conftest import Services
from tests.integration.test_cli import chatd_cli, one_line_error
from tests.sentinel import MASTER, SentinelSet
from tests.support import JWT_SECRET, WS, Chatd, http_get
from tests.users import make_users

pytestmark = pytest.mark.slow


@pytest.fixture
def sentinels(tmp_path: Path) -> Iterator[SentinelSet]:
    valkeys = SentinelSet(tmp_path / "sentinel").start()
    try:
        yield valkeys
    finally:
        valkeys.stop()


def test_check_config_connects_through_sentinel(sentinels: SentinelSet, services: Services, tmp_path: Path) -> None:
    env = {"JWT_SECRET": JWT_SECRET, "DATABASE_URL": services.database_url, "REDIS_URL": sentinels.url}
    ok = chatd_cli("check-config", "--connect", env=env)
    assert ok.returncode == 0, ok.stderr
    assert f"redis: ok, connected to {sentinels.url}/0, primary 127.0.0.1:{sentinels.nodes[0].port}" in ok.stderr

    wrong_name = sentinels.url.replace(f"/{MASTER}", "/nosuchmaster")
    bad = chatd_cli("check-config", "--connect", env={**env, "REDIS_URL": wrong_name})
    line = one_line_error(bad)
    assert bad.returncode == 1 and "no Redis primary found through Sentinel" in line and "REDIS_URL" in line

    unparsable = chatd_cli("check-config", env={**env, "REDIS_URL": "sentinel://127.0.0.1:26379"})
    assert unparsable.returncode == 2 and "storage.redis_url: names no master" in one_line_error(unparsable)


async def test_failover_under_chat_load_loses_nothing(
    sentinels: SentinelSet, chatd_factory: Any, services: Services
) -> None:
    # (sentinels first: set up before chatd_factory, so torn down after the chatd instances stopped)
    env = {
        "REDIS_URL": sentinels.url,
        "CHATD_WS_SEND_RATE_COUNT": "1000000",
        "CHATD_WS_PROBE_INTERVAL_S": "0.5",
        "CHATD_STORAGE_REDIS_TIMEOUT_S": "1",
        "CHATD_WS_PRESENCE_TTL_S": "6",  # a heartbeat every 2 s: proof below that chatd writes to the new primary
    }
    servers: list[Chatd] = [chatd_factory(**env), chatd_factory(**env)]
    users = make_users(services.database_url, 12)
    rooms = [await make_room(servers[0], users[i], users[i + 1 : i + 4]) for i in (0, 4, 8)]
    sockets: list[tuple[WS, int]] = []
    for i, user in enumerate(users):
        ws = await connect(servers[i % 2], user)
        await join(ws, rooms[i // 4])
        sockets.append((ws, rooms[i // 4]))

    acked: dict[str, tuple[int, int, float]] = {}  # client_msg_id -> (room, seq, acked at)
    refused: dict[str, int] = {}  # error code -> count (a send may be refused, never lost)
    received: list[dict[int, float]] = [{} for _ in sockets]  # per socket: seq -> first received at
    order_ok = [True] * len(sockets)
    replies: list[dict[str, asyncio.Future[dict[str, Any]]]] = [{} for _ in sockets]
    stop = asyncio.Event()

    async def read(n: int, ws: WS, room: int) -> None:
        """The socket's one reader: messages are recorded, replies handed to the sender."""
        last = 0
        while True:
            frame = await ws.recv(timeout_s=60)
            if frame is None:
                return
            if frame["type"] == "message" and frame["room_id"] == room:
                seq = frame["seq"]
                order_ok[n] = order_ok[n] and seq == last + 1
                last = seq
                received[n].setdefault(seq, time.monotonic())
            elif frame["type"] in ("ack", "error") and frame.get("reply_to") in replies[n]:
                replies[n].pop(frame["reply_to"]).set_result(frame)

    async def chat(n: int, ws: WS, room: int) -> None:
        while not stop.is_set():
            cmid = uuid.uuid4().hex
            replies[n][cmid] = answer = asyncio.get_running_loop().create_future()
            await ws.send({"type": "send", "room_id": room, "content": cmid, "client_msg_id": cmid, "id": cmid})
            reply = await asyncio.wait_for(answer, 30)
            if reply["type"] == "ack":
                acked[cmid] = (room, reply["seq"], time.monotonic())
            else:
                refused[reply["code"]] = refused.get(reply["code"], 0) + 1
            await asyncio.sleep(0.05)

    readers = [asyncio.ensure_future(read(n, ws, room)) for n, (ws, room) in enumerate(sockets)]
    talkers = [asyncio.ensure_future(chat(n, ws, room)) for n, (ws, room) in enumerate(sockets)]
    try:
        await asyncio.sleep(2)
        old_port = sentinels.primary_port()
        killed_at, killed_wall_ms = time.monotonic(), time.time() * 1000
        sentinels.kill(sentinels.node_on(old_port))

        # Recovered: the sentinels promoted the replica and both instances answer ready (Redis PING ok).
        promoted_at = ready_at = None
        saw_unready = False
        while ready_at is None:
            assert time.monotonic() - killed_at < 40, "chatd did not recover within 40 s"
            if promoted_at is None:
                with contextlib.suppress(Exception):
                    if sentinels.primary_port() != old_port:
                        promoted_at = time.monotonic()
            statuses = [
                (await asyncio.get_running_loop().run_in_executor(None, http_get, s.http + "/health/ready", 1))[0]
                for s in servers
            ]
            saw_unready = saw_unready or any(st != 200 for st in statuses)
            if promoted_at is not None and all(st == 200 for st in statuses):
                ready_at = time.monotonic()
            await asyncio.sleep(0.1)
        await asyncio.sleep(3)  # the load goes on against the new primary
        stop.set()
        await asyncio.gather(*talkers)

        # Every socket gets every seq of its room up to the last acked one.
        last_acked = {room: max(seq for r, seq, _ in acked.values() if r == room) for room in rooms}
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and any(
            max(got, default=0) < last_acked[room] for got, (_, room) in zip(received, sockets, strict=True)
        ):
            await asyncio.sleep(0.1)
    finally:
        stop.set()
        for task in [*talkers, *readers]:
            task.cancel()
        await asyncio.gather(*talkers, *readers, return_exceptions=True)

    with psycopg.connect(services.database_url) as conn:
        stored = {
            cmid: (room, seq)
            for room, seq, cmid in conn.execute(
                "SELECT room_id, seq, client_msg_id FROM messages WHERE room_id = ANY(%s)", (rooms,)
            )
        }
    not_stored = [cmid for cmid, (room, seq, _) in acked.items() if stored.get(cmid) != (room, seq)]
    seqs_by_room = {room: sorted(seq for r, seq in stored.values() if r == room) for room in rooms}
    undelivered = 0
    for n, (_, room) in enumerate(sockets):
        assert seqs_by_room[room] == list(range(1, len(seqs_by_room[room]) + 1)), f"room {room}: seq gap in Postgres"
        undelivered += len(set(seqs_by_room[room]) - set(received[n]))
    deliveries = sum(len(r) for r in received)
    # The slowest delivery of a message acked around the failover: what the outage cost a reader.
    acked_at = {(room, seq): at for room, seq, at in acked.values()}
    worst_delay_s = max(
        (at - acked_at[(room, seq)])
        for n, (_, room) in enumerate(sockets)
        for seq, at in received[n].items()
        if (room, seq) in acked_at
    )
    new_primary = sentinels.node_on(sentinels.primary_port())
    assert promoted_at is not None and ready_at is not None
    report = {
        "acked": len(acked),
        "stored": len(stored),
        "deliveries": deliveries,
        "lost": len(not_stored) + undelivered,
        "refused": refused,
        "promoted_after_s": round(promoted_at - killed_at, 2),
        "recovered_after_s": round(ready_at - killed_at, 2),
        "worst_delivery_delay_s": round(worst_delay_s, 2),
        "pubsub_reconnects": sum(len(s.events("fanout_reconnected")) for s in servers),
        # the last pub/sub reader back (resubscribed, confirmed): log time of fanout_reconnected
        "pubsub_back_after_s": round(
            max(_epoch_ms(e["time"]) for s in servers for e in s.events("fanout_reconnected")) / 1000
            - killed_wall_ms / 1000,
            2,
        ),
    }
    print("\nsentinel failover:", json.dumps(report))

    assert not not_stored, f"acked but not stored: {not_stored[:5]}"
    assert undelivered == 0, f"{undelivered} stored messages never reached a member's socket"
    assert all(order_ok), "a socket received a room's messages out of order or twice"
    assert len(stored) == len(acked), "every stored message was acked (no send answered with an error was stored)"
    assert saw_unready, "readiness never noticed the primary's death"
    # Repair keeps readers within a second of the writers through the outage (it fills every hole per read).
    assert worst_delay_s < 3, f"a message reached a reader {worst_delay_s:.1f} s after its ack"
    # chatd writes to the promoted replica now: both instances' heartbeats (expiry = now + 6 s) written after the kill.
    # A heartbeat every 2 s: polled (bounded), since the next one may be due just after the load stopped.
    prefix = servers[0].env["CHATD_STORAGE_REDIS_KEY_PREFIX"]
    deadline = time.monotonic() + 15
    while True:
        # withscores: (member, score) pairs, which redis-py's return type does not single out
        scored = new_primary.client().zrange(f"{prefix}workers", 0, -1, withscores=True)
        heartbeats = cast("list[tuple[bytes, float]]", scored)
        fresh = len(heartbeats) == 2 and all(expiry > killed_wall_ms + 6000 for _, expiry in heartbeats)
        if fresh or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.2)
    assert fresh, heartbeats
    assert all(s.events("fanout_reconnected") for s in servers), "an instance's pub/sub never came back"


def _epoch_ms(iso: str) -> float:
    return datetime.datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp() * 1000
