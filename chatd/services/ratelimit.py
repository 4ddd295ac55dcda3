"""Rate limits: ``limit`` events per ``window_s`` per subject.

* ``SlidingWindow``: the exact algorithm (a log of event times), pure, with an
  injected clock.  Used alone when a limit is per process.
* ``SharedQuota``: the same limit across every worker and instance without a
  Redis round trip per event, for the hot path (sends).  Each worker counts
  its own events exactly and learns, once per sync, how many the others
  counted (Redis counters per slice of the window, one script call for every
  active subject).  A user whose sockets sit on one worker (the usual case) is
  limited exactly; one who spreads sends over k workers can exceed the limit
  by at most what the others accepted during one sync interval.  Pure: the
  sync itself is ``SendLimiter``'s job.
* ``SendLimiter``: ``SharedQuota`` plus the sync loop.
* ``AuthLimiter``: login/register attempts, exact in Redis (they are rare);
  falls back to a per-process window when Redis does not answer.

The per-socket limits of client frames are ``chatd/core/framelimits.py`` (a socket's session holds them).
"""

from __future__ import annotations

import asyncio
import bisect
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from chatd.core import errors

if TYPE_CHECKING:
    from chatd.storage.kv import KV


@dataclass(frozen=True, slots=True)
class Decision:
    allowed: bool
    retry_after_ms: int = 0  # when refused: until an event leaves the window


class SlidingWindow:
    """In-process limiter; the reference the Redis script must agree with."""

    def __init__(self, limit: int, window_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.limit = limit
        self.window_s = window_s
        self._clock = clock
        self._events: dict[str, list[float]] = {}
        self._hits = 0

    def hit(self, subject: str, limit: int | None = None) -> Decision:
        """Count an event unless ``limit`` (default: the configured one) events are already in the window."""
        self._hits += 1
        if self._hits % 1024 == 0:
            self.forget_idle()  # memory bounded by the subjects active in one window
        now = self._clock()
        events = self._events.setdefault(subject, [])
        del events[: bisect.bisect_right(events, now - self.window_s)]
        budget = self.limit if limit is None else limit
        if len(events) >= budget:
            if budget > 0:  # allowed again once enough of our own events left the window
                leave_at = events[len(events) - budget] + self.window_s
            else:  # other workers used the whole quota: ask again after a tenth of the window
                leave_at = now + self.window_s / 10
            return Decision(False, max(1, math.ceil((leave_at - now) * 1000)))
        events.append(now)
        return Decision(True)

    def count(self, subject: str) -> int:
        """Events of ``subject`` in the window now."""
        events = self._events.get(subject)
        if not events:
            return 0
        return len(events) - bisect.bisect_right(events, self._clock() - self.window_s)

    def forget_idle(self) -> None:
        """Drop subjects with no event in the window (bounded memory)."""
        horizon = self._clock() - self.window_s
        for subject in [s for s, ev in self._events.items() if not ev or ev[-1] <= horizon]:
            del self._events[subject]


class SharedQuota:
    """``limit`` per ``window_s`` per subject over all workers; exact for this worker's own events."""

    def __init__(self, limit: int, window_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.limit = limit
        self.window_s = window_s
        self._clock = clock
        self._own = SlidingWindow(limit, window_s, clock)
        self._others: dict[str, tuple[int, float]] = {}  # subject -> (events of other workers, when learned)
        self._unsynced: dict[str, int] = {}  # own events not yet reported

    def hit(self, subject: str) -> Decision:
        others = self._others.get(subject)
        decision = self._own.hit(subject, None if others is None else max(0, self.limit - others[0]))
        if decision.allowed:
            self._unsynced[subject] = self._unsynced.get(subject, 0) + 1
        return decision

    def pending(self) -> dict[str, int]:
        """What to report at the next sync: own new events, and subjects whose others' count is watched."""
        out = dict.fromkeys(self._others, 0)
        out.update(self._unsynced)
        self._unsynced = {}
        return out

    def synced(self, subject: str, total_in_window: int) -> None:
        """Redis counted ``total_in_window`` events of ``subject`` over all workers (ours included)."""
        others = total_in_window - self._own.count(subject)
        if others > 0:
            self._others[subject] = (others, self._clock())
        else:
            self._others.pop(subject, None)

    def forget_stale(self) -> None:
        horizon = self._clock() - self.window_s
        for subject in [s for s, (_, at) in self._others.items() if at <= horizon]:
            del self._others[subject]


class SendLimiter:
    """``SharedQuota`` for sends, synced through Redis every ``sync_interval_s``."""

    SLICES = 10  # the shared window counts in slices of window_s / 10

    def __init__(self, kv: KV, limit: int, window_s: float, sync_interval_s: float = 0.5) -> None:
        self.kv = kv
        self.quota = SharedQuota(limit, window_s)
        self.sync_interval_s = sync_interval_s
        self._slice_ms = max(1, int(window_s * 1000 / self.SLICES))

    def hit(self, user_id: int) -> Decision:
        return self.quota.hit(str(user_id))

    async def run(self) -> None:
        """The sync loop (a supervised task): Redis down means each worker limits on its own meanwhile."""
        while True:
            await asyncio.sleep(self.sync_interval_s)
            self.quota.forget_stale()
            pending = self.quota.pending()
            if not pending:
                continue
            try:
                totals = await self.kv.quota_sync(
                    "send", pending, int(time.time() * 1000) // self._slice_ms, self.SLICES, self._slice_ms
                )
            except errors.Unavailable:
                continue
            for subject, total in zip(pending, totals, strict=True):
                self.quota.synced(subject, total)


class AuthLimiter:
    """Exact limits shared through Redis (one script call per attempt); local window while Redis is down."""

    def __init__(self, kv: KV, scope: str, limit: int, window_s: float) -> None:
        self.kv = kv
        self.scope = scope
        self.limit = limit
        self.window_ms = int(window_s * 1000)
        self._fallback = SlidingWindow(limit, window_s)

    async def hit(self, subject: str) -> Decision:
        try:
            allowed, retry_ms = await self.kv.rate_hit(self.scope, subject, self.limit, self.window_ms)
        except errors.Unavailable:
            return self._fallback.hit(subject)
        return Decision(allowed, retry_ms)
