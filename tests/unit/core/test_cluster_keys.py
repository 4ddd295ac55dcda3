"""The cluster key layout (chatd/core/keys.py): hash tags for keys used together, pub/sub partitions."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from chatd.core.keys import Keys, pack, unpack

PLAIN, CLUSTER = Keys(), Keys(cluster=True, partitions=128)


def tag(key: str) -> str:
    """The part of a key Redis Cluster hashes: the first ``{...}`` with something inside, else all of it."""
    found = re.search(r"\{([^}]+)\}", key)
    return found.group(1) if found else key


def test_outside_a_cluster_every_name_is_unchanged() -> None:
    assert PLAIN.presence(7) == "chatd:presence:7" and PLAIN.workers() == "chatd:workers"
    assert PLAIN.denied_jti("j") == "chatd:auth:deny:j" and PLAIN.user_connections(3) == "chatd:conns:3"
    assert PLAIN.stream(5) == "chatd:stream:5" and PLAIN.quota("send") == "chatd:quota:send:"
    assert PLAIN.presence_prefix == PLAIN.queue_prefix == "chatd:"


@pytest.mark.parametrize(
    "group",
    [
        # the presence scripts: per room, per worker and the global keys in one call
        lambda k: [
            k.presence(1), k.presence_users(2), k.presence_grace(3), k.presence_revisions(),
            k.worker_rooms("o"), k.workers(), k.presence_pending(), k.presence_prefix + "presence:9",
        ],
        # the connect script: tokens' denylist entries and users' connection sets
        lambda k: [k.denied_jti("a"), k.denied_jti("b"), k.user_connections(1), k.user_connections(2)],
        # the stream MULTI
        lambda k: [k.stream(1), k.stream_text(1), k.stream(2), k.room_streams(3)],
        # the job queue's script-built names
        lambda k: [k.queue_prefix + "q:depth", k.queue_prefix + "q:user:4", k.queue_prefix + "q:job:p1"],
        # a quota's counters
        lambda k: [k.quota("send"), k.quota("send") + "12:3"],
    ],
)  # fmt: skip
def test_keys_used_together_share_a_hash_tag_in_a_cluster(group: object) -> None:
    keys = group(CLUSTER)  # type: ignore[operator]
    assert len({tag(key) for key in keys}) == 1, keys
    assert all(key.startswith("chatd:") for key in keys)


def test_partitions_spread_and_agree_across_instances() -> None:
    rooms = [CLUSTER.room_channel(r) for r in range(5000)]
    used = {CLUSTER.partition_of(c) for c in rooms}
    assert len(used) == 128  # every partition gets rooms
    assert CLUSTER.partition_of("chatd:room:42") == Keys(cluster=True).partition_of("chatd:room:42")  # no salt
    assert CLUSTER.partition_channel(5) == "chatd:{p5}" and tag(CLUSTER.partition_channel(5)) == "p5"
    channel, data = CLUSTER.sharded("chatd:room:42", b"x")
    assert channel == CLUSTER.partition_channel(CLUSTER.partition_of("chatd:room:42"))
    assert unpack(data) == (b"chatd:room:42", b"x")


@given(st.text(min_size=1).filter(lambda c: "\n" not in c), st.binary())
def test_pack_round_trips(channel: str, data: bytes) -> None:
    assert unpack(pack(channel, data)) == (channel.encode(), data)


def test_unpack_refuses_a_message_without_a_channel() -> None:
    for bad in (b"no newline", b"\nempty channel"):
        with pytest.raises(ValueError):
            unpack(bad)
