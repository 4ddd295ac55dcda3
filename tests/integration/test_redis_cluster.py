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
from tests.cluster import ValkeyCluster, migrate_slot
from tests.conftest import Services
from tests.integration.test_assistant import stream_of
from tests.integration.test_cli import chatd_cli, one_line_error
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

    bad = chatd_cli("check-config", env={**env, "REDIS_URL": valkey_cluster.url() + "/0"})
    assert bad.returncode == 2 and "storage.redis_url: path /0: a cluster has no databases" in one_line_error(bad)


@pytest.mark.smoke
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


class ChatLoad:
    """12 sockets in 3 rooms on two instances, each sending every 50 ms: what was acked, stored and
    received by every member (each seq once, in order)."""

    def __init__(self, services: Services, servers: list[Chatd]) -> None:
        self.services, self.servers = services, servers
        self.rooms: list[int] = []
        self.sockets: list[tuple[WS, int]] = []
        self.acked: dict[str, tuple[int, int, float]] = {}  # client_msg_id -> (room, seq, acked at)
        self.refused: dict[str, int] = {}  # error code -> count (a send may be refused, never lost)
        self.received: list[dict[int, float]] = []  # per socket: seq -> first received at
        self.duplicates = 0
        self.order_ok = True
        self._replies: list[dict[str, asyncio.Future[dict[str, Any]]]] = []
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Future[None]] = []
        self._talkers: list[asyncio.Future[None]] = []

    async def start(self) -> None:
        users = make_users(self.services.database_url, 12)
        self.rooms = [await make_room(self.servers[0], users[i], users[i + 1 : i + 4]) for i in (0, 4, 8)]
        for i, user in enumerate(users):
            ws = await connect(self.servers[i % 2], user)
            await join(ws, self.rooms[i // 4])
            self.sockets.append((ws, self.rooms[i // 4]))
        self.received = [{} for _ in self.sockets]
        self._replies = [{} for _ in self.sockets]
        self._talkers = [asyncio.ensure_future(self._chat(n, ws, r)) for n, (ws, r) in enumerate(self.sockets)]
        readers = [asyncio.ensure_future(self._read(n, ws, r)) for n, (ws, r) in enumerate(self.sockets)]
        self._tasks = [*self._talkers, *readers]

    async def _read(self, n: int, ws: WS, room: int) -> None:
        last = 0
        while True:
            frame = await ws.recv(timeout_s=60)
            if frame is None:
                return
            if frame["type"] == "message" and frame["room_id"] == room:
                seq = frame["seq"]
                self.order_ok = self.order_ok and seq == last + 1
                last = seq
                self.duplicates += seq in self.received[n]
                self.received[n].setdefault(seq, time.monotonic())
            elif frame["type"] in ("ack", "error") and frame.get("reply_to") in self._replies[n]:
                self._replies[n].pop(frame["reply_to"]).set_result(frame)

    async def _chat(self, n: int, ws: WS, room: int) -> None:
        while not self._stop.is_set():
            cmid = uuid.uuid4().hex
            self._replies[n][cmid] = answer = asyncio.get_running_loop().create_future()
            await ws.send({"type": "send", "room_id": room, "content": cmid, "client_msg_id": cmid, "id": cmid})
            reply = await asyncio.wait_for(answer, 30)
            if reply["type"] == "ack":
                self.acked[cmid] = (room, reply["seq"], time.monotonic())
            else:
                self.refused[reply["code"]] = self.refused.get(reply["code"], 0) + 1
            await asyncio.sleep(0.05)

    async def finish(self) -> None:
        """Stop sending; wait (bounded) until every socket has its room's last acked seq."""
        self._stop.set()
        try:
            await asyncio.gather(*self._talkers)
            last_acked = {room: max(seq for r, seq, _ in self.acked.values() if r == room) for room in self.rooms}
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and any(
                max(got, default=0) < last_acked[room]
                for got, (_, room) in zip(self.received, self.sockets, strict=True)
            ):
                await asyncio.sleep(0.1)
        finally:
            await self.cancel()

    async def cancel(self) -> None:
        self._stop.set()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def check(self) -> dict[str, Any]:
        """The counters; asserts 0 lost, 0 never delivered, 0 duplicated, in order."""
        with psycopg.connect(self.services.database_url) as conn:
            stored = {
                cmid: (room, seq)
                for room, seq, cmid in conn.execute(
                    "SELECT room_id, seq, client_msg_id FROM messages WHERE room_id = ANY(%s)", (self.rooms,)
                )
            }
        lost = [cmid for cmid, (room, seq, _) in self.acked.items() if stored.get(cmid) != (room, seq)]
        seqs_by_room = {room: sorted(seq for r, seq in stored.values() if r == room) for room in self.rooms}
        never_delivered = 0
        for n, (_, room) in enumerate(self.sockets):
            assert seqs_by_room[room] == list(range(1, len(seqs_by_room[room]) + 1)), f"room {room}: seq gap"
            never_delivered += len(set(seqs_by_room[room]) - set(self.received[n]))
        acked_at = {(room, seq): at for room, seq, at in self.acked.values()}
        worst_delay_s = max(
            (at - acked_at[(room, seq)])
            for n, (_, room) in enumerate(self.sockets)
            for seq, at in self.received[n].items()
            if (room, seq) in acked_at
        )
        report = {
            "acked": len(self.acked),
            "stored": len(stored),
            "deliveries": sum(len(r) for r in self.received),
            "lost": len(lost),
            "never_delivered": never_delivered,
            "duplicated": self.duplicates,
            "refused": self.refused,
            "worst_delivery_delay_s": round(worst_delay_s, 2),
        }
        assert not lost, f"acked but not stored: {lost[:5]}"
        assert never_delivered == 0, f"{never_delivered} stored messages never reached a member's socket"
        assert self.duplicates == 0 and self.order_ok, "a socket received a room's messages out of order or twice"
        assert len(stored) == len(self.acked), "every stored message was acked"
        # Repair keeps readers close to the writers through an outage (measured: under 1 s); 5 s: a loaded CI box.
        assert worst_delay_s < 5, f"a message reached a reader {worst_delay_s:.1f} s after its ack"
        return report


_LOAD_ENV = {
    "CHATD_WS_SEND_RATE_COUNT": "1000000",
    "CHATD_WS_PROBE_INTERVAL_S": "0.5",
    "CHATD_STORAGE_REDIS_TIMEOUT_S": "1",
    "CHATD_WS_PRESENCE_TTL_S": "6",  # a heartbeat every 2 s: proof below that chatd writes where the slot went
}


async def _heartbeats_after(cluster: ValkeyCluster, keys: Keys, wall_ms: float, ttl_ms: float = 6000) -> None:
    """Both instances' heartbeats were written after ``wall_ms`` (to wherever their slot is now)."""
    client = cluster.client()
    try:
        deadline = time.monotonic() + 15
        while True:
            heartbeats = cast("list[tuple[bytes, float]]", client.zrange(keys.workers(), 0, -1, withscores=True))
            fresh = len(heartbeats) == 2 and all(expiry > wall_ms + ttl_ms for _, expiry in heartbeats)
            if fresh or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.2)
    finally:
        client.close()
    assert fresh, heartbeats


@pytest.mark.parametrize(("victim", "fault"), [("room", "kill"), ("presence", "kill"), ("room", "freeze")])
async def test_primary_killed_under_chat_load_loses_nothing(
    valkey_cluster: ValkeyCluster, chatd_factory: Any, services: Services, victim: str, fault: str
) -> None:
    """``victim``: the primary of the first room's partition, or of the presence keys (heartbeats).
    ``fault``: SIGKILL (its connections reset), or SIGSTOP (they stay open and silent: only the pub/sub
    reader's liveness deadline notices)."""
    env = _env(valkey_cluster, **_LOAD_ENV, CHATD_STORAGE_PUBSUB_LIVENESS_S="3")
    servers: list[Chatd] = [chatd_factory(**env), chatd_factory(**env)]
    load = ChatLoad(services, servers)
    keys = Keys(servers[0].env["CHATD_STORAGE_REDIS_KEY_PREFIX"], cluster=True, partitions=16)
    loop = asyncio.get_running_loop()
    try:
        await load.start()
        watched = keys.sharded(keys.room_channel(load.rooms[0]), b"")[0] if victim == "room" else keys.workers()
        dead = valkey_cluster.primary_of(watched)
        await asyncio.sleep(2)
        killed_at, killed_wall_ms = time.monotonic(), time.time() * 1000
        (valkey_cluster.kill if fault == "kill" else valkey_cluster.freeze)(dead)

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
        await load.finish()
    finally:
        await load.cancel()
    report = load.check()
    assert promoted_at is not None and ready_at is not None
    moved = [e for s in servers for e in s.events("fanout_partitions_moved")]
    report |= {
        "promoted_after_s": round(promoted_at - killed_at, 2),
        "recovered_after_s": round(ready_at - killed_at, 2),
        "partitions_moved_events": len(moved),
        "pubsub_back_after_s": round(max(_epoch_ms(e["time"]) for e in moved) / 1000 - killed_wall_ms / 1000, 2)
        if moved
        else None,
    }
    print(f"\ncluster failover ({victim}, {fault}):", json.dumps(report))
    if victim == "room":
        assert moved, "no instance saw its partitions move to the promoted replica"
    await _heartbeats_after(valkey_cluster, keys, killed_wall_ms)


async def test_slots_migrated_under_chat_load_lose_nothing(
    valkey_cluster: ValkeyCluster, chatd_factory: Any, services: Services
) -> None:
    """The slots of the first room's partition and of the presence keys move to another primary, keys and
    all (CLUSTER SETSLOT / MIGRATE, as ``valkey-cli --cluster reshard`` does), while the rooms chat."""
    env = _env(valkey_cluster, **_LOAD_ENV)
    servers: list[Chatd] = [chatd_factory(**env), chatd_factory(**env)]
    load = ChatLoad(services, servers)
    keys = Keys(servers[0].env["CHATD_STORAGE_REDIS_KEY_PREFIX"], cluster=True, partitions=16)
    loop = asyncio.get_running_loop()
    moved_keys = {}
    try:
        await load.start()
        await asyncio.sleep(2)
        migrated_wall_ms = time.time() * 1000
        for what, key in (
            ("room", keys.sharded(keys.room_channel(load.rooms[0]), b"")[0]),
            ("presence", keys.workers()),
        ):
            slot = valkey_cluster.keyslot(key)
            source = valkey_cluster.primary_of(key)
            target = next(n for n in valkey_cluster.nodes if n is not source and n.role() == "master")
            moved_keys[what] = await loop.run_in_executor(None, migrate_slot, valkey_cluster, slot, target)
            assert valkey_cluster.primary_of(key) is target
            await asyncio.sleep(1)
        await asyncio.sleep(3)  # the load goes on where the slots went
        await load.finish()
    finally:
        await load.cancel()
    report = load.check()
    moved = [e for s in servers for e in s.events("fanout_partitions_moved")]
    report |= {"keys_migrated": moved_keys, "partitions_moved_events": len(moved)}
    print("\ncluster slot migration:", json.dumps(report))
    assert moved_keys["presence"] > 0  # the presence slot held the heartbeats, the rooms' presence...
    # Both instances followed the room's partition to its new node (Valkey unsubscribed them from the old one).
    assert all(s.events("fanout_partitions_moved") for s in servers), "pub/sub did not follow the slot"
    await _heartbeats_after(valkey_cluster, keys, migrated_wall_ms)


def _epoch_ms(iso: str) -> float:
    return datetime.datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp() * 1000


async def test_a_failover_costs_a_subscription_per_partition_not_per_room(
    valkey_cluster: ValkeyCluster, chatd_factory: Any, services: Services
) -> None:
    """One worker in 200 rooms (128 partitions, the default): when the primary holding most of its
    partitions dies, what the promoted replica receives is one SSUBSCRIBE per partition it now holds,
    however many rooms map to them (one channel per room would have cost one per room)."""
    server: Chatd = chatd_factory(
        REDIS_URL=valkey_cluster.url(), CHATD_WS_JOIN_BURST="1000", CHATD_WS_JOIN_RATE_PER_S="1000"
    )
    (alice,) = make_users(services.database_url, 1)
    rooms = [await make_room(server, alice, []) for _ in range(200)]
    ws = await connect(server, alice)
    for room in rooms:
        await join(ws, room)
    keys = Keys(server.env["CHATD_STORAGE_REDIS_KEY_PREFIX"], cluster=True, partitions=128)
    channels = [keys.room_channel(r) for r in rooms] + [keys.user_channel(alice.id), keys.control()]
    by_partition: dict[int, int] = {}
    for channel in channels:
        by_partition[keys.partition_of(channel)] = by_partition.get(keys.partition_of(channel), 0) + 1
    owner = {p: valkey_cluster.primary_of(keys.partition_channel(p)).port for p in by_partition}
    dead_port = max(set(owner.values()), key=lambda port: sum(1 for o in owner.values() if o == port))
    dead = next(n for n in valkey_cluster.nodes if n.port == dead_port)
    replica = next(
        n
        for n in valkey_cluster.nodes
        if n.role() == "slave" and n.client().info("replication")["master_port"] == dead_port
    )
    before = _ssubscribes(replica)
    valkey_cluster.kill(dead)
    deadline = time.monotonic() + 60
    while not server.events("fanout_partitions_moved"):
        assert time.monotonic() < deadline, "the partitions never moved to the promoted replica"
        await asyncio.sleep(0.2)
    await asyncio.sleep(1)  # the moves of the other partitions of the node, if any came later
    moved_partitions = [p for p, port in owner.items() if port == dead_port]
    report = {
        "rooms": len(rooms),
        "partitions_wanted": len(by_partition),
        "partitions_on_dead_node": len(moved_partitions),
        "channels_on_dead_node": sum(by_partition[p] for p in moved_partitions),
        "ssubscribes_on_promoted_replica": _ssubscribes(replica) - before,
    }
    print("\ncluster failover resubscription:", json.dumps(report))
    assert 0 < report["ssubscribes_on_promoted_replica"] <= 2 * report["partitions_on_dead_node"]
    assert report["channels_on_dead_node"] > report["partitions_on_dead_node"]  # what one channel per room costs
    # And the room still works there: a message to a room of a moved partition reaches the socket live.
    room = next(r for r in rooms if keys.partition_of(keys.room_channel(r)) in moved_partitions)
    ack = await send(ws, room, "after the failover")
    assert (await ws.expect("message", room_id=room, seq=ack["seq"], timeout_s=15))["content"] == "after the failover"


def _ssubscribes(node: Any) -> int:
    stats = node.client().info("commandstats")
    return int(stats.get("cmdstat_ssubscribe", {}).get("calls", 0))
