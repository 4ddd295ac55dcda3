"""Live read receipts, batched per room.

A busy room must not send every member a frame per read of every other
member: reads are gathered here and go out as one ``receipts`` frame per room
per interval (per worker), carrying each reader's latest shared marker.  The
frames are best effort (seq-less room frames over pub/sub, not repaired): the
markers themselves are durable in Postgres, and a client that reconnects reads
them again from ``GET /rooms/{id}/receipts``.
"""

from __future__ import annotations

import asyncio

from chatd.core import server_frames
from chatd.realtime.fanout import Hub


class Receipts:
    def __init__(self, hub: Hub, interval_s: float) -> None:
        self.hub = hub
        self.interval_s = interval_s
        self._pending: dict[int, dict[int, int]] = {}  # room id -> user id -> shared read seq
        self._wake = asyncio.Event()

    def add(self, room_id: int, user_id: int, seq: int) -> None:
        room = self._pending.setdefault(room_id, {})
        room[user_id] = max(seq, room.get(user_id, 0))
        self._wake.set()

    async def flush(self) -> None:
        pending, self._pending = self._pending, {}
        if pending:
            await self.hub.publish_room_frames(
                [(room_id, server_frames.receipts(room_id=room_id, seqs=seqs)) for room_id, seqs in pending.items()]
            )

    async def run(self) -> None:
        """The first read after a quiet interval goes out at once; the reads that follow wait for the
        next interval, so a room gets at most one frame per interval (a supervised task)."""
        while True:
            await self._wake.wait()
            self._wake.clear()
            await self.flush()
            await asyncio.sleep(self.interval_s)
