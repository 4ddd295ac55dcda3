"""``GET /ws``: the authenticated socket.  Thin: decode, dispatch, reply.

Before the upgrade: a cross-site ``Origin`` gets 403 and a missing, invalid,
expired or revoked token gets 401, both with the JSON error body and no 101.
After it: the ``hello`` frame, then frames as in docs/PROTOCOL.md.

Frames are handled in order per socket: the read loop (``chatd/realtime/wsconn.py``) reads the next
message only once ``on_message`` returned, which is how backpressure works here.  A ``send`` is
queued for the group commit in frame order and acked from the commit's
callback, so pipelined sends keep their order without waiting for each
other's commit; at ``ws.max_pending_sends`` unacknowledged sends, or after a
``busy`` (the commit queue is full), the socket is not read until there is
room again.  At shutdown the socket stops being read, its queued sends are
committed and acked (or answered ``unavailable``), and only then is it closed.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from typing import Any

from tornado.iostream import StreamClosedError

from chatd.api.web import origin_allowed
from chatd.core import client_frames, errors, server_frames, wsframe
from chatd.core.errors import CloseCode
from chatd.process import metrics
from chatd.process.config import Settings, WebSocketSettings
from chatd.process.logs import app_log, fields
from chatd.process.state import ServerState
from chatd.realtime.batching import Batched
from chatd.realtime.fanout import Hub
from chatd.realtime.writer import MessageWriter
from chatd.realtime.wsconn import BufferFull, WebSocket
from chatd.services.accounts import Accounts, Principal
from chatd.services.ratelimit import Decision, FrameLimiter, TypingDedup
from chatd.services.rooms import Rooms
from chatd.storage.kv import KV
from chatd.storage.messages import Committed

_ALLOWED = Decision(True)
CONNECTION_TTL_S = 90  # registry entry of a socket (per-user cap); refreshed every 30 s while it lives


class ChatSocket(WebSocket):
    def initialize(
        self,
        state: ServerState,
        settings: Settings,
        accounts: Accounts,
        rooms: Rooms,
        hub: Hub,
        kv: KV,
        writer: MessageWriter,
        register: Batched[tuple[str, int, str], int],
    ) -> None:
        self.state = state
        self.config = settings
        self.accounts = accounts
        self.rooms = rooms
        self.hub = hub
        self.kv = kv
        self.writer = writer
        self.close_timeout_s = settings.ws.close_timeout_s
        self.register = register
        self.connection_id = secrets.token_hex(8)
        self.principal: Principal | None = None
        self.user_id = 0
        self.family: str | None = None
        self.room_seq: dict[int, int] = {}
        self.stream_marks: dict[int, int] = {}
        self.joined_rooms: set[int] = set()
        self._joining: int | None = None  # the room of the join in flight (frames are handled one at a time)
        self._kicked_while_joining = False
        self._timers: list[asyncio.TimerHandle] = []
        self._typing_timers: dict[int, asyncio.TimerHandle] = {}
        self._decoder = client_frames.FrameDecoder(
            max_frame_bytes=settings.ws.max_frame_bytes,
            max_message_chars=settings.ws.max_message_chars,
        )
        self._limiter = frame_limiter(settings.ws)
        self._typing = TypingDedup(settings.ws.typing_interval_s)
        self._registered = False
        self._over_cap = False
        self._closing = False
        self._close_sent = False  # counted in chatd_ws_closed_by_server_total
        self._counted = False
        self._pending = 0  # sends read but not yet answered
        self._room_for_sends = asyncio.Event()
        self._room_for_sends.set()
        self._stopped = asyncio.Event()  # set when the socket closes: releases a parked reader

    # -- handshake ----------------------------------------------------------------

    def _reject(self, err: errors.ChatdError) -> None:
        self.set_status(err.http_status)
        self.set_header("Content-Type", "application/json; charset=utf-8")
        self.finish(json.dumps({"error": err.to_dict()}))

    def _origin_allowed(self, origin: str | None) -> bool:
        if not origin:
            return True  # non-browser clients send no Origin
        return origin_allowed(origin, self.request.host, self.config.server.allowed_origins)

    def _token(self) -> str | None:
        header = self.request.headers.get("Authorization", "")
        if header.lower().startswith("bearer "):
            return header[7:].strip()
        return self.get_query_argument("access_token", None)

    async def get(self, *args: Any, **kwargs: Any) -> None:
        if self.state.draining:
            return self._reject(errors.Unavailable("server shutting down, connect again"))
        if not self._origin_allowed(self.request.headers.get("Origin")):
            return self._reject(errors.Forbidden("origin not allowed"))
        try:
            # No exp leeway: a socket closed 4001 at exp must not reopen with the same token.
            principal = await self.accounts.authenticate(self._token(), denylist=False, exp_leeway=False)
            registered = await self._register(principal)
        except errors.ChatdError as err:
            return self._reject(err)
        if registered == -1:
            return self._reject(errors.Unauthorized("token revoked"))
        self.principal = principal
        self.user_id = principal.user_id
        self.family = principal.claims.family
        self._over_cap = registered == 0
        await super().get(*args, **kwargs)

    async def _register(self, principal: Principal) -> int:
        """Denylist and per-user cap, across all instances, in one round trip; fails open without Redis."""
        try:
            result = await self.register((principal.claims.jti, principal.user_id, self.connection_id))
        except errors.Unavailable:
            return 1  # the token's session is still checked in Postgres; the cap waits for Redis
        self._registered = result == 1
        return result

    def get_compression_options(self) -> dict[str, Any] | None:
        ws = self.config.ws
        if not ws.compression:
            return None
        return {"compression_level": ws.compression_level, "mem_level": ws.compression_mem_level}

    async def open(self, *args: Any, **kwargs: Any) -> None:
        assert self.ws_connection is not None and self.principal is not None
        self.ws_connection.max_buffer = self.config.ws.max_buffer_bytes
        self.state.connections.add(self)
        metrics.ws_connections.inc()
        self._counted = True
        if self.state.draining:  # upgraded after the drain closed the sockets it had: the same 1001, no hello
            self.force_close(int(CloseCode.GOING_AWAY), "server shutting down")
            return
        if self._over_cap:
            self.force_close(int(CloseCode.TOO_MANY_CONNECTIONS), "too many connections")
            return
        # hello only once this worker listens on the user channel (confirmed by Redis): from hello on,
        # every event of the user reaches this socket.  What was published before (a forced close
        # after a revocation) is read back from Postgres: revocations are written before their close
        # is published, so one the handshake's check missed is seen now.
        await self.hub.add_user(self)
        principal = self.principal
        try:
            ended = await self.accounts.ended_since(principal)
        except errors.ChatdError:  # Postgres unavailable: as at the handshake, no socket it could not check
            ended = int(CloseCode.TRY_AGAIN_LATER), "unavailable, try again"
        if self._closing or self.ws_connection is None:
            return  # closed meanwhile (a forced close, the client, shutdown)
        if ended is not None:
            self.force_close(*ended)
            return
        self.send_frame(
            server_frames.hello(
                user_id=self.user_id,
                connection_id=self.connection_id,
                server_time_ms=int(time.time() * 1000),
                heartbeat_ms=int(self.config.ws.heartbeat_interval_s * 1000),
            )
        )
        self._schedule_expiry(principal.claims.exp)

    def _schedule_expiry(self, exp: int) -> None:
        for timer in self._timers:
            timer.cancel()
        self._timers.clear()
        loop = asyncio.get_running_loop()
        warning_ms = int(self.config.auth.token_expiring_warning_s * 1000)
        # `exp` is wall-clock; the loop's timers are monotonic and may fire a millisecond early. So
        # both callbacks read the wall clock again: the warning never announces more than it
        # promises, and the close never comes before `exp`.

        def warn() -> None:
            left_ms = min(int((exp - time.time()) * 1000), warning_ms)
            self.send_frame(server_frames.token_expiring(expires_in_ms=max(0, left_ms)))

        def expire() -> None:
            left_s = exp - time.time()
            if left_s > 0:
                self._timers.append(loop.call_later(left_s + 0.001, expire))
            else:
                self.force_close(int(CloseCode.AUTH_EXPIRED), "token expired")

        remaining_s = exp - time.time()
        if remaining_s * 1000 > warning_ms:
            self._timers.append(loop.call_later(remaining_s - warning_ms / 1000, warn))
        elif remaining_s > 0:
            warn()
        self._timers.append(loop.call_later(max(0.0, remaining_s), expire))

    # -- writing --------------------------------------------------------------------

    def send_frame(self, frame: dict[str, Any]) -> None:
        self.write_frame(wsframe.ws_text_frame(server_frames.encode_bytes(frame)))

    def write_frame(self, frame: bytes) -> None:
        """Write prebuilt frame bytes (fan-out builds them once for every socket; with permessage-deflate
        their payloads are compressed for this socket).

        A failure closes this socket only: fan-out goes on to the next one.
        """
        conn = self.ws_connection
        if conn is None or self._closing or conn.server_terminated:
            return
        try:
            conn.write_frame(frame)
        except BufferFull:
            self._overflow()
        except (StreamClosedError, ConnectionError):
            pass  # closing: on_close follows
        except Exception as exc:
            app_log.error("socket_write_failed", exc_info=exc, extra=fields(connection_id=self.connection_id))
            self.force_close(int(CloseCode.INTERNAL_ERROR), "write failed")

    def _overflow(self) -> None:
        conn = self.ws_connection
        # The queued frames are useless to a client that must resume anyway: dropped, so the close frame is
        # next on the wire and a client that reads again within ws.close_timeout_s sees 1013.
        dropped = conn.drop_unsent() if conn is not None else 0
        app_log.warning(
            "slow_consumer_closed",
            extra=fields(user_id=self.user_id, connection_id=self.connection_id, dropped_bytes=dropped),
        )
        if conn is not None:
            conn.max_buffer = None  # room for the close frame
        self.force_close(int(CloseCode.TRY_AGAIN_LATER), "too slow: send buffer full")

    def kicked(self, room_id: int) -> None:
        """Removed from the room by its owner: stop its frames and say so."""
        if room_id == self._joining:
            self._kicked_while_joining = True
        if room_id in self.joined_rooms:
            self.joined_rooms.discard(room_id)
            # Out of the room's delivery before `left` is written: the leave below runs as a task, and a room
            # message read from pub/sub in the same loop iteration as the kick (a member_left notice right
            # behind it) would otherwise still reach this socket after its `left`.
            self.hub.detach(self, room_id)
            self.send_frame(server_frames.left(room_id=room_id, reply_to=None))
            self.state.tasks.spawn(self.rooms.leave(self, room_id, detached=True), "ws-kick")

    def force_close(self, code: int, reason: str) -> None:
        if not self._closing:
            self._closing = True
            self.count_close_sent(code, reason)
            self.close(code, reason)
            # A frame parked in on_message (shutdown) must not keep the client's close frame unread.
            self._stopped.set()

    def count_close_sent(self, code: int | None, reason: str | None) -> None:
        if self._close_sent:
            return
        self._close_sent = True
        if code is None and reason == "ping timed out":  # no pong within the timeout (wsconn.WsConnection)
            metrics.ws_ping_timeouts.inc()
        metrics.ws_closed.labels(str(code or (1000 if reason else 1005))).inc()

    # -- reading --------------------------------------------------------------------

    async def on_message(self, message: str | bytes) -> None:
        if self.state.draining:
            await self._stopped.wait()  # shutting down: read nothing more (unread sends are resent by the client)
            return
        try:
            frame = self._decoder.decode(message)
        except errors.ProtocolViolation as exc:
            metrics.hot.frames_received["invalid"] += 1
            self.send_frame(server_frames.error(exc, reply_to=None))
            app_log.warning(
                "ws_protocol_error",
                extra=fields(
                    code=int(exc.close_code),
                    reason=exc.message[:100],
                    user_id=self.user_id,
                    connection_id=self.connection_id,
                ),
            )
            self.force_close(int(exc.close_code), exc.message[:100])
            return
        except client_frames.FrameError as exc:
            metrics.hot.frames_received["invalid"] += 1
            self.send_frame(server_frames.error(exc.error, reply_to=exc.request_id))
            self._violated("invalid frames")
            return
        # Sends have their own quota per user (Rooms.submit) and the commit queue's backpressure.
        decision = _ALLOWED if isinstance(frame, client_frames.Send) else self._limiter.hit(frame.TYPE)
        if not decision.allowed:
            metrics.hot.frames_received["limited"] += 1
            err = errors.RateLimited(f"too many {frame.TYPE} frames", retry_after_ms=decision.retry_after_ms)
            self.send_frame(server_frames.error(err, reply_to=frame.request_id))
            self._violated(f"{frame.TYPE} flood")
            return
        metrics.hot.frames_received[frame.TYPE] += 1
        try:
            if isinstance(frame, client_frames.Send):
                await self._send(frame)
            else:
                await self._dispatch(frame)
        except errors.ChatdError as err:
            self.send_frame(server_frames.error(err, reply_to=frame.request_id))
            if isinstance(err, errors.RateLimited):
                self._violated(f"{frame.TYPE} over its rate")
        except Exception as exc:
            app_log.error("frame_failed", exc_info=exc, extra=fields(type=type(frame).__name__))
            self.send_frame(server_frames.error(errors.Internal(), reply_to=frame.request_id))

    def _violated(self, reason: str) -> None:
        """A refused frame; a socket that keeps sending them is closed with 1008."""
        if self._limiter.violation() and not self._closing:
            app_log.warning(
                "ws_policy_close",
                extra=fields(code=1008, reason=reason, user_id=self.user_id, connection_id=self.connection_id),
            )
            self.force_close(int(CloseCode.POLICY_VIOLATION), f"too many refused frames ({reason})")

    async def _send(self, frame: client_frames.Send) -> None:
        # Pipelined: queued in frame order now, acked when its batch commits, while the next frames
        # are read (one socket is not limited to one commit round trip per send).
        try:
            durable = self.rooms.submit(self.user_id, frame.room_id, frame.content, frame.client_msg_id)
        except errors.Busy as err:
            self.send_frame(server_frames.error(err, reply_to=frame.request_id))
            # Backpressure: this socket is not read until the queue has room (or the retry time passed).
            await self.writer.wait_capacity((err.retry_after_ms or 1000) / 1000)
            return
        self._pending += 1
        durable.add_done_callback(lambda fut: self._on_durable(frame, fut))
        if self._pending >= self.config.ws.max_pending_sends:
            self._room_for_sends.clear()
            await self._room_for_sends.wait()  # set again by an answer, or when the socket closes

    async def _dispatch(self, frame: client_frames.ClientFrame) -> None:
        rid = frame.request_id
        match frame:
            case client_frames.Join():
                rejoin = frame.room_id in self.joined_rooms
                self._joining = frame.room_id
                self._kicked_while_joining = False
                try:
                    joined = await self.rooms.join(
                        self, frame.room_id, frame.since_seq, rid, rejoin=rejoin, epoch=frame.epoch
                    )
                finally:
                    self._joining = None
                if self._kicked_while_joining:
                    # Removed after the join read the membership: answered as if the join came after
                    # the removal, so a removed member is never left receiving the room. On a rejoin,
                    # `kicked` found the room joined and did the leave (presence included) already.
                    if rejoin:
                        await self.hub.leave_room(self, frame.room_id)
                    else:
                        await self.rooms.leave(self, frame.room_id)
                    raise errors.NotFound("room not found")
                self.joined_rooms.add(frame.room_id)
                self.send_frame(joined.joined)
                if joined.resync is not None:
                    self.send_frame(joined.resync)
                self.hub.finish_join(self, frame.room_id, joined.history, joined.baseline_seq, joined.catch_up)
            case client_frames.Leave():
                if frame.room_id not in self.joined_rooms:
                    raise errors.NotFound("not joined to this room")
                self.joined_rooms.discard(frame.room_id)
                await self.rooms.leave(self, frame.room_id)
                self.send_frame(server_frames.left(room_id=frame.room_id, reply_to=rid))
            case client_frames.Typing():
                if self._typing.should_relay(frame.room_id, frame.is_typing):
                    try:
                        await self.rooms.typing(self, frame.room_id, frame.is_typing)
                    except errors.ChatdError:
                        self._typing.expired(frame.room_id)  # not relayed: the next one is tried again
                        raise
                if frame.is_typing or frame.room_id in self._typing_timers:
                    self._typing_expiry(frame.room_id, frame.is_typing)
            case client_frames.Read():
                await self.rooms.read(self, frame.room_id, frame.seq)
            case client_frames.Edit():
                assert self.principal is not None
                await self.rooms.edit(self.user_id, self.principal.is_admin, frame.message_id, frame.content)
            case client_frames.Delete():
                assert self.principal is not None
                await self.rooms.delete(self.user_id, self.principal.is_admin, frame.message_id)
            case client_frames.Ping():
                self.send_frame(server_frames.pong(server_time_ms=int(time.time() * 1000), reply_to=rid))
            case client_frames.Auth():
                principal = await self.accounts.authenticate(frame.token, exp_leeway=False)
                if principal.user_id != self.user_id:
                    raise errors.Forbidden("token belongs to another user")
                self.principal, self.family = principal, principal.claims.family
                self._schedule_expiry(principal.claims.exp)
                self.send_frame(server_frames.authenticated(expires_at_ms=principal.claims.exp * 1000, reply_to=rid))
            case client_frames.Cancel() | client_frames.Regenerate():
                assistant = self.rooms.assistant
                if assistant is None:
                    raise errors.NotFound("no such generation")
                assert self.principal is not None
                await assistant.control(self.user_id, self.principal.is_admin, frame)

    def _on_durable(self, frame: client_frames.Send, fut: asyncio.Future[Committed]) -> None:
        self._pending -= 1
        if self._pending < self.config.ws.max_pending_sends:
            self._room_for_sends.set()
        rid = frame.request_id
        exc = fut.exception()
        if exc is not None:
            err = exc if isinstance(exc, errors.ChatdError) else errors.Internal()
            self.send_frame(server_frames.error(err, reply_to=rid))
            return
        committed = fut.result()
        if committed.error is not None:
            self.send_frame(server_frames.error(committed.error, reply_to=rid))
            return
        row = committed.row
        assert row is not None
        self.send_frame(
            server_frames.ack(
                room_id=row["room_id"],
                client_msg_id=frame.client_msg_id,
                message_id=row["id"],
                seq=row["seq"],
                created_at=server_frames.iso(row["created_at"]) or "",
                reply_to=rid,
                duplicate=committed.duplicate,
            )
        )
        if self.rooms.wants_answer(committed):  # checked here: no task per send in plain rooms
            self.state.tasks.spawn(self._queue_answer(frame, committed), "ws-assistant-enqueue")

    async def _queue_answer(self, frame: client_frames.Send, committed: Committed) -> None:
        result = await self.rooms.after_commit(self.user_id, frame.room_id, committed)
        if result.assistant_error is not None:  # stored and acked; no answer will come
            self.send_frame(server_frames.error(result.assistant_error, reply_to=frame.request_id))

    def _typing_expiry(self, room_id: int, is_typing: bool) -> None:
        timer = self._typing_timers.pop(room_id, None)
        if timer is not None:
            timer.cancel()
        if is_typing:
            ttl_s = self.config.ws.typing_ttl_s

            def expire() -> None:
                self._typing_timers.pop(room_id, None)
                self._typing.expired(room_id)
                frame = server_frames.typing(room_id=room_id, user_id=self.user_id, is_typing=False)
                self.state.tasks.spawn(
                    self.hub.publish_room(room_id, frame, exclude=self.connection_id), "typing-expiry"
                )

            self._typing_timers[room_id] = asyncio.get_running_loop().call_later(ttl_s, expire)

    # -- closing --------------------------------------------------------------------

    @property
    def registered(self) -> bool:
        """Counted in the per-user connection registry (refreshed while it lives)."""
        return self._registered

    def on_close(self) -> None:
        self._closing = True
        self._stopped.set()
        self._room_for_sends.set()
        for timer in [*self._timers, *self._typing_timers.values()]:
            timer.cancel()
        self.state.connections.discard(self)
        if self._counted:
            metrics.ws_connections.dec()
            self._counted = False
            if not self._close_sent:  # the client closed first, or the connection dropped (no close code: 1006)
                metrics.ws_closed_by_client.labels(metrics.client_close_label(self.close_code)).inc()
        if self.principal is not None:
            self.state.tasks.spawn(self._cleanup(), "ws-cleanup")

    async def _cleanup(self) -> None:
        for room_id in list(self.joined_rooms):
            try:
                await self.rooms.leave(self, room_id)
            except Exception as exc:  # one room's cleanup must not stop the others
                app_log.warning("leave_failed", extra=fields(room_id=room_id, error=str(exc)[:200]))
        await self.hub.remove_user(self)
        if self._registered:
            try:
                await self.kv.unregister_connection(self.user_id, self.connection_id)
            except errors.Unavailable:
                pass  # the entry expires after CONNECTION_TTL_S


def frame_limiter(ws: WebSocketSettings) -> FrameLimiter:
    """The per-socket frame limits of ``ws`` (sends also have their per-user quota, ``Rooms.submit``)."""
    return FrameLimiter(
        limits={
            "all": (ws.frame_rate_per_s, ws.frame_burst),
            "join": (ws.join_rate_per_s, ws.join_burst),
            "read": (ws.read_rate_per_s, ws.read_burst),
            "typing": (ws.typing_rate_per_s, ws.typing_burst),
            "control": (ws.control_rate_per_s, ws.control_burst),
        },
        groups={
            "join": "join",
            "leave": "join",
            "read": "read",
            "typing": "typing",
            **dict.fromkeys(("edit", "delete", "auth", "cancel", "regenerate"), "control"),
        },
        max_violations=ws.max_violations,
        violation_window_s=ws.violation_window_s,
    )


async def refresh_registrations(state: ServerState, kv: KV, origin: bytes = b"") -> None:
    """Keep live sockets counted for the per-user cap; entries of a dead worker expire (a supervised task).

    Also reports this worker's socket count (admin stats), at once and then every round.
    """
    while True:
        if origin:
            count = sum(1 for conn in list(state.connections) if isinstance(conn, ChatSocket))
            try:
                await kv.report_connections(origin.decode(), count, CONNECTION_TTL_S)
            except errors.Unavailable:
                pass
        await asyncio.sleep(CONNECTION_TTL_S / 3)
        entries = [
            (conn.user_id, conn.connection_id)
            for conn in list(state.connections)
            if isinstance(conn, ChatSocket) and conn.registered
        ]
        if entries:
            try:
                await kv.refresh_connections(entries, CONNECTION_TTL_S)
            except errors.Unavailable:
                pass


__all__ = ["ChatSocket", "refresh_registrations"]
