"""Sliding-window-log rate limits: ``limit`` events per ``window_s``.

Exact (no fixed-window burst at the boundary).  ``SlidingWindow`` is the pure
algorithm with an injected clock; ``RedisLimiter`` runs the same algorithm as
one Lua script so every worker and instance shares the count.  When Redis does
not answer, ``RedisLimiter`` falls back to a per-process ``SlidingWindow``
rather than refusing everyone: a Redis blink must not stop the chat.
"""

from __future__ import annotations

import bisect
import math
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from chatd.logs import app_log, fields


@dataclass(frozen=True, slots=True)
class Decision:
    allowed: bool
    retry_after_ms: int = 0  # when refused: until the oldest counted event leaves the window


class SlidingWindow:
    """In-process limiter; the reference the Redis script must agree with."""

    def __init__(self, limit: int, window_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.limit = limit
        self.window_s = window_s
        self._clock = clock
        self._events: dict[str, list[float]] = {}
        self._hits = 0

    def hit(self, subject: str) -> Decision:
        self._hits += 1
        if self._hits % 1024 == 0:
            self.forget_idle()  # memory bounded by the subjects active in one window
        now = self._clock()
        events = self._events.setdefault(subject, [])
        del events[: bisect.bisect_right(events, now - self.window_s)]
        if len(events) >= self.limit:
            return Decision(False, max(1, math.ceil((events[0] + self.window_s - now) * 1000)))
        events.append(now)
        return Decision(True)

    def forget_idle(self) -> None:
        """Drop subjects with no event in the window (bounded memory)."""
        horizon = self._clock() - self.window_s
        for subject in [s for s, ev in self._events.items() if not ev or ev[-1] <= horizon]:
            del self._events[subject]


# KEYS[1] = zset of event timestamps (ms); ARGV = now_ms, window_ms, limit, unique member
_SCRIPT = """
local key = KEYS[1]
local now = tonumber(ARGV[1])
local window = tonumber(ARGV[2])
local limit = tonumber(ARGV[3])
redis.call('ZREMRANGEBYSCORE', key, '-inf', now - window)
local count = redis.call('ZCARD', key)
if count >= limit then
  local oldest = redis.call('ZRANGE', key, 0, 0, 'WITHSCORES')
  local retry = tonumber(oldest[2]) + window - now
  if retry < 1 then retry = 1 end
  return {0, retry}
end
redis.call('ZADD', key, now, ARGV[4])
redis.call('PEXPIRE', key, window)
return {1, 0}
"""


class RedisLimiter:
    """Shared across workers and instances; degrades to a local window when Redis is down."""

    def __init__(
        self,
        client: aioredis.Redis,
        key: Callable[[str], str],
        limit: int,
        window_s: float,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._client = client
        self._key = key
        self.limit = limit
        self.window_ms = int(window_s * 1000)
        self._clock = clock
        self._script = client.register_script(_SCRIPT)
        self._fallback = SlidingWindow(limit, window_s)

    async def hit(self, subject: str) -> Decision:
        now_ms = int(self._clock() * 1000)
        try:
            allowed, retry_ms = await self._script(
                keys=[self._key(subject)], args=[now_ms, self.window_ms, self.limit, uuid.uuid4().hex]
            )
        except RedisError as exc:
            app_log.warning("rate_limit_redis_unavailable", extra=fields(error=str(exc)))
            return self._fallback.hit(subject)
        return Decision(bool(allowed), int(retry_ms))
