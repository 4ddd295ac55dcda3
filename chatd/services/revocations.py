"""Kicks and closes that do not depend on pub/sub: the revocation log read back from Postgres.

A removal, a ban or a logout is announced over Redis at once (``Hub.kick``, ``Hub.close_user``), but a
PUBLISH can be refused or lost, and a socket on another instance would then go on reading the room, or
stay open until its token expires.  Every worker therefore reads the revocations of the last minute once
per ``ws.probe_interval_s`` (one indexed query) and applies the new ones to its own sockets: a removed
member's sockets leave the room (``left``), and sockets of a revoked session or a banned or deleted user
are closed with the code the announcement would have used (the status is read again, as the handshake
reads it).  So nothing of the room reaches them later than one probe interval plus one query.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterable

from chatd.core import errors
from chatd.process.logs import app_log, fields
from chatd.realtime.fanout import Hub
from chatd.storage import revocations
from chatd.storage.db import Database
from chatd.storage.revocations import Revocation

WINDOW_S = 60.0  # how far back each read looks: far longer than a commit can trail its row's `at`
RETENTION_S = 3600.0
_FORGET_EVERY_S = 60.0

SessionCheck = Callable[[int, str | None], Awaitable[tuple[int, str] | None]]


class Seen:
    """Which revocations were applied already (pure): each is applied once, remembered for the window."""

    def __init__(self, window_s: float) -> None:
        self.window_s = window_s
        self._at: dict[int, float] = {}

    def fresh(self, rows: Iterable[Revocation], now: float) -> list[Revocation]:
        for rid in [rid for rid, at in self._at.items() if now - at > 2 * self.window_s]:
            del self._at[rid]  # out of every later read's window too
        new = [r for r in rows if r.id not in self._at]
        for r in new:
            self._at[r.id] = now
        return new


class Revocations:
    def __init__(
        self,
        hub: Hub,
        db: Database,
        session_ended: SessionCheck,
        interval_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.hub = hub
        self.db = db
        self.session_ended = session_ended
        self.interval_s = interval_s
        self.clock = clock
        self.seen = Seen(WINDOW_S)
        self._forgot_at = clock()

    async def run(self) -> None:
        """The revocation loop (a supervised task)."""
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                await self.poll()
            except errors.Unavailable:
                pass  # Postgres is down: nobody can be revoked meanwhile either

    async def poll(self) -> None:
        now = self.clock()
        if now - self._forgot_at > _FORGET_EVERY_S:
            self._forgot_at = now
            await revocations.forget_older(self.db, RETENTION_S)
        if not self.hub.users:
            return  # no local socket to revoke; rows read later are still in the window
        for rev in self.seen.fresh(await revocations.recent(self.db, WINDOW_S), self.clock()):
            if rev.user_id not in self.hub.users:
                continue
            if rev.room_id is not None:
                self.hub.kick_local(rev.user_id, rev.room_id)
            else:
                await self._close_ended(rev.user_id)

    async def _close_ended(self, user_id: int) -> None:
        for family in {conn.family for conn in self.hub.users.get(user_id, ())}:
            ended = await self.session_ended(user_id, family)
            if ended is not None:
                app_log.info("revoked_socket_closed", extra=fields(user_id=user_id, code=ended[0]))
                self.hub.close_local(user_id, ended[0], ended[1], family)
