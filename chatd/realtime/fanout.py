"""The hub: which local socket gets which frame, in order, once.

One ``Hub`` per worker.  It keeps the local registries (sockets per room,
sockets per user) and delivers:

* frames built once: each event is serialized and framed (RFC 6455) by its
  publisher, and the same bytes are written to every local socket;
* room messages in seq order, each once per socket: a ``RoomSequencer`` per
  room is fed by this worker's own commits (delivered locally at once, so
  Redis is not between two sockets of one worker) and by the other workers'
  publishes; ``chatd.repair`` reads what is missing from Postgres;
* edits and deletes once each (``Revisions``), presence as a per-room view
  (``PresenceView``: announcements in revision order, healed from Redis by
  ``chatd.realtime.presence`` when one was skipped).

Transport is ``chatd.pubsub`` (one subscriber connection) and
``chatd.storage.kv.publish_many`` (one PUBLISH per room per batch, see
``chatd.envelope``); a worker skips its own publishes by their origin before
parsing them.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from chatd.core import envelope, errors, server_frames, wsframe
from chatd.core.keys import Keys
from chatd.core.presence_view import UNKNOWN, PresenceView
from chatd.core.sequencing import HoldLog, LatestChange, Revisions, RoomSequencer
from chatd.process import metrics
from chatd.process.config import WebSocketSettings
from chatd.process.logs import app_log, fields
from chatd.realtime.outbox import PublishQueue
from chatd.realtime.pubsub import Subscriber
from chatd.storage import messages as messages_db
from chatd.storage.db import Database
from chatd.storage.kv import KV

_BAD_LOG_INTERVAL_S = 60.0


class Conn(Protocol):
    """What the hub needs of a socket (implemented by the WebSocket handler and the SSE listener)."""

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
    frame: bytes  # one or more complete WebSocket frames, built once
    seq: int | None = None
    exclude: str | None = None  # connection id that must not receive it (its own echo)
    stream: tuple[int, int] | None = None  # (answer message id, chunk index; -1 = stream_start)


@dataclass(eq=False)
class RoomState:
    live: set[Conn] = field(default_factory=set)
    holds: HoldLog[Event] = field(default_factory=HoldLog)  # joining sockets: their live frames held here
    sequencer: RoomSequencer[Event] | None = None
    revisions: Revisions | None = None
    latest: LatestChange = field(default_factory=LatestChange)  # per message: the newest change delivered
    presence: PresenceView | None = None  # members online anywhere, as this worker's sockets were told
    early: list[Event] = field(default_factory=list)  # arrived before the sequencer was set up (bounded)
    ready: asyncio.Future[None] | None = None
    idle_since: float | None = None  # the last local socket left then: unsubscribed after ws.room_linger_s
    epoch: str | None = None  # of the room's seqs, as the last join read it (for resync_required)

    @property
    def sockets(self) -> int:
        return len(self.live) + self.holds.joiners


class Hub:
    def __init__(
        self,
        kv: KV,
        db: Database,
        keys: Keys,
        settings: WebSocketSettings,
        subscriber_factory: Callable[[Callable[[bytes, bytes], None], Callable[[], None]], Subscriber],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.kv = kv
        self.db = db
        self.keys = keys
        self.settings = settings
        self.clock = clock
        self.origin = envelope.new_origin()
        self.rooms: dict[int, RoomState] = {}
        self.users: dict[int, set[Conn]] = {}
        self.control_handlers: dict[str, Callable[[dict[str, Any]], None]] = {}
        # Called once pub/sub is back after a loss: what was published meanwhile is read back (repair, presence).
        self.resubscribed_hooks: list[Callable[[], None]] = []
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

    async def join_room(self, conn: Conn, room_id: int) -> RoomState:
        """Subscribe (first local socket of the room) and mark ``conn`` as joining: its live frames are held.

        A rejoin on a socket already in the room starts over: the socket leaves the live set, so it gets
        nothing of the room before its ``joined`` and, after it, each frame once (history, then held).
        """
        room = self.rooms.get(room_id)
        if room is None:
            room = self.rooms[room_id] = RoomState(holds=HoldLog(self.settings.max_held_frames))
        room.idle_since = None
        room.live.discard(conn)
        room.holds.start(conn)
        try:
            if room.ready is None:
                room.ready = asyncio.get_running_loop().create_future()
                try:
                    await self._open_room(room_id, room)
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

    async def _open_room(self, room_id: int, room: RoomState) -> None:
        await self.subscriber.subscribe(self.keys.room_channel(room_id))
        # Subscribed (confirmed) before these reads: nothing falls between them and the live frames.
        last_seq, edit_rev = await messages_db.room_last_seq(self.db, room_id)
        try:
            rev, online = (await self.kv.presence_views([(room_id, UNKNOWN)]))[room_id]
            room.presence = PresenceView(online, rev)
        except errors.Unavailable:
            room.presence = PresenceView(stale=True)  # read whole by the next heal round
        now = self.clock()
        room.sequencer = RoomSequencer(last_seq + 1, self._gap_timeout_s, self.settings.max_held_frames)
        room.revisions = Revisions(edit_rev, self._gap_timeout_s)
        early, room.early = room.early, []
        for event in early:
            self.release(room_id, room, room.sequencer.offer(event.seq or 0, event, now))

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
        room = self.rooms[room_id]
        last_history_seq = history[-1][0] if history else baseline_seq
        items, overflowed = room.holds.finish(conn, history, last_history_seq)
        room.live.add(conn)
        conn.room_seq[room_id] = baseline_seq
        for message_id, index, frames in catch_up:
            for frame in frames:
                conn.write_frame(frame)
            mark_stream(conn.stream_marks, message_id, index)  # held chunks up to here are in the catch-up
        for event in items:
            self._write(conn, room_id, event)
        if overflowed:
            metrics.resyncs.labels("held_overflow").inc()
            last = room.sequencer.next_seq - 1 if room.sequencer else baseline_seq
            resync = server_frames.resync_required(room_id=room_id, last_seq=last, epoch=room.epoch, reply_to=None)
            conn.write_frame(_framed(resync))

    def detach(self, conn: Conn, room_id: int) -> None:
        """Stop delivering the room's frames to ``conn`` now (synchronously); ``leave_room`` does the rest."""
        conn.room_seq.pop(room_id, None)
        room = self.rooms.get(room_id)
        if room is not None:
            room.live.discard(conn)
            room.holds.cancel(conn)

    async def leave_room(self, conn: Conn, room_id: int) -> None:
        self.detach(conn, room_id)
        room = self.rooms.get(room_id)
        if room is None:
            return
        if not room.sockets:
            if self.settings.room_linger_s > 0 and room.ready is not None and room.ready.done():
                room.idle_since = self.clock()  # kept (still fed and repaired) for a socket coming back
                return
            del self.rooms[room_id]
            await self.subscriber.unsubscribe(self.keys.room_channel(room_id))

    async def run_linger(self) -> None:
        """Unsubscribe the rooms whose last local socket left ``ws.room_linger_s`` ago (a supervised task)."""
        linger_s = self.settings.room_linger_s
        while True:
            await asyncio.sleep(min(1.0, linger_s / 2))
            now = self.clock()
            idle = [
                room_id
                for room_id, room in self.rooms.items()
                if room.idle_since is not None and not room.sockets and now - room.idle_since >= linger_s
            ]
            for room_id in idle:
                room = self.rooms.get(room_id)
                if room is not None and room.idle_since is not None and not room.sockets:  # no join meanwhile
                    del self.rooms[room_id]
                    await self.subscriber.unsubscribe(self.keys.room_channel(room_id))

    def set_epoch(self, room_id: int, epoch: str) -> None:
        room = self.rooms.get(room_id)
        if room is not None:
            room.epoch = epoch

    def online(self, room_id: int) -> set[int]:
        room = self.rooms.get(room_id)
        return set(room.presence.online) if room is not None and room.presence is not None else set()

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
        if room is None:
            return
        event = Event(wsframe.ws_text_frame(payload), seq)
        if room.sequencer is None:
            if len(room.early) < self.settings.max_held_frames:  # beyond: read back once the room is set up
                room.early.append(event)
            return
        self.release(room_id, room, room.sequencer.offer(seq, event, self.clock()))

    def deliver_frame(self, room_id: int, payload: bytes, exclude: str | None, stream: tuple[int, int] | None) -> None:
        room = self.rooms.get(room_id)
        if room is not None:
            self.release(room_id, room, [Event(wsframe.ws_text_frame(payload), None, exclude, stream)])

    def deliver_change(self, room_id: int, rev: int, payload: bytes, message_id: int | None) -> None:
        room = self.rooms.get(room_id)
        if room is None or room.revisions is None or not room.revisions.offer(rev, self.clock()):
            return
        if message_id is not None and not room.latest.newer(message_id, rev):
            return  # a later change of this message was delivered already (an edit behind its delete)
        self.release(room_id, room, [Event(wsframe.ws_text_frame(payload))])

    def release_changes(self, room_id: int, room: RoomState, changes: list[tuple[int, int, Event]]) -> None:
        """Changes read back from Postgres ``(message id, rev, event)``, each unless a later one was delivered."""
        self.release(room_id, room, [event for mid, rev, event in changes if room.latest.newer(mid, rev)])

    def deliver_presence(
        self, room_id: int, online: Sequence[int], offline: Sequence[int], payload: bytes, rev: int | None
    ) -> None:
        room = self.rooms.get(room_id)
        if room is None or room.presence is None or room.ready is None or not room.ready.done():
            return  # the view is read once the room is set up (a later revision than this, or healed)
        if not room.presence.offer(rev, online, offline):
            return  # the view has it already
        # Not held for joining sockets: their `joined` frame carries the view as it is then.
        frame = wsframe.ws_text_frame(payload)
        for conn in list(room.live):
            conn.write_frame(frame)
        metrics.hot.frames_delivered += len(room.live)

    def heal_presence(self, room_id: int, rev: int, online: Sequence[int], asked_at: int) -> bool:
        """Redis' whole view of a room at revision ``rev`` (asked for when the view was at ``asked_at``):
        tell the room's sockets what their view lacked.

        True when it differed (a ``presence`` frame went to the sockets).  Only this worker's sockets:
        every worker heals its own view.
        """
        room = self.rooms.get(room_id)
        if room is None or room.presence is None:
            return False
        diff = room.presence.heal(rev, online, asked_at)
        if diff is None or not (diff[0] or diff[1]):
            return False
        frame = _framed(server_frames.presence(room_id=room_id, online=diff[0], offline=diff[1]))
        for conn in list(room.live):
            conn.write_frame(frame)
        metrics.hot.frames_delivered += len(room.live)
        return True

    def release(self, room_id: int, room: RoomState, events: list[Event]) -> None:
        if not events:
            return
        written = 0
        for event in events:
            room.holds.hold(event.seq, event)
            for conn in list(room.live):
                if self._write(conn, room_id, event):
                    written += 1
        metrics.hot.frames_delivered += written

    @staticmethod
    def _write(conn: Conn, room_id: int, event: Event) -> bool:
        if event.exclude is not None and event.exclude == conn.connection_id:
            return False
        seq = event.seq
        if seq is not None:
            if seq <= conn.room_seq.get(room_id, 0):
                return False  # this socket already has it (history, or an earlier copy)
            conn.room_seq[room_id] = seq
        elif event.stream is not None and conn.stream_marks:
            mark = conn.stream_marks.get(event.stream[0])
            if mark is not None:
                if event.stream[1] <= mark:
                    return False  # part of the text this socket got when it joined mid-stream
                del conn.stream_marks[event.stream[0]]  # past the catch-up: every later chunk is new
        conn.write_frame(event.frame)
        return True

    def deliver_user(self, user_id: int, payload: bytes, exclude: str | None) -> None:
        conns = self.users.get(user_id)
        if not conns:
            return
        frame = wsframe.ws_text_frame(payload)
        for conn in list(conns):
            if conn.connection_id != exclude:
                conn.write_frame(frame)

    def resync(self, room_id: int, last_seq: int) -> None:
        """Tell the room's sockets they missed messages that cannot be delivered: refetch and rejoin."""
        room = self.rooms.get(room_id)
        if room is None:
            return
        frame = _framed(
            server_frames.resync_required(room_id=room_id, last_seq=last_seq, epoch=room.epoch, reply_to=None)
        )
        metrics.resyncs.labels("seq_lost").inc(len(room.live))
        for conn in list(room.live):
            conn.write_frame(frame)
            conn.room_seq[room_id] = max(conn.room_seq.get(room_id, 0), last_seq)

    def close_local(self, user_id: int, code: int, reason: str, family: str | None) -> None:
        for conn in list(self.users.get(user_id, ())):
            if family is None or conn.family == family:
                conn.force_close(code, reason)

    def kick_local(self, user_id: int, room_id: int) -> None:
        for conn in list(self.users.get(user_id, ())):
            conn.kicked(room_id)


_MAX_STREAM_MARKS = 64  # streams a socket joined mid-way and has not seen a new chunk of yet


def mark_stream(marks: dict[int, int], message_id: int, index: int) -> None:
    """Remember the catch-up of a running stream; the oldest marks go first beyond ``_MAX_STREAM_MARKS``
    (a stream that ended right at the join leaves its mark until then)."""
    marks.pop(message_id, None)
    marks[message_id] = index
    while len(marks) > _MAX_STREAM_MARKS:
        del marks[next(iter(marks))]


def _framed(frame: dict[str, Any]) -> bytes:
    return wsframe.ws_text_frame(server_frames.encode_bytes(frame))
