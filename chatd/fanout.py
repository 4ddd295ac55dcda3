"""Fan-out: Redis pub/sub between workers and instances, frame-once local delivery.

Each worker holds ONE subscriber connection.  It subscribes to a room's
channel while it has at least one local socket in that room, and to a user's
channel while that user has a local socket (read sync, forced close).

On the wire between workers an event is ``header JSON + b"\\n" + frame JSON``;
the header carries what routing needs (room, seq, excluded connection) so the
frame itself is never re-parsed or re-encoded.  Each worker builds the
WebSocket frame bytes once and writes the same bytes to every local socket.

Ordering: room messages go through a ``RoomSequencer`` per room, fed by Redis
and by this worker's own commits (delivered locally at once, so Redis is not
on the path between two sockets of one worker); gaps older than the timeout
are read back from Postgres.  After a Redis reconnect every room is resynced
from Postgres, so a blink loses nothing that was committed.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from chatd import metrics, protocol, store
from chatd.keys import Keys
from chatd.logs import app_log, fields
from chatd.sequencing import JoinMerge, RoomSequencer
from chatd.state import ServerState


class Conn(Protocol):
    """What the hub needs of a socket (implemented by the WebSocket handler)."""

    connection_id: str
    user_id: int
    family: str | None
    room_seq: dict[int, int]  # last message seq delivered to this socket, per joined room
    stream_marks: dict[int, int]  # answer message id -> last chunk index it already has (caught up on join)

    def write_frame(self, frame: bytes) -> None: ...

    def force_close(self, code: int, reason: str) -> None: ...

    def kicked(self, room_id: int) -> None: ...


@dataclass(frozen=True, slots=True)
class Event:
    frame: bytes  # complete WebSocket frame, built once
    seq: int | None
    exclude: str | None  # connection id that must not receive it (its own echo)
    stream: tuple[int, int] | None = None  # (answer message id, chunk index; -1 = stream_start)


@dataclass
class RoomState:
    sockets: set[Any] = field(default_factory=set)
    joining: dict[Any, JoinMerge[Event]] = field(default_factory=dict)
    sequencer: RoomSequencer[Event] | None = None
    early: list[Event] = field(default_factory=list)  # arrived before last_seq was read
    ready: asyncio.Future[None] | None = None


def envelope(
    payload: bytes, *, origin: str, seq: int | None = None, exclude: str | None = None, op: str = "frame", **extra: Any
) -> bytes:
    """``header JSON \n frame JSON``: routing data without re-parsing the frame."""
    header: dict[str, Any] = {"op": op, "o": origin}
    if seq is not None:
        header["s"] = seq
    if exclude is not None:
        header["x"] = exclude
    header.update(extra)
    return json.dumps(header, separators=(",", ":")).encode() + b"\n" + payload


class Hub:
    def __init__(self, state: ServerState, clock: Callable[[], float] = time.monotonic) -> None:
        self.state = state
        self.keys: Keys = state.keys
        self.redis: aioredis.Redis = state.redis
        # The subscriber gets a connection of its own: a busy command pool must never keep the
        # fan-out reader from (re)connecting.
        self._sub_client: aioredis.Redis = aioredis.Redis.from_url(
            state.settings.storage.redis_url,
            socket_connect_timeout=state.settings.storage.redis_timeout_s,
            health_check_interval=30,
            max_connections=2,
        )
        self.clock = clock
        self.rooms: dict[int, RoomState] = {}
        self.users: dict[int, set[Any]] = {}
        self.control_handlers: dict[str, Callable[[dict[str, Any]], None]] = {}
        self._pubsub: Any = None
        self._confirm: dict[bytes, asyncio.Future[None]] = {}
        self._wake = asyncio.Event()
        self._gap_timeout_s = 0.25
        # Marks this worker's own publishes: it delivered them locally already.
        self.origin = secrets.token_hex(6)

    # -- lifecycle ------------------------------------------------------------

    def start(self) -> None:
        self.state.tasks.spawn(self._reader(), "fanout-reader")
        self.state.tasks.spawn(self._gap_filler(), "fanout-gaps")

    def _channels(self) -> list[str]:
        rooms = [self.keys.room_channel(r) for r in self.rooms]
        return [self.keys.control(), *rooms, *(self.keys.user_channel(u) for u in self.users)]

    async def _reader(self) -> None:
        backoff_s = 0.1
        first = True
        while True:
            pubsub = self._sub_client.pubsub(ignore_subscribe_messages=False)
            try:
                channels = self._channels()
                self._pubsub = pubsub
                if channels:
                    await pubsub.subscribe(*channels)
                elif not first:
                    await pubsub.ping()
                if not first:
                    app_log.info("fanout_reconnected", extra=fields(channels=len(channels)))
                    self.state.tasks.spawn(self._resync_all(), "fanout-resync")
                first = False
                backoff_s = 0.1
                while True:
                    if not pubsub.subscribed:
                        self._wake.clear()
                        await self._wake.wait()  # nothing to listen to until a first subscribe
                        continue
                    msg = await pubsub.get_message(timeout=1.0)
                    if msg is not None:
                        self._on_message(msg)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # whatever broke (redis-py can raise AttributeError on a torn
                # connection), the reader must come back: without it this worker goes deaf
                self._pubsub = None
                for fut in self._confirm.values():
                    if not fut.done():
                        fut.set_exception(exc)
                self._confirm.clear()
                app_log.warning("fanout_redis_lost", extra=fields(error=str(exc)[:200], retry_in_s=backoff_s))
                await asyncio.sleep(backoff_s)
                backoff_s = min(backoff_s * 2, 5.0)
            finally:
                try:
                    await pubsub.aclose()  # type: ignore[no-untyped-call]
                except Exception:  # the connection is already broken
                    pass

    # -- subscriptions --------------------------------------------------------

    async def _subscribe(self, channel: str) -> None:
        """Returns once Redis confirmed: later PUBLISHes will reach us."""
        pubsub = self._pubsub
        if pubsub is None:
            raise RedisError("fan-out not connected")
        key = channel.encode()
        fut = self._confirm.get(key)
        if fut is None:
            fut = asyncio.get_running_loop().create_future()
            self._confirm[key] = fut
            await pubsub.subscribe(channel)
            self._wake.set()
        await asyncio.wait_for(asyncio.shield(fut), self.state.settings.storage.redis_timeout_s)

    async def _unsubscribe(self, channel: str) -> None:
        pubsub = self._pubsub
        if pubsub is not None:
            try:
                await pubsub.unsubscribe(channel)
            except RedisError:
                pass

    async def join_room(self, conn: Conn, room_id: int) -> RoomState:
        """Subscribe (if first local socket) and mark ``conn`` as joining: live frames are held."""
        room = self.rooms.get(room_id)
        if room is None:
            room = self.rooms[room_id] = RoomState()
        room.joining[conn] = JoinMerge()
        room.sockets.add(conn)
        try:
            if room.ready is None:
                room.ready = asyncio.get_running_loop().create_future()
                try:
                    await self._subscribe(self.keys.room_channel(room_id))
                    row = await store.fetch_one(self.state.pg, "SELECT last_seq FROM rooms WHERE id = %s", (room_id,))
                    last_seq = int(row["last_seq"]) if row else 0
                    room.sequencer = RoomSequencer(last_seq + 1, self._gap_timeout_s)
                    early, room.early = room.early, []
                    for event in early:
                        self._release(room_id, room, room.sequencer.offer(event.seq or 0, event, self.clock()))
                    room.ready.set_result(None)
                except BaseException as exc:
                    room.ready.set_exception(exc)
                    room.ready.exception()  # retrieved: joiners waiting on it re-raise below
                    room.ready = None
                    raise
            else:
                await asyncio.shield(room.ready)
        except BaseException:
            await self.leave_room(conn, room_id)
            raise
        return room

    def finish_join(
        self,
        conn: Conn,
        room_id: int,
        history: list[tuple[int, Event]],
        baseline_seq: int,
        catch_up: list[tuple[int, int, list[bytes]]] = (),  # type: ignore[assignment]
    ) -> None:
        """Deliver history, running streams' text so far, then held live frames; the socket is live.

        ``baseline_seq``: the socket has everything up to it (since_seq when
        replaying, else the room's last_seq at join), so older copies are dropped.
        ``catch_up``: ``(answer id, chunk index, frames)`` of streams running in the room.
        """
        room = self.rooms[room_id]
        merge = room.joining.pop(conn, None)
        conn.room_seq[room_id] = baseline_seq
        for message_id, index, frames in catch_up:
            for frame in frames:
                conn.write_frame(frame)
            conn.stream_marks[message_id] = index  # held chunks up to here are already in the catch-up
        last_history_seq = history[-1][0] if history else baseline_seq
        items = merge.merge(history, last_history_seq) if merge else [e for _, e in history]
        for event in items:
            self._write(conn, room_id, event)

    async def leave_room(self, conn: Conn, room_id: int) -> None:
        room = self.rooms.get(room_id)
        conn.room_seq.pop(room_id, None)
        if room is None:
            return
        room.sockets.discard(conn)
        room.joining.pop(conn, None)
        if not room.sockets:
            del self.rooms[room_id]
            await self._unsubscribe(self.keys.room_channel(room_id))

    async def add_user(self, conn: Conn) -> None:
        conns = self.users.setdefault(conn.user_id, set())
        conns.add(conn)
        if len(conns) == 1:
            try:
                await self._subscribe(self.keys.user_channel(conn.user_id))
            except (TimeoutError, RedisError) as exc:
                # Serving goes on; cross-instance read sync and forced close wait for Redis.
                app_log.warning("user_channel_unavailable", extra=fields(error=str(exc)[:200]))

    async def remove_user(self, conn: Conn) -> None:
        conns = self.users.get(conn.user_id)
        if conns is None:
            return
        conns.discard(conn)
        if not conns:
            del self.users[conn.user_id]
            await self._unsubscribe(self.keys.user_channel(conn.user_id))

    # -- publishing -----------------------------------------------------------

    async def publish_room(
        self,
        room_id: int,
        frame: dict[str, Any],
        seq: int | None = None,
        exclude: str | None = None,
        stream: tuple[int, int] | None = None,
    ) -> None:
        payload = protocol.encode_bytes(frame)
        self.deliver_room(room_id, payload, seq, exclude, stream)  # local sockets first, without Redis
        extra: dict[str, Any] = {} if stream is None else {"m": stream[0], "i": stream[1]}
        try:
            await self.redis.publish(
                self.keys.room_channel(room_id),
                envelope(payload, origin=self.origin, seq=seq, exclude=exclude, **extra),
            )
        except RedisError as exc:
            # Committed messages are still in Postgres: other instances catch up by gap fill / resume.
            app_log.warning("publish_failed", extra=fields(room_id=room_id, error=str(exc)[:200]))

    async def publish_messages(self, items: list[tuple[int, int, dict[str, Any]]]) -> None:
        """Committed messages ``(room_id, seq, frame)`` in commit order, one Redis round trip."""
        pipe = self.redis.pipeline(transaction=False)
        for room_id, seq, frame in items:
            payload = protocol.encode_bytes(frame)
            self.deliver_room(room_id, payload, seq, None)
            pipe.publish(self.keys.room_channel(room_id), envelope(payload, origin=self.origin, seq=seq))
        try:
            await pipe.execute()
        except RedisError as exc:
            app_log.warning("publish_failed", extra=fields(count=len(items), error=str(exc)[:200]))

    async def publish_user(self, user_id: int, frame: dict[str, Any], exclude: str | None = None) -> None:
        payload = protocol.encode_bytes(frame)
        self.deliver_user(user_id, payload, exclude)
        try:
            await self.redis.publish(
                self.keys.user_channel(user_id), envelope(payload, origin=self.origin, exclude=exclude)
            )
        except RedisError as exc:
            app_log.warning("publish_failed", extra=fields(user_id=user_id, error=str(exc)[:200]))

    async def close_user(self, user_id: int, code: int, reason: str, family: str | None = None) -> None:
        """Close a user's sockets (one session's when ``family`` is given) on every worker and instance."""
        self._close_local(user_id, code, reason, family)
        await self.redis.publish(
            self.keys.user_channel(user_id),
            envelope(b"", origin=self.origin, op="close", code=code, reason=reason, fam=family),
        )

    async def control(self, op: str, **data: Any) -> None:
        """An instruction for every worker (e.g. cancel a generation wherever it runs)."""
        head = {"op": op, **data}
        handler = self.control_handlers.get(op)
        if handler is not None:
            handler(head)
        await self.redis.publish(self.keys.control(), envelope(b"", origin=self.origin, op=op, **data))

    async def kick(self, user_id: int, room_id: int) -> None:
        """Make a user's sockets leave a room (removed from it) on every worker and instance."""
        self._kick_local(user_id, room_id)
        try:
            await self.redis.publish(
                self.keys.user_channel(user_id), envelope(b"", origin=self.origin, op="kick", room=room_id)
            )
        except RedisError as exc:
            app_log.warning("publish_failed", extra=fields(user_id=user_id, error=str(exc)[:200]))

    def _kick_local(self, user_id: int, room_id: int) -> None:
        for conn in list(self.users.get(user_id, ())):
            conn.kicked(room_id)

    # -- receiving ------------------------------------------------------------

    def _on_message(self, msg: dict[str, Any]) -> None:
        kind = msg.get("type")
        channel: bytes = msg["channel"]
        if kind == b"subscribe" or kind == "subscribe":
            fut = self._confirm.pop(channel, None)
            if fut is not None and not fut.done():
                fut.set_result(None)
            return
        if kind not in ("message", b"message"):
            return
        data: bytes = msg["data"]
        head_raw, _, payload = data.partition(b"\n")
        head = json.loads(head_raw)
        if head.get("o") == self.origin:
            return  # our own publish: local sockets already have it
        name = channel.decode()
        prefix = self.keys.prefix
        if name.startswith(prefix + "room:"):
            stream = (int(head["m"]), int(head["i"])) if "m" in head else None
            self.deliver_room(int(name[len(prefix) + 5 :]), payload, head.get("s"), head.get("x"), stream)
        elif name == self.keys.control():
            handler = self.control_handlers.get(str(head.get("op")))
            if handler is not None:
                handler(head)
        elif name.startswith(prefix + "user:"):
            user_id = int(name[len(prefix) + 5 :])
            if head.get("op") == "close":
                self._close_local(user_id, int(head["code"]), str(head.get("reason", "")), head.get("fam"))
            elif head.get("op") == "kick":
                self._kick_local(user_id, int(head["room"]))
            else:
                self.deliver_user(user_id, payload, head.get("x"))

    def deliver_room(
        self,
        room_id: int,
        payload: bytes,
        seq: int | None,
        exclude: str | None,
        stream: tuple[int, int] | None = None,
    ) -> None:
        room = self.rooms.get(room_id)
        if room is None:
            return
        event = Event(protocol.ws_text_frame(payload), seq, exclude, stream)
        if seq is None:
            self._release(room_id, room, [event])
        elif room.sequencer is None:
            room.early.append(event)
        else:
            self._release(room_id, room, room.sequencer.offer(seq, event, self.clock()))

    def _release(self, room_id: int, room: RoomState, events: list[Event]) -> None:
        written = 0
        for event in events:
            for conn in list(room.sockets):
                merge = room.joining.get(conn)
                if merge is not None:
                    merge.hold(event.seq, event)
                elif self._write(conn, room_id, event):
                    written += 1
        if written:
            metrics.frames_delivered.inc(written)

    def _write(self, conn: Any, room_id: int, event: Event) -> bool:
        if event.exclude is not None and event.exclude == conn.connection_id:
            return False
        if event.seq is not None:
            if event.seq <= conn.room_seq.get(room_id, 0):
                return False  # this socket already has it (history, or an earlier copy)
            conn.room_seq[room_id] = event.seq
        elif event.stream is not None and conn.stream_marks:
            mark = conn.stream_marks.get(event.stream[0])
            if mark is not None and event.stream[1] <= mark:
                return False  # part of the text this socket got when it joined mid-stream
        conn.write_frame(event.frame)
        return True

    def deliver_user(self, user_id: int, payload: bytes, exclude: str | None) -> None:
        conns = self.users.get(user_id)
        if not conns:
            return
        frame = protocol.ws_text_frame(payload)
        for conn in list(conns):
            if conn.connection_id != exclude:
                conn.write_frame(frame)

    def _close_local(self, user_id: int, code: int, reason: str, family: str | None) -> None:
        for conn in list(self.users.get(user_id, ())):
            if family is None or conn.family == family:
                conn.force_close(code, reason)

    # -- gaps and resync --------------------------------------------------------

    async def _gap_filler(self) -> None:
        while True:
            await asyncio.sleep(self._gap_timeout_s / 2)
            now = self.clock()
            for room_id, room in list(self.rooms.items()):
                if room.sequencer is None:
                    continue
                gap = room.sequencer.missing(now)
                if gap is not None:
                    await self._fill(room_id, room, gap[0] - 1, gap[1] - gap[0] + 1)

    async def _fill(self, room_id: int, room: RoomState, after_seq: int, limit: int) -> None:
        try:
            rows = await store.messages_after(self.state.pg, room_id, after_seq, limit)
        except Exception as exc:  # Postgres down: try again on the next tick
            app_log.warning("gap_fill_failed", extra=fields(room_id=room_id, error=str(exc)[:200]))
            return
        if room.sequencer is None or self.rooms.get(room_id) is not room:
            return
        items = [
            (int(r["seq"]), Event(protocol.ws_text_frame(protocol.encode_bytes(message_frame(r))), int(r["seq"]), None))
            for r in rows
        ]
        if items:
            app_log.info("gap_filled", extra=fields(room_id=room_id, count=len(items)))
        self._release(room_id, room, room.sequencer.fill(items, self.clock()))

    async def _resync_all(self) -> None:
        """After a Redis reconnect: read what was committed meanwhile."""
        for room_id, room in list(self.rooms.items()):
            if room.sequencer is None:
                continue
            while True:
                before = room.sequencer.next_seq
                await self._fill(room_id, room, before - 1, 500)
                if (
                    room.sequencer is None
                    or room.sequencer.next_seq == before
                    or room.sequencer.next_seq - before < 500
                ):
                    break


def message_frame(row: dict[str, Any]) -> dict[str, Any]:
    """A stored message as the ``message`` frame (live, replay and REST share it)."""
    frame = protocol.message(
        room_id=row["room_id"],
        message_id=row["id"],
        seq=row["seq"],
        sender_id=row["sender_id"],
        role=row["role"],
        kind=row["kind"],
        content=row["content"],
        client_msg_id=row["client_msg_id"],
        created_at=store.iso(row["created_at"]) or "",
        edited_at=store.iso(row["edited_at"]),
        deleted=row["deleted_at"] is not None,
    )
    # Assistant answers: which prompt they answer, and whether the text is partial or replaced.
    if row.get("reply_to_id") is not None:
        frame["reply_to_message_id"] = row["reply_to_id"]
    if row.get("status", "final") != "final":
        frame["status"] = row["status"]  # "cancelled" or "error": a partial answer, kept
    if row.get("superseded_at") is not None:
        frame["superseded"] = True
    return frame
