"""The pub/sub liveness deadline: ``Liveness`` (pure, times given) and the reader acting on it.

The reader is driven through a fake pub/sub and a fake clock: no I/O, no waiting for real deadlines.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Any

import pytest
from prometheus_client import REGISTRY

from chatd.process.config import StorageSettings
from chatd.realtime.pubsub import Liveness, Subscriber

# deadline 6 s: a PING due after 2 s of silence, readiness late after 4 s, dead after 6 s


def test_silence_brings_a_ping_every_third_then_late_then_dead() -> None:
    live = Liveness(6.0, now=100.0)
    assert (live.ping_due(101.9), live.late(101.9), live.expired(101.9)) == (False, False, False)
    assert live.wait_s(100.0) == pytest.approx(2.0)
    assert live.ping_due(102.0)
    live.pinged(102.0)
    assert not live.ping_due(103.9) and live.wait_s(102.0) == pytest.approx(2.0)  # the next PING at 104
    assert not live.late(103.9) and live.late(104.0)  # a PING unanswered for a third of the deadline
    assert live.ping_due(104.0)
    live.pinged(104.0)
    assert live.wait_s(104.0) == pytest.approx(2.0)  # PING at 106 and deadline at 106: the earlier
    assert not live.expired(105.9) and live.expired(106.0)
    assert live.wait_s(107.0) == 0.0  # overdue: act now


def test_anything_read_resets_the_deadline() -> None:
    live = Liveness(6.0, now=0.0)
    live.pinged(2.0)
    live.heard(3.0)  # the PONG (or any message)
    assert not live.late(6.9) and not live.expired(8.9)
    assert live.silent_s(5.0) == pytest.approx(2.0)
    assert not live.ping_due(4.9) and live.ping_due(5.0)  # a third after the last read
    assert live.wait_s(4.0) == pytest.approx(1.0)


def test_a_steady_flow_needs_no_ping() -> None:
    live = Liveness(6.0, now=0.0)
    for t in range(1, 60):
        live.heard(t * 1.5)
        assert not live.ping_due(t * 1.5 + 1.9) and not live.late(t * 1.5 + 1.9)


def test_a_new_connection_starts_a_new_deadline() -> None:
    live = Liveness(6.0, now=0.0)
    assert live.expired(10.0)
    live.restart(10.0)
    assert not live.expired(15.9) and not live.late(13.9) and not live.ping_due(11.9)


# -- the reader ---------------------------------------------------------------------------------


class Clock:
    def __init__(self, frozen: bool = False) -> None:
        self.now = 1000.0
        self.frozen = frozen  # time stands still: a read that finds nothing returns at once

    def __call__(self) -> float:
        return self.now


class FakePubSub:
    """One connection: answers SUBSCRIBE and PING while alive; dead, it reads nothing (half-open)."""

    def __init__(self, clock: Clock, alive: bool) -> None:
        self.clock = clock
        self.alive = alive
        self.sent: list[tuple[str, ...]] = []
        self.inbox: deque[dict[str, Any]] = deque()
        self.closed = False

    async def subscribe(self, *channels: str) -> None:
        self.sent.append(("SUBSCRIBE", *channels))
        if self.alive:
            self.inbox.extend({"type": "subscribe", "channel": c.encode(), "data": 1} for c in channels)

    async def ping(self) -> None:
        self.sent.append(("PING",))
        if self.alive:
            self.inbox.append({"type": "pong", "channel": None, "data": b""})

    async def get_message(self, timeout: float) -> dict[str, Any] | None:  # noqa: ASYNC109  (redis-py's API)
        await asyncio.sleep(0)
        if self.inbox:
            return self.inbox.popleft()
        if not self.clock.frozen:
            self.clock.now += timeout  # waited the whole timeout for nothing
        return None

    async def unsubscribe(self, *channels: str) -> None:
        self.sent.append(("UNSUBSCRIBE", *channels))

    async def aclose(self) -> None:
        self.closed = True


class FakeClient:
    def __init__(self, connections: list[FakePubSub]) -> None:
        self.connections = connections
        self.opened: list[FakePubSub] = []

    def pubsub(self, ignore_subscribe_messages: bool = False) -> FakePubSub:
        conn = self.connections.pop(0)
        self.opened.append(conn)
        return conn

    async def aclose(self) -> None:
        pass


def timeouts() -> float:
    return REGISTRY.get_sample_value("chatd_pubsub_liveness_timeouts_total") or 0.0


async def test_a_half_open_connection_is_dropped_and_the_new_one_resubscribes() -> None:
    clock = Clock(frozen=True)
    resubscribed: list[float] = []
    sub = Subscriber(
        StorageSettings(redis_url="redis://127.0.0.1:1/0", pubsub_liveness_s=6.0),
        lambda c, d: None,
        lambda: resubscribed.append(clock.now),
        clock=clock,
    )
    first, second = FakePubSub(clock, alive=True), FakePubSub(clock, alive=True)
    real_client, sub._client = sub._client, FakeClient([first, second])  # type: ignore[assignment]
    sub._wanted.add("room:1")
    before = timeouts()
    reader = asyncio.ensure_future(sub.run())
    try:
        for _ in range(20):  # connected and confirmed
            await asyncio.sleep(0)
        assert sub.live and sub.health()["ok"] and first.sent == [("SUBSCRIBE", "room:1")]

        started = clock.now
        first.alive, clock.frozen = False, False  # from now on nothing comes back
        seen: list[tuple[float, bool, bool]] = []  # (seconds of silence, live, connected)
        while True:
            await asyncio.sleep(0)
            if first.closed:  # dropped (then at once the next connection)
                break
            seen.append((clock.now - started, sub.live, sub.connected))
        assert all(live for t, live, _ in seen if t < 4)
        assert all(connected and not live for t, live, connected in seen if 4 <= t < 6)  # late: not ready
        assert not any(connected for t, _, connected in seen if t >= 6)  # dropped at the deadline
        assert next(t for t, _, connected in seen if not connected) == pytest.approx(6.0)
        assert first.sent[1:] == [("PING",), ("PING",)]  # after 2 s and 4 s of silence
        assert timeouts() == before + 1

        while not resubscribed:  # the reconnect: SUBSCRIBE again, confirmed, then the repair is told
            await asyncio.sleep(0.01)
        assert second.sent[0] == ("SUBSCRIBE", "room:1") and len(resubscribed) == 1
        assert sub.live
    finally:
        reader.cancel()
        with pytest.raises(asyncio.CancelledError):
            await reader
        sub._client = real_client
        await sub.close()


async def test_the_ping_answers_keep_an_idle_connection() -> None:
    clock = Clock()
    sub = Subscriber(
        StorageSettings(redis_url="redis://127.0.0.1:1/0", pubsub_liveness_s=6.0),
        lambda c, d: None,
        lambda: None,
        clock=clock,
    )
    conn = FakePubSub(clock, alive=True)
    real_client, sub._client = sub._client, FakeClient([conn])  # type: ignore[assignment]
    reader = asyncio.ensure_future(sub.run())  # nothing subscribed: PINGs all the same
    try:
        started = clock.now
        while clock.now - started < 60:
            await asyncio.sleep(0)
            assert sub.live
        assert not conn.closed and 25 <= conn.sent.count(("PING",)) <= 32  # the first, then one per 2 s
    finally:
        reader.cancel()
        with pytest.raises(asyncio.CancelledError):
            await reader
        sub._client = real_client
        await sub.close()
