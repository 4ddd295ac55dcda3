"""Redis Cluster: two chatd instances on a real Valkey cluster (3 primaries, 3 replicas; tests/cluster.py).

Room and user events travel over sharded pub/sub partitions, the scripts' keys share hash tags
(chatd/core/keys.py).  The failover test SIGKILLs the primary serving a room's partition under a chat
load and checks the message core's promise: every acked message is stored and reaches every member
exactly once, in order.  It prints its figures:

    .venv/bin/python -m pytest -s tests/integration/test_redis_cluster.py -k failover
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

from chatd.core.keys import Keys
from tests.chat import connect, join, make_room, send
from tests.cluster import ValkeyCluster
from tests.conftest import Services
from tests.integration.test_assistant import stream_of
from tests.integration.test_cli import chatd_cli
from tests.support import JWT_SECRET, WS, Chatd, http_get
from tests.users import make_users

pytestmark = pytest.mark.slow


@pytest.fixture
def valkey_cluster(tmp_path: Path) -> Iterator[ValkeyCluster]:
    cluster = ValkeyCluster(tmp_path / "cluster").start()
    try:
        yield cluster
    finally:
        cluster.stop()


def _env(cluster: ValkeyCluster, **extra: str) -> dict[str, str]:
    return {"REDIS_URL": cluster.url(partitions="16"), **extra}


def test_check_config_connects_to_the_cluster(valkey_cluster: ValkeyCluster, services: Services) -> None:
    env = {"JWT_SECRET": JWT_SECRET, "DATABASE_URL": services.database_url, "REDIS_URL": valkey_cluster.url()}
    ok = chatd_cli("check-config", "--connect", env=env)
    assert ok.returncode == 0, ok.stderr
    assert f"redis: ok, connected to {valkey_cluster.url()}, 3 primaries" in ok.stderr


async def test_two_instances_share_rooms_through_the_cluster(
    valkey_cluster: ValkeyCluster, chatd_factory: Any, services: Services
) -> None:
    # (the cluster first: set up before chatd_factory, so torn down after the chatd instances stopped)
    env = _env(valkey_cluster, CHATD_WS_PRESENCE_GRACE_S="0.3", CHATD_WS_TYPING_TTL_S="3")
    a_srv: Chatd = chatd_factory(**env)
    b_srv: Chatd = chatd_factory(workers=2, **env)
    alice, bob, carol = make_users(services.database_url, 3)
    room = await make_room(a_srv, alice, [bob, carol])
    a, b = await connect(a_srv, alice), await connect(b_srv, bob)
    await join(a, room)
    await join(b, room)
    await a.expect_presence(bob.id, "online", timeout_s=15)  # announced by b_srv, over the cluster

    acks = [await send(a, room, f"hello {i}") for i in range(5)]
    got = [await b.expect("message", room_id=room, seq=ack["seq"], timeout_s=15) for ack in acks]
    assert [m["content"] for m in got] == [f"hello {i}" for i in range(5)]
    reply = await send(b, room, "hi from the other instance")
    assert (await a.expect("message", room_id=room, seq=reply["seq"], timeout_s=15))["sender_id"] == bob.id

    await b.send({"type": "typing", "room_id": room, "is_typing": True})
    assert (await a.expect("typing", user_id=bob.id, timeout_s=15))["is_typing"] is True

    # User channels: a read syncs bob's other socket, on the other instance.
    b_other = await connect(a_srv, bob)
    await join(b_other, room)
    await b.send({"type": "read", "room_id": room, "seq": reply["seq"]})
    assert (await b_other.expect("read", room_id=room, timeout_s=15))["seq"] == reply["seq"]

    c = await connect(b_srv, carol)
    await join(c, room)
    await a.expect_presence(carol.id, "online", timeout_s=15)
    c.close()
    await a.expect_presence(carol.id, "offline", timeout_s=15)

    # The keys a script or MULTI touches together share a slot: presence, the denylist and connections.
    prefix = a_srv.env["CHATD_STORAGE_REDIS_KEY_PREFIX"]
    client = valkey_cluster.client()
    try:
        keys = Keys(prefix, cluster=True, partitions=16)
        assert client.hget(keys.presence_users(room), str(alice.id)) == b"1"
        assert client.zcard(keys.workers()) == 3  # three workers' heartbeats, in the {presence} slot
        assert client.zcard(keys.user_connections(bob.id)) == 2
    finally:
        client.close()


async def test_assistant_stream_across_instances_on_the_cluster(
    valkey_cluster: ValkeyCluster, chatd_factory: Any, services: Services
) -> None:
    env = _env(valkey_cluster)
    a_srv: Chatd = chatd_factory(**env)
    b_srv: Chatd = chatd_factory(**env)
    alice, bob = make_users(services.database_url, 2)
    room = await make_room(a_srv, alice, [bob], kind="assistant")
    a, b = await connect(a_srv, alice), await connect(b_srv, bob)
    await join(a, room)
    await join(b, room)
    ack = await send(a, room, "Tell me about clusters")
    results = await asyncio.gather(stream_of(a, room), stream_of(b, room))
    texts = ["".join(c["content"] for c in chunks) for _, chunks, _ in results]
    for start, chunks, end in results:
        assert start["reply_to_message_id"] == ack["message_id"]
        assert [c["index"] for c in chunks] == list(range(len(chunks)))
        assert end["stop_reason"] == "end_turn" and end["seq"] == ack["seq"] + 1
    assert texts[0] == texts[1] and "Tell me about clusters" in texts[0]
    final = await b.expect("message", room_id=room, seq=ack["seq"] + 1, timeout_s=15)
    assert final["role"] == "assistant" and final["content"] == texts[0]


@pytest.mark.parametrize("victim", ["room", "presence"])
async def test_primary_killed_under_chat_load_loses_nothing(
    valkey_cluster: ValkeyCluster, chatd_factory: Any, services: Services, victim: str
) -> None:
    """``victim``: the primary of the first room's partition, or of the presence keys (heartbeats)."""
    env = _env(
        valkey_cluster,
        CHATD_WS_SEND_RATE_COUNT="1000000",
        CHATD_WS_PROBE_INTERVAL_S="0.5",
        CHATD_STORAGE_REDIS_TIMEOUT_S="1",
        CHATD_WS_PRESENCE_TTL_S="6",  # a heartbeat every 2 s: proof below that chatd writes to the new primary
    )
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
    duplicates = [0] * len(sockets)
    order_ok = [True] * len(sockets)
    replies: list[dict[str, asyncio.Future[dict[str, Any]]]] = [{} for _ in sockets]
    stop = asyncio.Event()

    async def read(n: int, ws: WS, room: int) -> None:
        last = 0
        while True:
            frame = await ws.recv(timeout_s=60)
            if frame is None:
                return
            if frame["type"] == "message" and frame["room_id"] == room:
                seq = frame["seq"]
                order_ok[n] = order_ok[n] and seq == last + 1
                last = seq
                if seq in received[n]:
                    duplicates[n] += 1
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

    prefix = servers[0].env["CHATD_STORAGE_REDIS_KEY_PREFIX"]
    keys = Keys(prefix, cluster=True, partitions=16)
    watched = keys.sharded(keys.room_channel(rooms[0]), b"")[0] if victim == "room" else keys.workers()
    dead = valkey_cluster.primary_of(watched)
    readers = [asyncio.ensure_future(read(n, ws, room)) for n, (ws, room) in enumerate(sockets)]
    talkers = [asyncio.ensure_future(chat(n, ws, room)) for n, (ws, room) in enumerate(sockets)]
    loop = asyncio.get_running_loop()
    try:
        await asyncio.sleep(2)
        killed_at, killed_wall_ms = time.monotonic(), time.time() * 1000
        valkey_cluster.kill(dead)

        # Recovered: a replica took the dead primary's slots and both instances answer ready.
        promoted_at = ready_at = None
        while ready_at is None:
            assert time.monotonic() - killed_at < 60, "chatd did not recover within 60 s"
            if promoted_at is None:
                with contextlib.suppress(Exception):
                    if await loop.run_in_executor(None, valkey_cluster.primary_of, watched) is not dead:
                        promoted_at = time.monotonic()
            statuses = [(await loop.run_in_executor(None, http_get, s.http + "/health/ready", 1))[0] for s in servers]
            if promoted_at is not None and all(st == 200 for st in statuses):
                ready_at = time.monotonic()
            await asyncio.sleep(0.1)
        await asyncio.sleep(3)  # the load goes on against the new primary
        stop.set()
        await asyncio.gather(*talkers)

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
    lost = [cmid for cmid, (room, seq, _) in acked.items() if stored.get(cmid) != (room, seq)]
    seqs_by_room = {room: sorted(seq for r, seq in stored.values() if r == room) for room in rooms}
    never_delivered = 0
    for n, (_, room) in enumerate(sockets):
        assert seqs_by_room[room] == list(range(1, len(seqs_by_room[room]) + 1)), f"room {room}: seq gap in Postgres"
        never_delivered += len(set(seqs_by_room[room]) - set(received[n]))
    acked_at = {(room, seq): at for room, seq, at in acked.values()}
    worst_delay_s = max(
        (at - acked_at[(room, seq)])
        for n, (_, room) in enumerate(sockets)
        for seq, at in received[n].items()
        if (room, seq) in acked_at
    )
    moved = [e for s in servers for e in s.events("fanout_partitions_moved")]
    assert promoted_at is not None and ready_at is not None
    report = {
        "acked": len(acked),
        "stored": len(stored),
        "deliveries": sum(len(r) for r in received),
        "lost": len(lost),
        "never_delivered": never_delivered,
        "duplicated": sum(duplicates),
        "refused": refused,
        "promoted_after_s": round(promoted_at - killed_at, 2),
        "recovered_after_s": round(ready_at - killed_at, 2),
        "worst_delivery_delay_s": round(worst_delay_s, 2),
        "partitions_moved_events": len(moved),
        "pubsub_back_after_s": round(
            max((_epoch_ms(e["time"]) for e in moved), default=0) / 1000 - killed_wall_ms / 1000, 2
        )
        if moved
        else None,
    }
    print(f"\ncluster failover ({victim}):", json.dumps(report))

    assert not lost, f"acked but not stored: {lost[:5]}"
    assert never_delivered == 0, f"{never_delivered} stored messages never reached a member's socket"
    assert sum(duplicates) == 0 and all(order_ok), "a socket received a room's messages out of order or twice"
    assert len(stored) == len(acked), "every stored message was acked"
    if victim == "room":
        assert moved, "no instance saw its partitions move to the promoted replica"
    # chatd writes to the promoted replica: both instances' heartbeats (expiry = now + 6 s) written after the kill.
    client = valkey_cluster.client()
    try:
        deadline = time.monotonic() + 15
        while True:
            heartbeats = cast("list[tuple[bytes, float]]", client.zrange(keys.workers(), 0, -1, withscores=True))
            fresh = len(heartbeats) == 2 and all(expiry > killed_wall_ms + 6000 for _, expiry in heartbeats)
            if fresh or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.2)
    finally:
        client.close()
    assert fresh, heartbeats


def _epoch_ms(iso: str) -> float:
    return datetime.datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp() * 1000
