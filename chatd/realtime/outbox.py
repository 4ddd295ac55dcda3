"""The publish queue: envelopes for the other workers, published in order, never awaited by a commit.

The hub delivers to its own sockets at once and puts what the other workers need here; one task
publishes it in FIFO order (one pipeline per turn, so a channel's envelopes keep their order).  A slow or
frozen Redis then delays only the other workers' live copy, never a commit, an ack or a local delivery.
The queue is bounded twice: at most ``max_items`` envelopes (the oldest give way) and none older than
``deadline_s`` (dropped unpublished).  Both are safe for what must not be lost: messages and edits carry
seqs and revisions that the other workers' repair probes read back from Postgres within a probe interval,
and kicks and closes are read back from the revocation log; presence views heal from Redis
(``chatd.realtime.presence``).  Typing and stream chunks are best effort, as they always were.
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Callable, Sequence
from typing import Protocol

from chatd.core import errors
from chatd.process import metrics

_PER_PIPELINE = 500


class Broker(Protocol):
    async def publish_many(self, items: Sequence[tuple[str, bytes]]) -> None: ...


class PublishQueue:
    def __init__(
        self, broker: Broker, max_items: int, deadline_s: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.broker = broker
        self.max_items = max_items
        self.deadline_s = deadline_s
        self.clock = clock
        self._items: collections.deque[tuple[float, str, bytes]] = collections.deque()
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self.dropped_full = 0
        self.dropped_late = 0

    def __len__(self) -> int:
        return len(self._items)

    def put(self, items: Sequence[tuple[str, bytes]]) -> None:
        """Queue ``(channel, envelope)`` pairs (synchronous: the caller never waits for Redis)."""
        if not items:
            return
        now = self.clock()
        for channel, envelope in items:
            if len(self._items) >= self.max_items:
                self._items.popleft()
                self.dropped_full += 1
                metrics.publish_dropped.labels("full").inc()
            self._items.append((now, channel, envelope))
        self._idle.clear()
        self._wake.set()

    def take(self) -> list[tuple[str, bytes]]:
        """The next pipeline: up to ``_PER_PIPELINE`` envelopes in order, those past the deadline dropped."""
        now = self.clock()
        items = self._items
        while items and now - items[0][0] > self.deadline_s:
            items.popleft()
            self.dropped_late += 1
            metrics.publish_dropped.labels("late").inc()
        batch: list[tuple[str, bytes]] = []
        while items and len(batch) < _PER_PIPELINE:
            _, channel, envelope = items.popleft()
            batch.append((channel, envelope))
        return batch

    async def run(self) -> None:
        """The publishing loop (a supervised task)."""
        while True:
            if not self._items:
                self._idle.set()
                self._wake.clear()
                await self._wake.wait()
            batch = self.take()
            if not batch:
                continue
            try:
                await self.broker.publish_many(batch)
            except errors.Unavailable:
                metrics.publish_dropped.labels("failed").inc(len(batch))  # logged by kv; repaired as above

    async def drain(self) -> None:
        """Shutdown: returns once every queued envelope was published or dropped."""
        await self._idle.wait()
