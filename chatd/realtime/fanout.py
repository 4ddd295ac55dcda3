"""The hub: routes each room's events to its ``RoomLog`` and makes the writes it returns.

One ``Hub`` per worker.  A room's state on this worker and every decision of which socket gets which
frame is the pure ``chatd.core.roomlog.RoomLog``; the hub is the I/O around it.  It routes by room
(this worker's commits, delivered locally at once; the other workers' envelopes; repair's fills and
probes; presence heals), is the only code that writes a room's frames to sockets (each framed once, the
same bytes to every socket), performs the log's needs (kick, ``resync_required``, urgent probe), and
keeps the subscriptions (a room's outlives its last local socket by ``ws.room_linger_s``), the sockets
per user and the transport (``chatd.realtime.pubsub``, ``chatd.realtime.outbox``).  A worker skips its
own publishes by their origin before parsing them.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from chatd.core import envelope, errors, server_frames, wsframe
from chatd.core.keys import Keys
from chatd.core.presence_view import UNKNOWN, PresenceView
from chatd.core.roomlog import Event, Kick, Probe, Resync, RoomLog, Write, member_left_user
from chatd.process import metrics
from chatd.process.config import WebSocketSettings
from chatd.process.logs import app_log, fields
from chatd.realtime.outbox import PublishQueue
from chatd.realtime.pubsub import FanoutSubscriber
from chatd.storage import messages as messages_db
from chatd.storage.db import Database
from chatd.storage.kv import KV

__all__ = ["Conn", "Event", "Hub"]

_BAD_LOG_INTERVAL_S = 60.0


class Conn(Protocol):
    """What the hub needs of a socket (implemented by the WebSocket handler and the SSE listener)."""

    connection_id: str
    user_id: int
    family: str | None

    def write_frame(self, frame: bytes) -> None: ...

    def force_close(self, code: int, reason: str) -> None: ...

    def kicked(self, room_id: int) -> None: ...


class Hub:
    def __init__(
        self,
        kv: KV,
        db: Database,
        keys: Keys,
        settings: WebSocketSettings,
        subscriber_factory: Callable[[Callable[[bytes, bytes], None], Callable[[], None]], FanoutSubscriber],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.kv = kv
        self.db = db
        self.keys = keys
        self.settings = settings
        self.clock = clock
        self.origin = envelope.new_origin()
        self.rooms: dict[int, RoomLog[Conn]] = {}
        self._ready: dict[int, asyncio.Future[None]] = {}  # the room's subscription and first read, once
        self._idle: dict[int, float] = {}  # room -> when its last local socket left (unsubscribed after the linger)
        self.users: dict[int, set[Conn]] = {}
        self.control_handlers: dict[str, Callable[[dict[str, Any]], None]] = {}
        # Called once pub/sub is back after a loss: what was published meanwhile is read back (repair, presence).
        self.resubscribed_hooks: list[Callable[[], None]] = []
        # Called when a room log needs its last_seq and edit_rev read now (repair's urgent probe).
        self.probe_hooks: list[Callable[[], None]] = []
        self.subscriber = subscriber_factory(self._on_message, self._resubscribed)
        self.outbox = PublishQueue(kv, settings.publish_queue_max, settings.publish_deadline_s, clock)
        self._gap_timeout_s = settings.gap_timeout_ms / 1000
        self._room_prefix = keys.room_channel(0)[:-1].encode()
        self._user_prefix = keys.user_channel(0)[:-1].encode()
        self._control = keys.control().encode()
        # Every worker listens on the control channel while it runs (the subscriber keeps it through reconnects).
        self.subscriber.want(keys.control())
        self._bad_logged: dict[str, tuple[float, int]] = {}  # reason -> (last logged at, dropped unlogged since)

    # -- rooms --------------------------------------------------------------------

    async def join_room(self, conn: Conn, room_id: int) -> RoomLog[Conn]:
        """Subscribe (first local socket of the room) and mark ``conn`` as joining: its live frames are held.

        A rejoin on a socket already in the room starts over: it gets nothing of the room before its
        ``joined`` and, after it, each frame once (history, then held).
        """
        room = self.rooms.get(room_id)
        if room is None:
            room = self.rooms[room_id] = RoomLog(room_id, self._gap_timeout_s, self.settings.max_held_frames)
        self._idle.pop(room_id, None)
        room.join(conn, conn.user_id, conn.connection_id)
        try:
            ready = self._ready.get(room_id)
            if ready is None:
                ready = self._ready[room_id] = asyncio.get_running_loop().create_future()
                try:
                    await self._open_room(room_id, room)
                    ready.set_result(None)
                except BaseException as exc:
                    ready.set_exception(exc)
                    ready.exception()  # retrieved: joiners waiting on it re-raise below
                    if self._ready.get(room_id) is ready:
                        del self._ready[room_id]
                    raise
            else:
                await asyncio.shield(ready)
        except BaseException:
            await self.leave_room(conn, room_id)
            raise
        return room

    async def _open_room(self, room_id: int, room: RoomLog[Conn]) -> None:
        await self.subscriber.subscribe(self.keys.room_channel(room_id))
        # Subscribed (confirmed) before these reads: nothing falls between them and the live frames.
        last_seq, edit_rev = await messages_db.room_last_seq(self.db, room_id)
        try:
            rev, online = (await self.kv.presence_views([(room_id, UNKNOWN)]))[room_id]
            view = PresenceView(online, rev)
        except errors.Unavailable:
            view = PresenceView(stale=True)  # read whole by the next heal round
        self.apply(room, room.open(last_seq, edit_rev, view, self.clock()))

    def finish_join(
        self,
        conn: Conn,
        room_id: int,
        history: list[tuple[int, Event]],
        baseline_seq: int,
        catch_up: Sequence[tuple[int, int, list[bytes]]] = (),
    ) -> None:
        """Deliver history, running streams' text so far, then the held live frames; the socket is live.

        ``baseline_seq``: the socket has everything up to it (since_seq when
        replaying, else the room's last_seq at join), so older copies are dropped.
        ``catch_up``: ``(answer id, chunk index, frames)`` of streams running in the room.
        """
        room = self.rooms.get(room_id)
        if room is not None:
            self.apply(room, room.finish(conn, history, baseline_seq, catch_up))

    def detach(self, conn: Conn, room_id: int) -> None:
        """Stop delivering the room's frames to ``conn`` now (synchronously); ``leave_room`` does the rest."""
        room = self.rooms.get(room_id)
        if room is not None:
            room.leave(conn)

    async def leave_room(self, conn: Conn, room_id: int) -> None:
        self.detach(conn, room_id)
        room = self.rooms.get(room_id)
        if room is None or room.sockets:
            return
        ready = self._ready.get(room_id)
        if self.settings.room_linger_s > 0 and ready is not None and ready.done():
            self._idle[room_id] = self.clock()  # kept (still fed and repaired) for a socket coming back
            return
        await self._close_room(room_id)

    async def _close_room(self, room_id: int) -> None:
        del self.rooms[room_id]
        self._ready.pop(room_id, None)
        self._idle.pop(room_id, None)
        await self.subscriber.unsubscribe(self.keys.room_channel(room_id))

    async def run_linger(self) -> None:
        """Unsubscribe the rooms whose last local socket left ``ws.room_linger_s`` ago (a supervised task)."""
        linger_s = self.settings.room_linger_s
        while True:
            await asyncio.sleep(min(1.0, linger_s / 2))
            now = self.clock()
            for room_id in [r for r, since in self._idle.items() if now - since >= linger_s]:
                room = self.rooms.get(room_id)
                if room is not None and room_id in self._idle and not room.sockets:  # no join meanwhile
                    await self._close_room(room_id)

    def set_epoch(self, room_id: int, epoch: str, last_seq: int) -> None:
        """The epoch a join read (with the room's ``last_seq`` then): another one than before resyncs the room."""
        room = self.rooms.get(room_id)
        if room is not None:
            room.set_epoch(epoch, last_seq, self.clock())
            self.apply(room, [])

    def online(self, room_id: int) -> set[int]:
        room = self.rooms.get(room_id)
        return set(room.presence.online) if room is not None and room.presence is not None else set()

    def delivered_seq(self, conn: Conn, room_id: int) -> int | None:
        """The last seq of the room ``conn`` has; None unless it is live in the room on this worker."""
        room = self.rooms.get(room_id)
        return room.delivered(conn) if room is not None else None

    def _resubscribed(self) -> None:
        for hook in self.resubscribed_hooks:
            hook()

    # -- users ----------------------------------------------------------------------

    async def add_user(self, conn: Conn) -> bool:
        """Give ``conn`` its user's events; returns once this worker listens on the user channel.

        From then on every event published for the user (room events, read sync, forced closes)
        reaches ``conn``; what was published before, the caller checks itself (the socket reads the
        session's status again).  The SUBSCRIBEs of concurrent calls go out together
        (``Subscriber.want``).  False when Redis did not confirm within its timeout or is down: the
        socket works all the same (as every socket does while Redis is down), without the guarantee.
        """
        self.users.setdefault(conn.user_id, set()).add(conn)
        confirmed = self.subscriber.want(self.keys.user_channel(conn.user_id))
        try:
            if confirmed.done():
                confirmed.result()
            else:
                await asyncio.wait_for(asyncio.shield(confirmed), self.subscriber.timeout_s)
        except (TimeoutError, errors.Unavailable):
            metrics.user_channel_unconfirmed.inc()
            return False
        return True

    async def remove_user(self, conn: Conn) -> None:
        conns = self.users.get(conn.user_id)
        if conns is None:
            return
        conns.discard(conn)
        if not conns:
            del self.users[conn.user_id]
            await self.subscriber.unsubscribe(self.keys.user_channel(conn.user_id))

    # -- publishing -------------------------------------------------------------------

    def publish_messages(self, items: Sequence[tuple[int, int, bytes]]) -> None:
        """Committed messages ``(room_id, seq, frame JSON)`` in commit order: local sockets at once, then
        one PUBLISH per room through the publish queue.  A lost publish is repaired by the other workers'
        probes (``chatd.realtime.repair``)."""
        by_room: dict[int, tuple[list[int], list[bytes]]] = {}
        for room_id, seq, payload in items:
            self.deliver_message(room_id, seq, payload)
            seqs, payloads = by_room.setdefault(room_id, ([], []))
            seqs.append(seq)
            payloads.append(payload)
        self._publish(
            [
                (self.keys.room_channel(room_id), envelope.encode(self.origin, {"o": "m", "s": seqs}, payloads))
                for room_id, (seqs, payloads) in by_room.items()
            ]
        )

    async def publish_room(
        self,
        room_id: int,
        frame: dict[str, Any],
        exclude: str | None = None,
        stream: tuple[int, int] | None = None,
    ) -> None:
        """A frame without a seq (typing, stream chunks, queued...): best effort, not repaired."""
        payload = server_frames.encode_bytes(frame)
        self.deliver_frame(room_id, payload, exclude, stream)
        self._publish([self.room_frame_envelope(room_id, payload, exclude, stream)])

    async def publish_room_frames(self, items: Sequence[tuple[int, dict[str, Any]]]) -> None:
        """Many seq-less room frames ``(room_id, frame)``: local sockets, then one pipeline of PUBLISHes."""
        envelopes = []
        for room_id, frame in items:
            payload = server_frames.encode_bytes(frame)
            self.deliver_frame(room_id, payload, None, None)
            envelopes.append(self.room_frame_envelope(room_id, payload))
        self._publish(envelopes)

    def room_frame_envelope(
        self, room_id: int, payload: bytes, exclude: str | None = None, stream: tuple[int, int] | None = None
    ) -> tuple[str, bytes]:
        """The channel and envelope of a seq-less room frame, for a caller that batches its publishes
        (the assistant's chunks) after delivering locally with ``deliver_frame``."""
        header: dict[str, Any] = {"o": "f"}
        if exclude is not None:
            header["x"] = exclude
        if stream is not None:
            header["m"], header["i"] = stream
        return self.keys.room_channel(room_id), envelope.encode(self.origin, header, [payload])

    async def publish_change(self, room_id: int, rev: int, frame: dict[str, Any]) -> None:
        """An edit or delete (revision ``rev`` of the room): repaired like messages when its publish is lost."""
        payload = server_frames.encode_bytes(frame)
        message_id = int(frame["message_id"])
        self.deliver_change(room_id, rev, payload, message_id)
        header = {"o": "u", "r": rev, "m": message_id}
        self._publish([(self.keys.room_channel(room_id), envelope.encode(self.origin, header, [payload]))])

    async def publish_presence(self, room_id: int, online: Sequence[int], offline: Sequence[int], rev: int) -> None:
        """An announcement, at the room's presence revision ``rev`` (its bump in Redis)."""
        payload = server_frames.encode_bytes(server_frames.presence(room_id=room_id, online=online, offline=offline))
        self.deliver_presence(room_id, online, offline, payload, rev)
        header = {"o": "p", "on": list(online), "off": list(offline), "r": rev}
        self._publish([(self.keys.room_channel(room_id), envelope.encode(self.origin, header, [payload]))])

    async def publish_user(self, user_id: int, frame: dict[str, Any], exclude: str | None = None) -> None:
        payload = server_frames.encode_bytes(frame)
        self.deliver_user(user_id, payload, exclude)
        header: dict[str, Any] = {"o": "f"} if exclude is None else {"o": "f", "x": exclude}
        self._publish([(self.keys.user_channel(user_id), envelope.encode(self.origin, header, [payload]))])

    async def publish_users(self, user_ids: Sequence[int], frame: dict[str, Any]) -> None:
        """One frame to every device of each user (room events): local sockets, then one pipelined publish."""
        if not user_ids:
            return
        payload = server_frames.encode_bytes(frame)
        for user_id in user_ids:
            self.deliver_user(user_id, payload, None)
        env = envelope.encode(self.origin, {"o": "f"}, [payload])
        self._publish([(self.keys.user_channel(user_id), env) for user_id in user_ids])

    async def close_user(self, user_id: int, code: int, reason: str, family: str | None = None) -> None:
        """Close a user's sockets (one session's when ``family`` is given) on every worker and instance.

        Raises ``Unavailable`` when the other instances cannot be told.
        """
        self.close_local(user_id, code, reason, family)
        head = {"o": "close", "code": code, "reason": reason, "fam": family}
        await self.kv.publish(self.keys.user_channel(user_id), envelope.encode(self.origin, head))

    async def kick(self, user_id: int, room_id: int) -> None:
        """Make a user's sockets leave a room (removed from it) on every worker and instance."""
        self.kick_local(user_id, room_id)
        self._publish([(self.keys.user_channel(user_id), envelope.encode(self.origin, {"o": "kick", "room": room_id}))])

    async def control(self, op: str, **data: Any) -> None:
        """An instruction for every worker (e.g. cancel a generation wherever it runs); may raise ``Unavailable``."""
        head = {"o": op, **data}
        handler = self.control_handlers.get(op)
        if handler is not None:
            handler(head)
        await self.kv.publish(self.keys.control(), envelope.encode(self.origin, head))

    def _publish(self, items: list[tuple[str, bytes]]) -> None:
        # Never awaited: a slow Redis must not hold the caller (chatd.realtime.outbox).
        self.outbox.put(items)

    # -- receiving ----------------------------------------------------------------------

    def _on_message(self, channel: bytes, data: bytes) -> None:
        """One pub/sub message; never raises: an exception here would make the subscriber reconnect and
        resubscribe every channel, losing what is published meanwhile, for the sake of one bad envelope."""
        if data.startswith(self.origin):
            return  # our own publish: local sockets have it already
        try:
            self._route(channel, data)
        except envelope.BadEnvelope as exc:
            self._dropped(exc.reason, channel, str(exc), None)
        except Exception as exc:  # a bug in a delivery: this envelope is lost, the others still arrive
            self._dropped("delivery", channel, repr(exc), exc)

    def _route(self, channel: bytes, data: bytes) -> None:
        if channel.startswith(self._room_prefix):
            room_id = envelope.channel_id(channel, len(self._room_prefix))
            body = envelope.decode(data, "room")
            if type(body) is envelope.Messages:
                for seq, payload in zip(body.seqs, body.payloads, strict=True):
                    self.deliver_message(room_id, seq, payload)
            elif type(body) is envelope.Frame:
                self.deliver_frame(room_id, body.payload, body.exclude, body.stream)
            elif type(body) is envelope.Change:
                self.deliver_change(room_id, body.rev, body.payload, body.message_id)
            elif type(body) is envelope.Presence:
                self.deliver_presence(room_id, body.online, body.offline, body.payload, body.rev)
        elif channel.startswith(self._user_prefix):
            user_id = envelope.channel_id(channel, len(self._user_prefix))
            body = envelope.decode(data, "user")
            if type(body) is envelope.Frame:
                self.deliver_user(user_id, body.payload, body.exclude)
            elif type(body) is envelope.Close:
                self.close_local(user_id, body.code, body.reason, body.family)
            elif type(body) is envelope.Kick:
                self.kick_local(user_id, body.room_id)
        elif channel == self._control:
            body = envelope.decode(data, "control")
            assert type(body) is envelope.Control
            handler = self.control_handlers.get(body.op)
            if handler is None:
                raise envelope.BadEnvelope("op", f"{body.op[:20]!r}: no control handler")
            try:
                handler(body.fields)
            except (KeyError, TypeError, ValueError) as exc:  # the handler reads its own fields
                raise envelope.BadEnvelope("header", f"{body.op}: {exc!r}") from exc
        else:
            raise envelope.BadEnvelope("channel", "not a channel the hub subscribes to")

    def _dropped(self, reason: str, channel: bytes, detail: str, exc: Exception | None) -> None:
        """Count a dropped envelope; log the first of each reason, then at most one line a minute with how
        many went unlogged (a publisher gone wrong must not flood the log)."""
        metrics.pubsub_bad_envelopes.labels(reason).inc()
        now = self.clock()
        logged_at, unlogged = self._bad_logged.get(reason, (None, 0))
        if logged_at is not None and now - logged_at < _BAD_LOG_INTERVAL_S:
            self._bad_logged[reason] = (logged_at, unlogged + 1)
            return
        self._bad_logged[reason] = (now, 0)
        app_log.log(
            logging.ERROR if exc is not None else logging.WARNING,
            "fanout_bad_envelope",
            extra=fields(
                reason=reason,
                channel=channel[:100].decode(errors="replace"),
                detail=detail[:200],
                unlogged=unlogged,
            ),
            exc_info=exc,
        )

    def deliver_message(self, room_id: int, seq: int, payload: bytes) -> None:
        room = self.rooms.get(room_id)
        if room is not None:
            event = Event(wsframe.ws_text_frame(payload), seq, removes=member_left_user(payload))
            self.apply(room, room.message(event, self.clock()))

    def deliver_frame(self, room_id: int, payload: bytes, exclude: str | None, stream: tuple[int, int] | None) -> None:
        room = self.rooms.get(room_id)
        if room is not None:
            self.apply(room, room.frame(Event(wsframe.ws_text_frame(payload), None, exclude, stream)))

    def deliver_change(self, room_id: int, rev: int, payload: bytes, message_id: int | None) -> None:
        room = self.rooms.get(room_id)
        if room is not None:
            self.apply(room, room.change(rev, message_id, Event(wsframe.ws_text_frame(payload)), self.clock()))

    def deliver_presence(
        self, room_id: int, online: Sequence[int], offline: Sequence[int], payload: bytes, rev: int | None
    ) -> None:
        room = self.rooms.get(room_id)
        if room is not None:
            self.apply(room, room.presence_announced(rev, online, offline, wsframe.ws_text_frame(payload)))

    def heal_presence(self, room_id: int, rev: int, online: Sequence[int], asked_at: int) -> bool:
        """Redis' whole view of a room at revision ``rev`` (asked for when the view was at ``asked_at``):
        tell the room's sockets what their view lacked.

        True when it differed (a ``presence`` frame went to the sockets).  Only this worker's sockets:
        every worker heals its own view.
        """
        room = self.rooms.get(room_id)
        writes = room.presence_healed(rev, online, asked_at) if room is not None else None
        if room is None or writes is None:
            return False
        self.apply(room, writes)
        return True

    def apply(self, room: RoomLog[Conn], writes: list[Write[Conn]]) -> None:
        """Make a room log's writes, in order, then its needs.  Nothing else writes a room's frames."""
        if writes:
            written = 0
            for frame, conns in writes:
                for conn in conns:
                    conn.write_frame(frame)
                written += len(conns)
            metrics.hot.frames_delivered += written
        if room.needs:
            needs, room.needs = room.needs, []
            for need in needs:
                if type(need) is Kick:
                    need.conn.kicked(room.room_id)  # the socket says `left` and leaves (presence included)
                elif type(need) is Resync:
                    metrics.resyncs.labels(need.reason).inc(len(need.conns))
                    frame = _framed(
                        server_frames.resync_required(
                            room_id=room.room_id, last_seq=need.last_seq, epoch=need.epoch, reply_to=None
                        )
                    )
                    for conn in need.conns:
                        conn.write_frame(frame)
                elif type(need) is Probe:
                    for hook in self.probe_hooks:
                        hook()

    def deliver_user(self, user_id: int, payload: bytes, exclude: str | None) -> None:
        conns = self.users.get(user_id)
        if not conns:
            return
        frame = wsframe.ws_text_frame(payload)
        for conn in list(conns):
            if conn.connection_id != exclude:
                conn.write_frame(frame)

    def close_local(self, user_id: int, code: int, reason: str, family: str | None) -> None:
        for conn in list(self.users.get(user_id, ())):
            if family is None or conn.family == family:
                conn.force_close(code, reason)

    def kick_local(self, user_id: int, room_id: int) -> None:
        for conn in list(self.users.get(user_id, ())):
            conn.kicked(room_id)


def _framed(frame: dict[str, Any]) -> bytes:
    return wsframe.ws_text_frame(server_frames.encode_bytes(frame))
