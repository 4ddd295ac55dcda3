"""``GET /ws``: the authenticated socket.  Thin: decode, dispatch, reply.

Before the upgrade: a cross-site ``Origin`` gets 403 and a missing, invalid,
expired or revoked token gets 401, both with the JSON error body and no 101.
After it: the ``hello`` frame, then frames as in docs/PROTOCOL.md.  Frames are
handled in order per socket; a ``send`` is queued for the group commit in that
order and acked from the commit's callback, so pipelined sends keep their order
without waiting for each other's commit.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from asyncio import Future
from typing import Any
from urllib.parse import urlparse

import tornado.web
import tornado.websocket
from redis.exceptions import RedisError
from tornado.iostream import IOStream, StreamBufferFullError, StreamClosedError
from tornado.websocket import WebSocketProtocol, WebSocketProtocol13

from chatd import errors, metrics, protocol, store
from chatd.accounts import Accounts, Principal
from chatd.assistant import wants_answer
from chatd.errors import CloseCode
from chatd.fanout import Hub
from chatd.logs import app_log, fields
from chatd.rooms import Rooms
from chatd.state import ServerState
from chatd.store import Committed

# KEYS[1] = zset conn_id -> expiry ms; ARGV = now_ms, expiry_ms, cap, conn_id
_CAP_SCRIPT = """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[3]) then return 0 end
redis.call('ZADD', KEYS[1], ARGV[2], ARGV[4])
redis.call('PEXPIREAT', KEYS[1], ARGV[2])
return 1
"""
_CONN_TTL_S = 90  # refreshed every 30 s while the socket lives; a crashed worker's entries expire


class _StrictUtf8Protocol(WebSocketProtocol13):
    """Invalid UTF-8 in a text frame closes with 1007 (RFC 6455 8.1) instead of Tornado's silent abort."""

    def _handle_message(self, opcode: int, data: bytes) -> Future[None] | None:
        if opcode == 0x1:
            try:
                data.decode("utf-8")
            except UnicodeDecodeError:
                self.close(int(CloseCode.INVALID_PAYLOAD), "invalid UTF-8")
                return None
        return super()._handle_message(opcode, data)


class ChatSocket(tornado.websocket.WebSocketHandler):
    state: ServerState
    accounts: Accounts
    rooms: Rooms
    hub: Hub

    def initialize(self, state: ServerState, accounts: Accounts, rooms: Rooms, hub: Hub) -> None:
        self.state = state
        self.accounts = accounts
        self.rooms = rooms
        self.hub = hub
        self.connection_id = secrets.token_hex(8)
        self.principal: Principal | None = None
        self.user_id = 0
        self.family: str | None = None
        self.room_seq: dict[int, int] = {}
        self.stream_marks: dict[int, int] = {}
        self.joined_rooms: set[int] = set()
        self._timers: list[asyncio.TimerHandle] = []
        self._typing_timers: dict[int, asyncio.TimerHandle] = {}
        self._decoder = protocol.FrameDecoder(
            max_frame_bytes=state.settings.ws.max_frame_bytes,
            max_message_chars=state.settings.ws.max_message_chars,
        )
        self._registered = False
        self._closing = False
        self._counted = False

    # -- handshake ----------------------------------------------------------------

    def _reject(self, err: errors.ChatdError) -> None:
        self.set_status(err.http_status)
        self.set_header("Content-Type", "application/json; charset=utf-8")
        self.finish(json.dumps({"error": err.to_dict()}))

    def _origin_allowed(self, origin: str | None) -> bool:
        if not origin:
            return True  # non-browser clients send no Origin
        allowed = self.state.settings.server.allowed_origins
        if "*" in allowed or origin.rstrip("/") in (o.rstrip("/") for o in allowed):
            return True
        if allowed:
            return False
        return urlparse(origin).netloc.lower() == self.request.host.lower()  # same host only

    def check_origin(self, origin: str) -> bool:
        return True  # checked in get(), with a JSON 403

    def _token(self) -> str | None:
        header = self.request.headers.get("Authorization", "")
        if header.lower().startswith("bearer "):
            return header[7:].strip()
        return self.get_query_argument("access_token", None)

    async def get(self, *args: Any, **kwargs: Any) -> None:
        if not self._origin_allowed(self.request.headers.get("Origin")):
            return self._reject(errors.Forbidden("origin not allowed"))
        try:
            self.principal = await self.accounts.authenticate(self._token())
        except errors.ChatdError as err:
            return self._reject(err)
        self.user_id = self.principal.user_id
        self.family = self.principal.claims.family
        await super().get(*args, **kwargs)

    def get_websocket_protocol(self) -> WebSocketProtocol | None:
        proto = super().get_websocket_protocol()
        if isinstance(proto, WebSocketProtocol13):
            proto.__class__ = _StrictUtf8Protocol
        return proto

    def get_compression_options(self) -> dict[str, Any] | None:
        ws = self.state.settings.ws
        if not ws.compression:
            return None
        return {"compression_level": ws.compression_level, "mem_level": ws.compression_mem_level}

    async def open(self, *args: Any, **kwargs: Any) -> None:
        self.set_nodelay(True)  # Tornado leaves Nagle on for WebSockets
        assert self.ws_connection is not None and self.principal is not None
        stream = self._stream()
        if stream is not None:
            stream.max_write_buffer_size = self.state.settings.ws.max_buffer_bytes
        self.state.connections.add(self)
        metrics.ws_connections.inc()
        self._counted = True
        if not await self._register():
            self.close(int(CloseCode.TOO_MANY_CONNECTIONS), "too many connections")
            return
        await self.hub.add_user(self)
        settings = self.state.settings
        self.send_frame(
            protocol.hello(
                user_id=self.user_id,
                connection_id=self.connection_id,
                server_time_ms=int(time.time() * 1000),
                heartbeat_ms=int(settings.ws.heartbeat_interval_s * 1000),
            )
        )
        self._schedule_expiry(self.principal.claims.exp)

    async def _register(self) -> bool:
        """Per-user cap across all workers and instances; fails open when Redis is down."""
        cap = self.state.settings.auth.max_connections_per_user
        now_ms = int(time.time() * 1000)
        try:
            ok = await self.state.redis.eval(
                _CAP_SCRIPT,
                1,
                self.state.keys.user_connections(self.user_id),
                now_ms,
                now_ms + _CONN_TTL_S * 1000,
                cap,
                self.connection_id,
            )
        except RedisError as exc:
            app_log.warning("connection_cap_unavailable", extra=fields(error=str(exc)[:200]))
            return True
        self._registered = bool(ok)
        return self._registered

    def _schedule_expiry(self, exp: int) -> None:
        for timer in self._timers:
            timer.cancel()
        loop = asyncio.get_running_loop()
        remaining_s = exp - time.time()
        warn_in_s = remaining_s - self.state.settings.auth.token_expiring_warning_s
        if warn_in_s > 0:
            self._timers.append(
                loop.call_later(
                    warn_in_s,
                    lambda: self.send_frame(protocol.token_expiring(expires_in_ms=int((exp - time.time()) * 1000))),
                )
            )
        elif remaining_s > 0:
            self.send_frame(protocol.token_expiring(expires_in_ms=int(remaining_s * 1000)))
        self._timers.append(
            loop.call_later(
                max(0.0, remaining_s), lambda: self.force_close(int(CloseCode.AUTH_EXPIRED), "token expired")
            )
        )

    # -- writing --------------------------------------------------------------------

    def _stream(self) -> IOStream | None:
        conn = self.ws_connection
        return getattr(conn, "stream", None) if conn is not None else None

    def send_frame(self, frame: dict[str, Any]) -> None:
        self.write_frame(protocol.ws_text_frame(protocol.encode_bytes(frame)))

    def write_frame(self, frame: bytes) -> None:
        """Write prebuilt frame bytes (fan-out builds them once for every socket)."""
        conn = self.ws_connection
        if conn is None or self._closing or conn.is_closing():
            return
        if self.get_compression_options() is not None:
            # permessage-deflate needs per-socket framing: take Tornado's path.
            self._write_compressed(frame)
            return
        stream = self._stream()
        if stream is None:
            return
        try:
            stream.write(frame)
        except StreamBufferFullError:
            self._overflow()
        except StreamClosedError:
            pass

    def _write_compressed(self, frame: bytes) -> None:
        # Recover the payload from our own unmasked frame header.
        length = frame[1] & 0x7F
        offset = 2 if length < 126 else (4 if length == 126 else 10)
        try:
            self.write_message(frame[offset:].decode())
        except tornado.websocket.WebSocketClosedError:
            pass

    def _overflow(self) -> None:
        app_log.warning("slow_consumer_closed", extra=fields(user_id=self.user_id, connection_id=self.connection_id))
        stream = self._stream()
        if stream is not None:
            stream.max_write_buffer_size = None  # room for the close frame
        self.force_close(int(CloseCode.TRY_AGAIN_LATER), "too slow: send buffer full")

    def kicked(self, room_id: int) -> None:
        """Removed from the room by its owner: stop its frames and say so."""
        if room_id in self.joined_rooms:
            self.joined_rooms.discard(room_id)
            self.send_frame(protocol.left(room_id=room_id, reply_to=None))
            self.state.tasks.spawn(self.rooms.leave(self, room_id), "ws-kick")

    def force_close(self, code: int, reason: str) -> None:
        if not self._closing:
            self._closing = True
            metrics.ws_closed.labels(str(code)).inc()
            self.close(code, reason)

    # -- reading --------------------------------------------------------------------

    async def on_message(self, message: str | bytes) -> None:
        try:
            frame = self._decoder.decode(message)
        except errors.ProtocolViolation as exc:
            metrics.ws_frames.labels("invalid").inc()
            self.send_frame(protocol.error(exc, reply_to=None))
            self.force_close(int(exc.close_code), exc.message[:100])
            return
        except protocol.FrameError as exc:
            metrics.ws_frames.labels("invalid").inc()
            self.send_frame(protocol.error(exc.error, reply_to=exc.request_id))
            return
        metrics.ws_frames.labels(frame.TYPE).inc()
        try:
            await self._dispatch(frame)
        except errors.ChatdError as err:
            self.send_frame(protocol.error(err, reply_to=frame.request_id))
        except Exception as exc:
            app_log.error("frame_failed", exc_info=exc, extra=fields(type=type(frame).__name__))
            self.send_frame(protocol.error(errors.Internal(), reply_to=frame.request_id))

    async def _dispatch(self, frame: protocol.ClientFrame) -> None:
        rid = frame.request_id
        match frame:
            case protocol.Send():
                # Pipelined: queued in frame order now, acked when its batch commits, while the
                # next frames are read (one socket is not limited to one commit round trip per send).
                durable = await self.rooms.submit(self.user_id, frame.room_id, frame.content, frame.client_msg_id)
                durable.add_done_callback(lambda fut: self._on_durable(frame, fut))
            case protocol.Join():
                rejoin = frame.room_id in self.joined_rooms
                joined = await self.rooms.join(self, frame.room_id, frame.since_seq, rid, rejoin=rejoin)
                self.joined_rooms.add(frame.room_id)
                self.send_frame(joined.joined)
                if joined.resync is not None:
                    self.send_frame(joined.resync)
                self.hub.finish_join(self, frame.room_id, joined.history, joined.baseline_seq, joined.catch_up)
            case protocol.Leave():
                if frame.room_id not in self.joined_rooms:
                    raise errors.NotFound("not joined to this room")
                self.joined_rooms.discard(frame.room_id)
                await self.rooms.leave(self, frame.room_id)
                self.send_frame(protocol.left(room_id=frame.room_id, reply_to=rid))
            case protocol.Typing():
                await self.rooms.typing(self, frame.room_id, frame.is_typing)
                self._typing_expiry(frame.room_id, frame.is_typing)
            case protocol.Read():
                await self.rooms.read(self, frame.room_id, frame.seq)
            case protocol.Edit():
                assert self.principal is not None
                await self.rooms.edit(self.user_id, self.principal.is_admin, frame.message_id, frame.content)
            case protocol.Delete():
                assert self.principal is not None
                await self.rooms.delete(self.user_id, self.principal.is_admin, frame.message_id)
            case protocol.Ping():
                self.send_frame(protocol.pong(server_time_ms=int(time.time() * 1000), reply_to=rid))
            case protocol.Auth():
                principal = await self.accounts.authenticate(frame.token)
                if principal.user_id != self.user_id:
                    raise errors.Forbidden("token belongs to another user")
                self.principal, self.family = principal, principal.claims.family
                self._schedule_expiry(principal.claims.exp)
                self.send_frame(protocol.authenticated(expires_at_ms=principal.claims.exp * 1000, reply_to=rid))
            case protocol.Cancel() | protocol.Regenerate():
                if self.rooms.assistant is None:
                    raise errors.NotFound("no such generation")
                assert self.principal is not None
                await self.rooms.assistant.control(self.user_id, self.principal.is_admin, frame)

    def _on_durable(self, frame: protocol.Send, fut: asyncio.Future[Committed]) -> None:
        rid = frame.request_id
        exc = fut.exception()
        if exc is not None:
            err = exc if isinstance(exc, errors.ChatdError) else errors.Internal()
            self.send_frame(protocol.error(err, reply_to=rid))
            return
        committed = fut.result()
        if committed.error is not None:
            self.send_frame(protocol.error(committed.error, reply_to=rid))
            return
        row = committed.row
        assert row is not None
        self.send_frame(
            protocol.ack(
                room_id=row["room_id"],
                client_msg_id=frame.client_msg_id,
                message_id=row["id"],
                seq=row["seq"],
                created_at=store.iso(row["created_at"]) or "",
                reply_to=rid,
                duplicate=committed.duplicate,
            )
        )
        room = committed.room
        if self.rooms.assistant is not None and room is not None and not committed.duplicate:
            if wants_answer(room, frame.content):  # checked here: no task per send in plain rooms
                self.state.tasks.spawn(self._queue_answer(frame, committed), "ws-assistant-enqueue")

    async def _queue_answer(self, frame: protocol.Send, committed: Committed) -> None:
        result = await self.rooms.after_commit(self.user_id, frame.room_id, frame.content, committed)
        if result.assistant_error is not None:  # stored and acked; no answer will come
            self.send_frame(protocol.error(result.assistant_error, reply_to=frame.request_id))

    def _typing_expiry(self, room_id: int, is_typing: bool) -> None:
        timer = self._typing_timers.pop(room_id, None)
        if timer is not None:
            timer.cancel()
        if is_typing:
            ttl_s = self.state.settings.ws.typing_ttl_s

            def expire() -> None:
                self._typing_timers.pop(room_id, None)
                frame = protocol.typing(room_id=room_id, user_id=self.user_id, is_typing=False)
                self.state.tasks.spawn(
                    self.hub.publish_room(room_id, frame, exclude=self.connection_id), "typing-expiry"
                )

            self._typing_timers[room_id] = asyncio.get_running_loop().call_later(ttl_s, expire)

    # -- closing --------------------------------------------------------------------

    def on_close(self) -> None:
        self._closing = True
        for timer in [*self._timers, *self._typing_timers.values()]:
            timer.cancel()
        self.state.connections.discard(self)
        if self._counted:
            metrics.ws_connections.dec()
            self._counted = False
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
                await self.state.redis.zrem(self.state.keys.user_connections(self.user_id), self.connection_id)
            except RedisError:
                pass


async def refresh_registrations(state: ServerState) -> None:
    """Keep live sockets counted for the per-user cap; entries of a dead worker expire."""
    while True:
        await asyncio.sleep(_CONN_TTL_S / 3)
        expiry_ms = int(time.time() * 1000) + _CONN_TTL_S * 1000
        pipe = state.redis.pipeline(transaction=False)
        for conn in list(state.connections):
            if isinstance(conn, ChatSocket) and conn._registered:
                pipe.zadd(state.keys.user_connections(conn.user_id), {conn.connection_id: expiry_ms}, xx=True)
        try:
            await pipe.execute()
        except RedisError as exc:
            app_log.warning("connection_refresh_failed", extra=fields(error=str(exc)[:200]))


__all__ = ["ChatSocket", "refresh_registrations", "tornado"]
