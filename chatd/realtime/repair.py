"""Repair: what pub/sub lost, read back from Postgres.

A publish can be lost (a publisher crashed after its commit, Redis blinked or
refused it).  Two things find the loss, and one query per round reads it back:

* held messages: a later seq arrived first, so an earlier one is missing;
* the probe: once per ``ws.probe_interval_s`` one query reads ``last_seq``
  and ``edit_rev`` of every room this worker has sockets in, so the last
  message or edit of a quiet room is found too.

Missing for ``ws.gap_timeout_ms`` (a publish merely in flight arrives
sooner), the exact ranges of every room are read in one query and released
through the rooms' logs (``chatd.core.roomlog``).  After a Redis reconnect the subscriber calls
``urgent``: probe and read at once, since publishes were surely lost.  A seq
Postgres cannot return although it must exist is an invariant breach: logged
as an error, counted, and the room's sockets get ``resync_required``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from chatd.core import errors, server_frames, wsframe
from chatd.core.roomlog import Event, member_left_user
from chatd.core.sequencing import Gap
from chatd.process import metrics
from chatd.process.config import WebSocketSettings
from chatd.process.logs import app_log, fields
from chatd.realtime.fanout import Hub
from chatd.storage import messages as messages_db
from chatd.storage.db import Database

_ROOMS_PER_QUERY = 200
_CHANGES_PER_ROOM = 500


class Repair:
    def __init__(
        self, hub: Hub, db: Database, settings: WebSocketSettings, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.hub = hub
        self.db = db
        self.probe_interval_s = settings.probe_interval_s
        self.tick_s = min(settings.gap_timeout_ms / 2000, settings.probe_interval_s)
        self.clock = clock
        self._urgent = asyncio.Event()
        hub.resubscribed_hooks.append(self.urgent)
        hub.probe_hooks.append(self.urgent)

    def urgent(self) -> None:
        self._urgent.set()

    async def run(self) -> None:
        """The repair loop (a supervised task)."""
        next_probe = self.clock() + self.probe_interval_s
        while True:
            try:
                await asyncio.wait_for(self._urgent.wait(), self.tick_s)
            except TimeoutError:
                pass
            urgent = self._urgent.is_set()
            self._urgent.clear()
            try:
                if urgent or self.clock() >= next_probe:
                    next_probe = self.clock() + self.probe_interval_s
                    await self.probe()
                await self.fill(urgent=urgent)
            except errors.Unavailable:
                if urgent:
                    self._urgent.set()  # Postgres is down too: try again next tick
                    await asyncio.sleep(self.tick_s)

    async def probe(self) -> None:
        rooms = [room_id for room_id, room in self.hub.rooms.items() if room.opened]
        for i in range(0, len(rooms), _ROOMS_PER_QUERY * 5):
            rows = await messages_db.probe_rooms(self.db, rooms[i : i + _ROOMS_PER_QUERY * 5])
            now = self.clock()
            for room_id, last_seq, edit_rev in rows:
                room = self.hub.rooms.get(room_id)
                if room is not None:
                    room.probed(last_seq, edit_rev, now)

    async def fill(self, urgent: bool = False) -> None:
        now = self.clock()
        gaps: dict[int, Gap] = {}
        changes: dict[int, tuple[int, int]] = {}  # room -> (after, committed when asked)
        for room_id, room in self.hub.rooms.items():
            gap = room.missing_messages(now, urgent=urgent)
            if gap is not None:
                gaps[room_id] = gap
            after = room.missing_changes(now, urgent=urgent)
            if after is not None:
                changes[room_id] = after
        if gaps:
            await self._fill_messages(gaps)
        if changes:
            await self._fill_changes(changes)

    async def _fill_messages(self, gaps: dict[int, Gap]) -> None:
        items = list(gaps.items())
        for i in range(0, len(items), _ROOMS_PER_QUERY):
            chunk = items[i : i + _ROOMS_PER_QUERY]
            rows = await messages_db.messages_in_ranges(self.db, [(r, g.first, g.last) for r, g in chunk])
            by_room: dict[int, list[tuple[int, Event]]] = {}
            for row in rows:
                payload = server_frames.encode_bytes(server_frames.message_from_row(row))
                frame = wsframe.ws_text_frame(payload)
                if row["role"] == "assistant" and row["reply_to_id"] is not None:
                    # Its stream_end was probably lost with it: the frame carries both (clients ignore a
                    # second stream_end of the same answer).
                    frame += wsframe.ws_text_frame(server_frames.encode_bytes(server_frames.stream_end_from_row(row)))
                seq = int(row["seq"])
                event = Event(frame, seq, removes=member_left_user(payload))
                by_room.setdefault(row["room_id"], []).append((seq, event))
            now = self.clock()
            for room_id, gap in chunk:
                room = self.hub.rooms.get(room_id)
                if room is None:
                    continue  # the last socket left meanwhile
                found = by_room.get(room_id, [])
                writes, filled = room.filled(gap, found, now)
                if found:
                    metrics.gaps_filled.inc(len(found))
                    app_log.info("gap_filled", extra=fields(room_id=room_id, first=gap.first, count=len(found)))
                for lost in filled.lost:
                    metrics.seqs_lost.inc(lost.count)
                    app_log.error(
                        "seq_lost", extra=fields(room_id=room_id, first=lost.first, last=lost.last, action="resync")
                    )
                self.hub.apply(room, writes)

    async def _fill_changes(self, changes: dict[int, tuple[int, int]]) -> None:
        items = list(changes.items())
        for i in range(0, len(items), _ROOMS_PER_QUERY):
            chunk = items[i : i + _ROOMS_PER_QUERY]
            rows = await messages_db.changes_after(self.db, [(r, after) for r, (after, _) in chunk], _CHANGES_PER_ROOM)
            by_room: dict[int, list[tuple[int, tuple[int, int, Event]]]] = {}
            for row in rows:
                frame = wsframe.ws_text_frame(server_frames.encode_bytes(server_frames.change_from_row(row)))
                rev = int(row["edit_rev"])
                by_room.setdefault(row["room_id"], []).append((rev, (int(row["id"]), rev, Event(frame))))
            now = self.clock()
            for room_id, (after, upto) in chunk:
                room = self.hub.rooms.get(room_id)
                if room is None:
                    continue
                found = by_room.get(room_id, [])
                writes, read = room.changes_filled(after, upto, found, len(found) < _CHANGES_PER_ROOM, now)
                if read:
                    metrics.gaps_filled.inc(read)
                self.hub.apply(room, writes)
