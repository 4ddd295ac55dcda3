"""Presence: who has a socket in a room, on any worker of any instance.

Each worker counts its own sockets per (room, user) and keeps one Redis entry
per (room, user, worker) (``kv.presence_apply``), so:

* a user is online while any worker has an entry; the first entry anywhere
  announces ``online``, the last one leaving puts the user on a pending list
  due after ``ws.presence_grace_s`` (back before that on any worker: nobody
  hears of it), and whichever worker sees it due announces ``offline``;
* a worker's entries live as long as its heartbeat (``ws.presence_ttl_s``,
  renewed every third of it); a crashed instance stops renewing, and the next
  heartbeat of any other worker sweeps its entries, so its users go offline
  within ``presence_ttl_s`` + ``presence_grace_s`` and the counts heal.  Redis
  adds an entry only for a worker whose heartbeat is live, and a clean shutdown
  removes the entries and the heartbeat in one script (``close``): whatever
  fails, no entry outlives its heartbeat;
* changes are applied and announced per room per tick (``ws.presence_tick_ms``):
  1,000 members joining a room cost a few frames per member, not 1,000;
* a lost announcement heals: each one carries the room's presence revision
  (bumped in Redis with it), and every ``ws.probe_interval_s`` each worker
  compares its rooms' revisions with Redis' in one round trip and reads the
  whole view of the rooms that differ or skipped a revision (every room after
  a pub/sub reconnect); its sockets get a ``presence`` frame with the
  difference (``chatd.core.presence_view``, ``Hub.heal_presence``).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from chatd.core import errors
from chatd.core.presence_view import UNKNOWN, HealSchedule
from chatd.process import metrics
from chatd.process.config import WebSocketSettings
from chatd.process.logs import app_log, fields
from chatd.realtime.fanout import Hub
from chatd.storage.kv import KV

_DUE_EVERY_S = 0.5
_HEAL_TRIGGERS = ("probe", "stale", "resubscribe")


class Presence:
    def __init__(
        self, kv: KV, hub: Hub, settings: WebSocketSettings, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.kv = kv
        self.hub = hub
        self.origin = hub.origin.decode()
        self.grace_s = settings.presence_grace_s
        self.ttl_s = settings.presence_ttl_s
        self.tick_s = settings.presence_tick_ms / 1000
        self.clock = clock
        self._local: dict[tuple[int, int], int] = {}  # (room, user) -> this worker's sockets
        self._changes: dict[int, dict[int, int]] = {}  # room -> user -> +1 / -1 not yet applied
        self._wake = asyncio.Event()
        self._next_beat = 0.0
        self._closed = False
        self.heals = HealSchedule(settings.probe_interval_s, clock())
        hub.resubscribed_hooks.append(self._resubscribed)
        for trigger in _HEAL_TRIGGERS:  # exported at 0 from the start
            metrics.presence_views_healed.labels(trigger)

    def joined(self, room_id: int, user_id: int) -> None:
        key = (room_id, user_id)
        n = self._local.get(key, 0) + 1
        self._local[key] = n
        if n == 1:
            self._change(room_id, user_id, +1)

    def left(self, room_id: int, user_id: int) -> None:
        key = (room_id, user_id)
        n = self._local.get(key, 0) - 1
        if n > 0:
            self._local[key] = n
            return
        self._local.pop(key, None)
        if n == 0:
            self._change(room_id, user_id, -1)

    def _change(self, room_id: int, user_id: int, delta: int) -> None:
        room = self._changes.setdefault(room_id, {})
        if room.pop(user_id, 0) + delta == 0:
            if not room:
                del self._changes[room_id]
            return  # joined and left within one tick: Redis never needs to know
        room[user_id] = delta
        self._wake.set()

    async def run(self) -> None:
        """Apply changes every tick, announce due offlines, keep the heartbeat (a supervised task)."""
        next_due = 0.0
        while True:
            if self._closed:
                await asyncio.Event().wait()  # retired: nothing to keep alive until the worker cancels its tasks
            now = self.clock()
            if now >= self._next_beat:
                self._next_beat = now + self.ttl_s / 3
                await self._heartbeat()
            if self._changes:
                await self.flush()
            if now >= next_due:
                next_due = now + _DUE_EVERY_S
                await self._announce_due()
            if self.heals.due(now):
                whole = self.heals.start(now)
                try:
                    await self.heal(whole)
                except errors.Unavailable:
                    self.heals.failed(whole)
            self._wake.clear()
            try:
                await asyncio.wait_for(
                    self._wake.wait(), min(_DUE_EVERY_S, self.ttl_s / 3, self.heals.wait_s(self.clock()))
                )
            except TimeoutError:
                pass
            await asyncio.sleep(self.tick_s)  # gather a tick's worth of changes

    async def flush(self) -> None:
        changes, self._changes = self._changes, {}
        pending = list(changes.items())
        while pending:
            room_id, users = pending[0]
            try:
                online = await self.kv.presence_apply(self.origin, room_id, list(users.items()), self.grace_s)
            except errors.Unavailable:
                self._retry(pending)
                return
            if online is None:  # our heartbeat lapsed (Redis was away for a TTL): beat first, then apply
                self._next_beat = 0.0
                self._retry(pending)
                return
            pending.pop(0)
            rev, came = online
            if came:
                await self.hub.publish_presence(room_id, came, [], rev)

    def _retry(self, pending: list[tuple[int, dict[int, int]]]) -> None:
        """Changes not applied: with a later tick (merged with the ones made meanwhile)."""
        for room_id, users in pending:
            for user, delta in users.items():
                self._change(room_id, user, delta)

    async def _announce_due(self) -> None:
        try:
            gone = await self.kv.presence_due()
        except errors.Unavailable:
            return
        for room_id, rev, users in gone:
            await self.hub.publish_presence(room_id, [], users, rev)

    def _resubscribed(self) -> None:
        self.heals.resubscribed()
        self._wake.set()

    async def heal(self, whole: bool = False) -> None:
        """Compare every room's view with Redis (one round trip); heal those that differ.

        ``whole``: read every view whole (after a pub/sub loss) instead of the revisions first.
        """
        asks: list[tuple[int, int]] = []
        asked_at: dict[int, int] = {}
        for room_id, room in self.hub.rooms.items():
            if room.presence is not None:  # None until the room's log is open
                asks.append((room_id, UNKNOWN if whole else room.presence.known_rev))
                asked_at[room_id] = room.presence.rev
        if not asks:
            return
        views = await self.kv.presence_views(asks)
        healed: dict[str, int] = {}
        for room_id, known in asks:
            view = views.get(room_id)
            if view is not None and self.hub.heal_presence(room_id, *view, asked_at[room_id]):
                trigger = "resubscribe" if whole else "stale" if known == UNKNOWN else "probe"
                healed[trigger] = healed.get(trigger, 0) + 1
        for trigger, n in healed.items():
            metrics.presence_views_healed.labels(trigger).inc(n)
        if healed:
            app_log.info("presence_healed", extra=fields(rooms=healed))

    async def _heartbeat(self) -> None:
        try:
            registered = await self.kv.heartbeat(self.origin, self.ttl_s)
        except errors.Unavailable:
            return
        if not registered and self._local:
            # Our entries were swept (Redis was gone longer than the TTL, or restarted empty): add them back.
            app_log.warning("presence_reasserted", extra=fields(entries=len(self._local)))
            for room_id, user_id in self._local:
                self._changes.setdefault(room_id, {})[user_id] = +1

    async def close(self) -> None:
        """Shutdown, after the sockets closed: this worker's entries and heartbeat go in one script.

        If Redis cannot take it, the heartbeat (no longer renewed) expires and the other workers sweep
        the entries: the users go offline within ``presence_ttl_s`` (+ a heartbeat) instead of the grace.
        """
        self._closed = True
        self._local.clear()
        self._changes.clear()
        try:
            await self.kv.presence_retire(self.origin, self.grace_s)
        except errors.Unavailable:
            app_log.warning("presence_retire_failed", extra=fields(swept_within_s=self.ttl_s))
