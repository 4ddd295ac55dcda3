"""Group commit: every new message of a worker goes through one ``MessageWriter``.

A send commits at once when the writer is idle; sends arriving while a
transaction runs wait and form the next batch (up to ``batch_max_messages``,
plus an optional ``batch_max_delay_ms``), so a loaded database sees few large
transactions and an idle one adds no delay.  A send is acked only after its
transaction committed; right after the commit its messages go to this
worker's sockets, in commit order, and to the hub's publish queue for the
other workers (``chatd.realtime.outbox``): no commit ever waits for Redis.  Under overload (a full batch waiting) up to
``commit_concurrency`` transactions run at once, on disjoint rooms: the messages
of a room are in one transaction at a time, so they keep their order.

Bounds, so overload degrades instead of collapsing:

* the queue holds at most ``send_queue_max`` sends; beyond it ``submit``
  raises ``Busy`` with a ``retry_after_ms`` from ``BusyPacer`` (drain time,
  lengthened while many sends are refused, spread);
* a send waits at most ``pg_query_timeout_s`` for its commit: past it (a
  paused or unreachable Postgres) it fails with ``Unavailable``, and its
  ``client_msg_id`` makes the client's retry safe even if the commit landed.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from chatd.core import errors, server_frames
from chatd.process import metrics
from chatd.process.config import Settings
from chatd.process.logs import app_log, fields
from chatd.storage import messages as messages_db
from chatd.storage.db import Database
from chatd.storage.messages import Committed, PendingMessage


class Publisher(Protocol):
    def publish_messages(self, items: Sequence[tuple[int, int, bytes]]) -> None: ...


@dataclass(slots=True)
class _Queued:
    message: PendingMessage
    future: asyncio.Future[Committed]
    deadline: float


class BusyPacer:
    """How long a sender told ``busy`` should wait (``retry_after_ms``): the time the queue takes to
    drain at the rate sends were accepted, stretched by how many were refused per accepted one in the
    last window. Under a flood the waits grow until refusals are rare, so the CPU goes to the sends
    that commit instead of to refusing the same clients again and again (pure: injected clock)."""

    def __init__(self, clock: Callable[[], float], window_s: float = 1.0, min_ms: int = 100, max_ms: int = 5000):
        self.clock = clock
        self.window_s = window_s
        self.min_ms = min_ms
        self.max_ms = max_ms
        self._start = clock()
        self._accepted = 0
        self._refused = 0
        self.accepted_per_s = 0.0  # of the last complete window
        self.refused_per_accepted = 0.0

    def accepted(self) -> None:
        self._accepted += 1  # the hot path: no clock read

    def refused(self, queued: int) -> int:
        """Count a refusal; the ``retry_after_ms`` to give it."""
        now = self.clock()
        span_s = now - self._start
        if span_s >= self.window_s:
            self.accepted_per_s = self._accepted / span_s
            ratio = self._refused / max(self._accepted, 1)
            self.refused_per_accepted = 0.5 * self.refused_per_accepted + 0.5 * ratio  # smoothed: no see-saw
            self._start, self._accepted, self._refused = now, 0, 0
        self._refused += 1
        rate = self.accepted_per_s or (self._accepted / span_s if span_s > 0 and self._accepted else 1000.0)
        # Spread over [1, 2) x the wait: refused together, the clients must not all come back together.
        spread = 1 + (self._refused * 0.618034) % 1
        wait_ms = queued / max(rate, 1.0) * (1 + self.refused_per_accepted) * spread * 1000
        return int(min(self.max_ms, max(self.min_ms, wait_ms)))


class MessageWriter:
    def __init__(
        self,
        db: Database,
        hub: Publisher,
        settings: Settings,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.db = db
        self.hub = hub
        self.clock = clock
        ws = settings.ws
        self.max_batch = ws.batch_max_messages
        self.max_delay_s = ws.batch_max_delay_ms / 1000
        self.max_queue = ws.send_queue_max
        self.concurrency = ws.commit_concurrency
        self.timeout_s = settings.storage.pg_query_timeout_s
        self._queue: collections.deque[_Queued] = collections.deque()
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._has_room = asyncio.Event()  # the queue is below half its bound
        self._has_room.set()
        self._pacer = BusyPacer(clock)
        self._in_flight: list[list[_Queued]] = []  # batches whose transaction runs
        self._flushes: set[asyncio.Future[None]] = set()
        self._stalled_at: int | None = None  # queue length when a concurrent batch found only rooms in transactions
        self.batches = 0
        self.committed = 0

    @property
    def backlog(self) -> int:
        return len(self._queue)

    def submit(self, message: PendingMessage) -> asyncio.Future[Committed]:
        """Queue a message for the next batch; the future resolves once it is durable.

        Synchronous on purpose: callers enqueue in the order their frames arrived, so
        a socket's pipelined sends get increasing seqs without waiting for each commit.
        """
        if len(self._queue) >= self.max_queue:
            metrics.sends_busy.inc()
            raise errors.Busy("server busy, retry later", retry_after_ms=self._pacer.refused(len(self._queue)))
        self._pacer.accepted()
        fut: asyncio.Future[Committed] = asyncio.get_running_loop().create_future()
        self._queue.append(_Queued(message, fut, self.clock() + self.timeout_s))
        if len(self._queue) >= self.max_queue // 2:
            self._has_room.clear()
        self._idle.clear()
        self._wake.set()
        return fut

    async def wait_capacity(self, timeout_s: float) -> None:
        """Returns once the queue is below half its bound, or after ``timeout_s``.

        A socket told ``busy`` is not read meanwhile: at most ``retry_after_ms`` of its
        frames wait in its TCP buffer, so an accepted send's latency stays bounded.
        """
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):  # no task per call, unlike wait_for (3.11)
                await self._has_room.wait()

    async def drain(self) -> None:
        """Shutdown: let every queued send commit (or fail) and be answered (and handed to the hub)."""
        await self._idle.wait()

    async def run(self) -> None:
        """The commit loop (a supervised task)."""
        try:
            while True:
                if not self._queue or not self._may_start():
                    if not self._queue and not self._flushes:
                        self._idle.set()
                    self._wake.clear()
                    await self._wake.wait()  # a submit, or a transaction that ended
                    continue
                if self.max_delay_s and len(self._queue) < self.max_batch:
                    await asyncio.sleep(self.max_delay_s)
                batch = self._take()
                if not batch:
                    # Every queued send is for a room in a running transaction: look again once a batch
                    # more has arrived, or a transaction ended (not on every submit: a scan is O(queue)).
                    self._stalled_at = len(self._queue) if self._flushes else None
                    continue
                self._in_flight.append(batch)  # answered by the `finally` below if the loop is cancelled meanwhile
                flush = asyncio.ensure_future(self._flush(batch))
                self._flushes.add(flush)
                flush.add_done_callback(self._flushed)
        finally:  # cancelled or crashed: nobody may wait for an answer that never comes
            for running in self._flushes:
                running.cancel()
            for item in (*self._queue, *(q for batch in self._in_flight for q in batch)):
                if not item.future.done():
                    item.future.set_exception(errors.Unavailable("server restarting its writer, try again"))
            self._queue.clear()
            self._in_flight = []
            self._has_room.set()
            self._idle.set()

    def _may_start(self) -> bool:
        """One transaction at a time, so sends arriving meanwhile form the next (large) batch; more only
        while a full batch waits: under overload a second round trip hides the first one's latency."""
        if not self._flushes:
            return True
        if self._stalled_at is not None and len(self._queue) < self._stalled_at + self.max_batch:
            return False
        return len(self._flushes) < self.concurrency and len(self._queue) >= self.max_batch

    def _flushed(self, flush: asyncio.Future[None]) -> None:
        self._flushes.discard(flush)
        self._stalled_at = None
        self._wake.set()
        if not flush.cancelled() and flush.exception() is not None:
            app_log.error("commit_flush_failed", exc_info=flush.exception())

    def _take(self) -> list[_Queued]:
        """The next batch, in queue order. Beside a running transaction, only rooms it does not hold: two
        transactions of one room could take the lock in either order, and a socket's sends to a room
        must get increasing seqs in the order it sent them."""
        now = self.clock()
        batch: list[_Queued] = []
        queue = self._queue
        held = {q.message.room_id for running in self._in_flight for q in running}
        skipped: list[_Queued] = []
        while queue and len(batch) < self.max_batch:
            item = queue.popleft()
            if item.future.done():
                continue
            if item.deadline <= now:  # waited its whole deadline behind a stuck commit
                item.future.set_exception(errors.Unavailable("database did not answer in time, try again"))
                continue
            if item.message.room_id in held:
                skipped.append(item)
                continue
            batch.append(item)
        queue.extendleft(reversed(skipped))  # back in front, in their order
        if len(queue) < self.max_queue // 2:
            self._has_room.set()
        metrics.send_queue.set(len(queue))
        return batch

    async def _flush(self, batch: list[_Queued]) -> None:
        started = self.clock()
        commit = asyncio.ensure_future(messages_db.commit_batch(self.db, [q.message for q in batch]))
        # A send's deadline counts from when it was read, not from when its batch started: answer it
        # `unavailable` then (the client's retry is safe: client_msg_id).  The transaction goes on, its rooms
        # stay held, and what it commits is delivered as usual.
        first_deadline = min(q.deadline for q in batch)
        done, _ = await asyncio.wait((commit,), timeout=max(0.0, first_deadline - started))
        if not done:
            for q in batch:
                if not q.future.done():
                    q.future.set_exception(errors.Unavailable("database did not answer in time, try again"))
        try:
            results = await commit
        except errors.ChatdError as exc:
            self._in_flight.remove(batch)
            for q in batch:
                if not q.future.done():
                    q.future.set_exception(type(exc)(exc.message))
            return
        except Exception as exc:
            self._in_flight.remove(batch)
            app_log.error("commit_failed", exc_info=exc, extra=fields(batch=len(batch)))
            for q in batch:
                if not q.future.done():
                    q.future.set_exception(errors.Internal())
            return
        self._in_flight.remove(batch)
        elapsed_s = self.clock() - started
        self.batches += 1
        metrics.commit_batch.observe(len(batch))
        metrics.commit_duration.observe(elapsed_s)
        fresh: list[tuple[int, int, bytes]] = []
        for q, result in zip(batch, results, strict=True):
            if not q.future.done():
                q.future.set_result(result)
            row = result.row
            if row is not None and not result.duplicate and result.error is None:
                fresh.append(
                    (row["room_id"], row["seq"], server_frames.encode_bytes(server_frames.message_from_row(row)))
                )
        self.committed += len(fresh)
        metrics.messages_committed.inc(len(fresh))
        if fresh:
            # Synchronous: local sockets now, in commit order (a room's batches never overlap), and the
            # envelopes queued for the other workers; a slow Redis holds neither this nor the next commit.
            self.hub.publish_messages(fresh)
