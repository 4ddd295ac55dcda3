"""Group calls: requests that arrive while one call is in flight go together in the next one.

The group commit's idea (``chatd.writer``) for reads done per connection: under
a connect storm a thousand handshakes need a thousand auth checks; made one by
one, each pays a round trip and the driver's per-call cost.  ``Batched`` sends
the first request at once (an idle server adds no delay) and everything that
arrives meanwhile in the next call, up to ``max_batch``.  At most ``max_queue``
requests wait: beyond, a request fails at once with ``Unavailable`` (a handshake
answered 503 costs less than a queue that grows while the database is slow).
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

from chatd.core import errors

K = TypeVar("K")
V = TypeVar("V")


class Batched(Generic[K, V]):
    """``await batched(item)`` → ``call([items...])[i]``; ``run`` is the worker's supervised loop."""

    def __init__(
        self, call: Callable[[list[K]], Awaitable[Sequence[V]]], max_batch: int = 200, max_queue: int = 10_000
    ) -> None:
        self._call = call
        self.max_batch = max_batch
        self.max_queue = max_queue
        self._queue: collections.deque[tuple[K, asyncio.Future[V]]] = collections.deque()
        self._in_flight: list[tuple[K, asyncio.Future[V]]] = []
        self._wake = asyncio.Event()
        self._running = False

    def __call__(self, item: K) -> asyncio.Future[V]:
        fut: asyncio.Future[V] = asyncio.get_running_loop().create_future()
        if not self._running:  # shutting down (or restarting after a crash): fail fast, do not strand
            fut.set_exception(errors.Unavailable("server busy restarting, try again"))
            return fut
        if len(self._queue) >= self.max_queue:
            fut.set_exception(errors.Unavailable("server busy, try again"))
            return fut
        self._queue.append((item, fut))
        self._wake.set()
        return fut

    async def run(self) -> None:
        self._running = True
        try:
            while True:
                if not self._queue:
                    self._wake.clear()
                    await self._wake.wait()
                    continue
                batch = [self._queue.popleft() for _ in range(min(self.max_batch, len(self._queue)))]
                batch = [(item, fut) for item, fut in batch if not fut.done()]  # the caller gave up
                if not batch:
                    continue
                self._in_flight = batch  # failed by the outer `finally` if this loop is cancelled meanwhile
                try:
                    results = await self._call([item for item, _ in batch])
                except Exception as exc:
                    self._in_flight = []
                    for _, fut in batch:
                        if not fut.done():
                            fut.set_exception(exc)
                    continue
                self._in_flight = []
                for (_, fut), result in zip(batch, results, strict=True):
                    if not fut.done():
                        fut.set_result(result)
        finally:  # cancelled (shutdown) or crashed: nobody waits for ever
            self._running = False
            for _, fut in [*self._in_flight, *self._queue]:
                if not fut.done():
                    fut.set_exception(errors.Unavailable("server busy restarting, try again"))
            self._queue.clear()
