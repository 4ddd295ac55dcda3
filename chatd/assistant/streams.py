"""Answer streams on the wire: each frame to the local sockets now, its Redis side batched; catch-up for joiners.

A ``stream_start`` or ``stream_chunk`` is delivered to this worker's sockets at once.  What it means for
Redis (the stream's state for cancel and catch-up, the text so far, the PUBLISH to other workers) waits for
the next round trip, which carries those of every stream of this worker: with hundreds of streams a
chunk costs a share of one pipeline, not two awaited commands.  ``idle`` is awaited before a stream's
stored ``message`` and ``stream_end`` go out, so that elsewhere too the chunks come first.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from chatd.core import errors, server_frames
from chatd.realtime.fanout import Hub
from chatd.storage.kv import KV

STATE_TTL_S = 3600  # a stream's Redis state outlives any answer; cleared when it ends


class StreamRelay:
    def __init__(self, hub: Hub, kv: KV) -> None:
        self.hub = hub
        self.kv = kv
        self._begins: list[tuple[int, int, dict[str, Any], int]] = []
        self._appends: list[tuple[int, str, int]] = []
        self._publishes: list[tuple[str, bytes]] = []
        self._task: asyncio.Task[None] | None = None
        self._idle = asyncio.Event()
        self._idle.set()

    def start(self, room_id: int, message_id: int, frame: dict[str, Any], state: dict[str, Any]) -> None:
        """``stream_start``, with the stream's state (catch-up, cancel permission) written with its publish."""
        self._frame(room_id, message_id, frame, -1)
        self._begins.append((message_id, room_id, state, STATE_TTL_S))

    def chunk(self, room_id: int, message_id: int, index: int, content: str) -> None:
        frame = server_frames.stream_chunk(room_id=room_id, message_id=message_id, index=index, content=content)
        self._frame(room_id, message_id, frame, index)
        self._appends.append((message_id, content, index))

    async def idle(self) -> None:
        """Every frame relayed so far has had its Redis round trip (or failed it)."""
        await self._idle.wait()

    async def clear(self, room_id: int, message_id: int) -> None:
        """The stream ended: its Redis state goes (a late joiner gets the stored message instead)."""
        with contextlib.suppress(errors.Unavailable):
            await self.kv.stream_clear(room_id, message_id)

    def _frame(self, room_id: int, message_id: int, frame: dict[str, Any], index: int) -> None:
        payload = server_frames.encode_bytes(frame)
        stream = (message_id, index)
        self.hub.deliver_frame(room_id, payload, None, stream)
        self._publishes.append(self.hub.room_frame_envelope(room_id, payload, None, stream))
        if self._task is None or self._task.done():
            self._idle.clear()
            self._task = asyncio.ensure_future(self._write_batches())

    async def _write_batches(self) -> None:
        try:
            while self._publishes:
                begins, appends, publishes = self._begins, self._appends, self._publishes
                self._begins, self._appends, self._publishes = [], [], []
                try:
                    await self.kv.stream_batch(begins, appends, publishes)
                except errors.Unavailable:
                    pass  # logged by kv: other workers' members and late joiners miss these; the message follows
        finally:
            self._idle.set()

    async def live(self, room_id: int) -> list[tuple[int, int, list[dict[str, Any]]]]:
        """``(message_id, index, frames)`` to bring a joining socket up to date with the room's running streams."""
        out: list[tuple[int, int, list[dict[str, Any]]]] = []
        try:
            streams = await self.kv.room_streams(room_id)
        except errors.Unavailable:
            return out  # a late joiner misses the text so far; the final message comes anyway
        for mid, st, text in streams:
            index = int(st[b"index"])
            frames = [
                server_frames.stream_start(
                    room_id=room_id,
                    message_id=mid,
                    reply_to_message_id=int(st[b"reply_to"]),
                    model=st[b"model"].decode(),
                    answered_by=_answered_by(st),
                )
            ]
            if index >= 0:
                frames.append(
                    server_frames.stream_chunk(room_id=room_id, message_id=mid, index=index, content=text.decode())
                )
            out.append((mid, index, frames))
        return out


def _answered_by(state: dict[bytes, bytes]) -> dict[str, Any] | None:
    """A named assistant's identity from the stream's state (``Generations._stream`` writes it)."""
    if not state.get(b"assistant_id"):
        return None
    return {
        "id": int(state[b"assistant_id"]),
        "name": state[b"assistant_name"].decode(),
        "model": state[b"model"].decode(),
    }
