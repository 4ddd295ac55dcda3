"""Per-socket limits of client frames, pure: the caller passes the time (``now``, monotonic seconds).

``TokenBucket`` is one limit; ``FrameLimiter`` holds one bucket for every frame (``"all"``) and one per
group of frame types, and counts the socket's *violations* (refused frames, frames with invalid fields):
the ``max_violations``-th within ``violation_window_s`` tells its session to close the socket (1008).
Sends are not limited here (they have their per-user quota, ``services/ratelimit.py``).
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Decision:
    allowed: bool
    retry_after_ms: int = 0  # when refused: until a token is back


ALLOWED = Decision(True)


class TokenBucket:
    """``burst`` events at once, then ``rate_per_s``."""

    __slots__ = ("burst", "rate_per_s", "stamp", "tokens")

    def __init__(self, rate_per_s: float, burst: int) -> None:
        self.rate_per_s = rate_per_s
        self.burst = float(burst)
        self.tokens = float(burst)
        self.stamp: float | None = None

    def take(self, now: float) -> float:
        """Take one token: 0.0 if there was one, else the seconds until there is."""
        if self.stamp is not None:
            self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate_per_s)
        self.stamp = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return 0.0
        return (1.0 - self.tokens) / self.rate_per_s


class FrameLimiter:
    """One socket's frame limits: ``limits`` by bucket name (``"all"`` required), ``groups`` by frame type.

    Buckets are created on first use: a socket that only sends and pings holds two.
    """

    def __init__(
        self,
        limits: dict[str, tuple[float, int]],
        groups: dict[str, str],
        max_violations: int,
        violation_window_s: float,
    ) -> None:
        self._limits = limits
        self._groups = groups
        self._buckets: dict[str, TokenBucket] = {}
        self._max_violations = max_violations
        self._window_s = violation_window_s
        self._violations: list[float] = []  # times of the counted ones, ascending

    def _bucket(self, name: str) -> TokenBucket:
        bucket = self._buckets.get(name)
        if bucket is None:
            bucket = self._buckets[name] = TokenBucket(*self._limits[name])
        return bucket

    def hit(self, frame_type: str, now: float) -> Decision:
        wait_s = self._bucket("all").take(now)
        group = self._groups.get(frame_type)
        if not wait_s and group is not None:
            wait_s = self._bucket(group).take(now)
        if wait_s:
            return Decision(False, max(1, math.ceil(wait_s * 1000)))
        return ALLOWED

    def violation(self, now: float) -> bool:
        """Count one violation; True when the socket has had too many and must be closed."""
        events = self._violations
        del events[: bisect.bisect_right(events, now - self._window_s)]
        if len(events) >= self._max_violations - 1:
            return True
        events.append(now)
        return False
