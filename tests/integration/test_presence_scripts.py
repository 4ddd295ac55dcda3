"""The presence scripts against a real Valkey, called through ``KV`` as several instances would.

* Grace ends and heartbeat expiries are compared in Redis: an instance whose wall clock is an hour
  ahead or behind must neither announce a user offline before the grace ends nor sweep (or be swept
  as) a live instance.  The instance's clock is the ``time`` that ``chatd.storage.kv`` reads.
* No entry outlives its worker's heartbeat: a worker whose heartbeat is gone adds nothing, and a
  retiring worker's entries and heartbeat go together.
"""

from __future__ import annotations

import asyncio
import time
import types
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from chatd.core.keys import Keys
from chatd.process.config import StorageSettings
from chatd.storage import kv
from tests.conftest import Services

HOUR_S = 3600.0


@pytest.fixture
def skew(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """``skew(s)``: from now on, the wall clock that kv reads is ``s`` seconds off."""

    def set_skew(offset_s: float) -> None:
        clock = types.SimpleNamespace(
            time=lambda: time.time() + offset_s, monotonic=time.monotonic, perf_counter=time.perf_counter
        )
        monkeypatch.setattr(kv, "time", clock)

    yield set_skew


@pytest.fixture
async def store(services: Services) -> Any:
    client = kv.connect(StorageSettings(redis_url=services.redis_url))
    yield kv.KV(client, Keys(f"t{uuid.uuid4().hex[:8]}:"))
    await client.aclose()


async def online(store: kv.KV, room: int) -> list[int]:
    return (await store.presence_views([(room, -1)]))[room][1]


async def test_skewed_instance_clocks_do_not_flap_presence(store: kv.KV, skew: Any) -> None:
    room, grace_s, ttl_s = 1, 30.0, 30.0
    # Instance 1 (right clock): two users online, one of them leaves (offline once the 30 s grace ends).
    await store.heartbeat("w1", ttl_s)
    await store.presence_apply("w1", room, [(10, +1), (11, +1)], grace_s)
    await store.presence_apply("w1", room, [(10, -1)], grace_s)

    # Instance 2, an hour ahead: the grace has not ended and instance 1's heartbeat has not expired.
    skew(+HOUR_S)
    due_early = await store.presence_due()
    await store.heartbeat("w2", ttl_s)  # sweeps the workers whose heartbeat expired
    skew(0)
    online_after_ahead = await online(store, room)

    # Instance 3, an hour behind: its fresh heartbeat must not look expired to the others.
    skew(-HOUR_S)
    await store.heartbeat("w3", ttl_s)
    await store.presence_apply("w3", room, [(12, +1)], grace_s)
    skew(0)
    await store.heartbeat("w1", ttl_s)
    online_after_behind = await online(store, room)
    due_now = await store.presence_due()

    # 10 is in its grace (online until its offline is announced), 11 and 12 are there.
    assert (due_early, online_after_ahead, online_after_behind, due_now) == ([], [10, 11], [10, 11, 12], []), (
        f"due at +1 h: {due_early}; online after its heartbeat: {online_after_ahead};"
        f" online after the -1 h instance joined and another's heartbeat: {online_after_behind}; due: {due_now}"
    )


async def test_entries_never_outlive_the_heartbeat(store: kv.KV) -> None:
    room, grace_s, ttl_s = 1, 0.2, 30.0
    assert await store.presence_apply("w1", room, [(10, +1)], grace_s) is None  # no heartbeat: nothing added
    assert await online(store, room) == []
    await store.heartbeat("w1", ttl_s)
    assert await store.presence_apply("w1", room, [(10, +1), (11, +1)], grace_s) == (1, [10, 11])
    await store.heartbeat("w2", ttl_s)
    assert await store.presence_apply("w2", room, [(11, +1)], grace_s) == (0, [])  # online already (on w1)

    await store.presence_retire("w1", grace_s)  # a clean shutdown: w1's entries and heartbeat, at once
    assert await store.presence_apply("w1", room, [(12, +1)], grace_s) is None  # retired: adds nothing
    assert await store.presence_due() == []  # 10 is in its grace: still online, 11 still on w2
    assert await online(store, room) == [10, 11]
    await asyncio.sleep(grace_s + 0.1)
    assert await store.presence_due() == [(room, 2, [10])]
    assert await online(store, room) == [11]


async def test_each_announcement_bumps_the_revision_views_are_read_when_it_differs(store: kv.KV) -> None:
    grace_s = 0.1
    await store.heartbeat("w1", 30)
    assert await store.presence_views([(1, -1), (2, -1)]) == {1: (0, []), 2: (0, [])}
    assert await store.presence_apply("w1", 1, [(10, +1), (11, +1)], grace_s) == (1, [10, 11])
    assert await store.presence_apply("w1", 2, [(10, +1)], grace_s) == (1, [10])
    assert await store.presence_views([(1, 1), (2, 0)]) == {2: (1, [10])}  # room 1 is at revision 1 already

    # A user leaving and back within the grace: nobody hears of it, no revision.
    assert await store.presence_apply("w1", 1, [(11, -1)], grace_s) == (0, [])
    assert await store.presence_views([(1, -1)]) == {1: (1, [10, 11])}  # online through the grace
    assert await store.presence_apply("w1", 1, [(11, +1)], grace_s) == (0, [])
    await store.presence_apply("w1", 1, [(10, -1), (11, -1)], grace_s)
    await asyncio.sleep(grace_s + 0.1)
    assert await store.presence_due() == [(1, 2, [10, 11])]  # one announcement, one revision
    assert await store.presence_views([(1, 1)]) == {1: (2, [])}
    many = [(room, -1) for room in range(1000, 1000 + 1200)]  # more rooms than one script call takes
    assert len(await store.presence_views(many)) == 1200


async def test_a_grace_entry_left_by_a_previous_version_is_dropped(store: kv.KV) -> None:
    await store.heartbeat("w1", 30)
    await store.presence_apply("w1", 1, [(10, +1), (11, +1)], 30)
    await store.presence_apply("w1", 1, [(10, -1)], 30)
    assert await online(store, 1) == [10, 11]  # 10 in its grace
    # A worker of the previous version pops the pending entry and announces 10 offline: it knows no index.
    await store.client.zrem(store.keys.presence_pending(), "1:10")
    assert await online(store, 1) == [11]
    assert not await store.client.hexists(store.keys.presence_grace(1), "10")
