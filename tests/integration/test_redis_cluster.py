"""Redis Cluster: two chatd instances on a real Valkey cluster (3 primaries, 3 replicas; tests/cluster.py).

Room and user events travel over sharded pub/sub partitions, the scripts' keys share hash tags
(chatd/core/keys.py).  The failover test SIGKILLs the primary serving a room's partition under a chat
load and checks the message core's promise: every acked message is stored and reaches every member
exactly once, in order.  It prints its figures:

    .venv/bin/python -m pytest -s tests/integration/test_redis_cluster.py -k failover
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from chatd.core.keys import Keys
from tests.chat import connect, join, make_room, send
from tests.cluster import ValkeyCluster
from tests.conftest import Services
from tests.integration.test_assistant import stream_of
from tests.integration.test_cli import chatd_cli
from tests.support import JWT_SECRET, Chatd
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
