"""The sharded subscriber's bookkeeping (no I/O: the confirmations and messages redis-py hands it are fed in).

Logical channels share partitions: a partition stays subscribed while any of its channels is wanted, a
message of a channel nobody wants is dropped, and a partition confirmed again without an SSUBSCRIBE of
ours (redis-py moved it) or after Valkey unsubscribed it (a migration) ends a gap: the hook runs, once
for the moves of one failover.  The real cluster behind it: tests/integration/test_redis_cluster.py.
"""

from __future__ import annotations

import asyncio
from typing import Any

from chatd.core.keys import Keys, pack
from chatd.process.config import StorageSettings
from chatd.realtime.shardsub import ShardedSubscriber

KEYS = Keys(cluster=True, partitions=8)


def two_channels_of_one_partition() -> tuple[str, str]:
    seen: dict[int, str] = {}
    for room in range(1000):
        channel = KEYS.room_channel(room)
        first = seen.setdefault(KEYS.partition_of(channel), channel)
        if first != channel:
            return first, channel
    raise AssertionError("unreachable: 1000 rooms over 8 partitions")


class Harness:
    def __init__(self) -> None:
        self.received: list[tuple[bytes, bytes]] = []
        self.resubscribed = 0
        storage = StorageSettings(redis_url="redis+cluster://127.0.0.1:1")  # never connected
        self.sub = ShardedSubscriber(storage, KEYS, self._on_message, self._on_resubscribed)

    def _on_message(self, channel: bytes, data: bytes) -> None:
        self.received.append((channel, data))

    def _on_resubscribed(self) -> None:
        self.resubscribed += 1

    def connect(self) -> None:
        """As ``run`` leaves it once connected (its SSUBSCRIBEs are sent by ``flush_wanted``)."""
        self.sub._pubsub = object()
        self.sub.connected = True

    def sent(self, partition: int) -> None:
        """An SSUBSCRIBE of ours went out (what ``_ssubscribe`` records before sending it)."""
        self.sub._sent[partition] = self.sub._sent.get(partition, 0) + 1

    def confirm(self, partition: int) -> None:
        self.feed("ssubscribe", partition, 1)

    def feed(self, kind: str, partition: int, data: Any) -> None:
        self.sub._dispatch({"type": kind, "channel": KEYS.partition_channel(partition).encode(), "data": data})

    def publish(self, channel: str, data: bytes) -> None:
        self.sub._dispatch(
            {"type": "smessage", "channel": KEYS.sharded(channel, data)[0].encode(), "data": pack(channel, data)}
        )


async def test_a_partition_serves_every_wanted_channel_and_only_those() -> None:
    h = Harness()
    h.connect()
    a, b = two_channels_of_one_partition()
    p = KEYS.partition_of(a)
    fut_a, fut_b = h.sub.want(a), h.sub.want(b)
    assert fut_a is fut_b and h.sub._pending == {p}  # one SSUBSCRIBE for both
    h.sent(p)
    h.confirm(p)
    assert fut_a.done() and fut_a.result() is None and h.resubscribed == 0
    assert h.sub.want(a).done()  # confirmed already: nothing sent

    h.publish(a, b"x")
    h.publish(b, b"y")
    h.publish(KEYS.room_channel(999_999), b"not wanted here")  # wherever it lands: dropped
    assert h.received == [(a.encode(), b"x"), (b.encode(), b"y")]

    h.sub._pubsub = None  # the unsubscribe of one channel sends nothing: its partition still serves the other
    await h.sub.unsubscribe(a)
    assert p in h.sub._confirmed and p in h.sub._wanted
    h.publish(a, b"after")
    assert h.received[-1] == (b.encode(), b"y")
    await h.sub.unsubscribe(b)
    assert p not in h.sub._wanted and p not in h.sub._confirmed


async def test_moves_of_one_failover_run_the_hook_once() -> None:
    h = Harness()
    h.connect()
    channels = [KEYS.room_channel(room) for room in range(40)]
    partitions = sorted({KEYS.partition_of(c) for c in channels})
    for channel in channels:
        h.sub.want(channel)
    for p in partitions:
        h.sent(p)
        h.confirm(p)
    assert h.resubscribed == 0
    for p in partitions:  # redis-py subscribes them where the slots went: confirmations we did not ask for
        h.confirm(p)
    await asyncio.sleep(0)  # the hook is coalesced to the next turn of the loop
    assert h.resubscribed == 1


async def test_a_partition_valkey_unsubscribed_is_subscribed_again_and_its_gap_read_back() -> None:
    h = Harness()
    h.connect()
    channel = KEYS.room_channel(7)
    p = KEYS.partition_of(channel)
    h.sub.want(channel)
    h.sub._pending.clear()
    h.sent(p)
    h.confirm(p)
    h.feed("sunsubscribe", p, 0)  # its slot was migrated away
    assert p not in h.sub._confirmed and p in h.sub._pending and h.sub._refresh_slots
    h.sent(p)  # flush_wanted: SSUBSCRIBE where the slot is now
    h.confirm(p)
    await asyncio.sleep(0)
    assert h.resubscribed == 1 and p in h.sub._confirmed


async def test_our_own_unsubscribe_is_not_a_loss() -> None:
    h = Harness()
    h.connect()
    channel = KEYS.room_channel(7)
    p = KEYS.partition_of(channel)
    h.sub.want(channel)
    h.sent(p)
    h.confirm(p)
    h.sub._pubsub = None
    await h.sub.unsubscribe(channel)
    h.feed("sunsubscribe", p, 0)
    assert p not in h.sub._pending and not h.sub._refresh_slots
