"""``GET /ws``: the authenticated socket.  Thin: decode, dispatch, reply.

Before the upgrade: a cross-site ``Origin`` gets 403 and a missing, invalid,
expired or revoked token gets 401, both with the JSON error body and no 101.
After it: the ``hello`` frame, then frames as in docs/PROTOCOL.md.

The socket's protocol state is a sans-I/O ``ServerSession`` (``chatd/core/session.py``): this
handler feeds it frames, the results of the I/O it asked for, kicks and timers, and performs the
actions it returns (``_run``; ``_act`` for those that need no waiting, ``_io`` for the rest).

Frames are handled in order per socket: the read loop (``chatd/realtime/wsconn.py``) reads the next
message only once ``on_message`` returned, which is how backpressure works here.  A ``send`` is
queued for the group commit in frame order and acked from the commit's
callback, so pipelined sends keep their order without waiting for each
other's commit; at ``ws.max_pending_sends`` unacknowledged sends, or after a
``busy`` (the commit queue is full), the session pauses reading until there is
room again.  At shutdown the socket stops being read, its queued sends are
committed and acked (or answered ``unavailable``), and only then is it closed.
"""

from __future__ import annotations

import asyncio
import functools
import json
import secrets
import time
from typing import Any

from tornado.iostream import StreamClosedError

from chatd.api.web import origin_allowed
from chatd.core import client_frames, errors, server_frames, wsframe
from chatd.core.errors import CloseCode
from chatd.core.framelimits import FrameLimiter
from chatd.core.session import (
    FRAME_GROUPS,
    TYPING,
    Action,
    Actions,
    AdoptToken,
    ArmTimer,
    Authenticate,
    CancelTimer,
    Close,
    Detach,
    EnterRoom,
    Join,
    Leave,
    PauseReading,
    Perform,
    Performed,
    PublishTyping,
    RelayTyping,
    Reply,
    ResumeReading,
    ServerSession,
    SessionConfig,
    Submit,
    TimerKey,
)
from chatd.process import metrics
from chatd.process.config import Settings, WebSocketSettings
from chatd.process.logs import app_log, fields
from chatd.process.state import ServerState
from chatd.realtime.batching import Batched
from chatd.realtime.fanout import Hub
from chatd.realtime.writer import MessageWriter
from chatd.realtime.wsconn import BufferFull
from chatd.realtime.wshandler import WebSocket
from chatd.services.accounts import Accounts, Principal
from chatd.services.rooms import JoinResult, Rooms
from chatd.storage.kv import KV
from chatd.storage.messages import Committed

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
        self.session = session_for(settings)  # the protocol state; its user is set once authenticated
        self._timers: dict[TimerKey, asyncio.TimerHandle] = {}
        self._entering: JoinResult | None = None  # the answer of the join in flight, until the session takes it
        self._adopting: Principal | None = None  # the principal of an in-band `auth`, until the session takes it
        self._registered = False
        self._over_cap = False
        self._closing = False
        self._close_sent = False  # counted in chatd_ws_closed_by_server_total
        self._counted = False
        self._readable = asyncio.Event()  # cleared while the session pauses reading
        self._readable.set()
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
        self.user_id = self.session.user_id = principal.user_id
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
                limits=client_limits(self.config.ws),
            )
        )
        self._run_now(self.session.opened(principal.claims.exp, time.time()), "ws-open")

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
        """Removed from the room by its owner: stop its frames and say so (the session's rule)."""
        self._run_now(self.session.kicked(room_id), "ws-kick")

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
        await self._run(self.session.receive(message, time.monotonic(), time.time()))
        if not self._readable.is_set():
            await self._readable.wait()  # set again by ResumeReading, or when the socket closes

    async def _run(self, actions: Actions) -> None:
        """A frame's actions, in order, its I/O awaited; an I/O error drops the rest and answers the frame."""
        for action in actions:
            frame = _frame_of(action)
            try:
                if self._act(action):
                    continue
                more = await self._io(action)
            except errors.ChatdError as err:
                if frame is None:
                    raise
                await self._run(self.session.failed(frame, err, time.monotonic()))
                return
            except Exception as exc:
                if frame is None:
                    raise
                app_log.error("frame_failed", exc_info=exc, extra=fields(type=type(frame).__name__))
                await self._run(self.session.failed(frame, errors.Internal(), time.monotonic()))
                return
            await self._run(more)

    def _run_now(self, actions: Actions, task_name: str) -> None:
        """Actions from a callback (a kick, a timer, a commit): what needs no waiting now, the rest in a task."""
        for i, action in enumerate(actions):
            if not self._act(action):
                self.state.tasks.spawn(self._run(actions[i:]), task_name)
                return

    def _act(self, action: Action) -> bool:
        """Perform an action that needs no waiting; False: it is I/O (``_io``)."""
        match action:
            case Reply():
                self.send_frame(action.frame)
            case Close():
                if action.log is not None:
                    app_log.warning(
                        action.log,
                        extra=fields(
                            code=action.code,
                            reason=action.detail,
                            user_id=self.user_id,
                            connection_id=self.connection_id,
                        ),
                    )
                self.force_close(action.code, action.reason)
            case ArmTimer():
                self._cancel_timer(action.key)
                loop = asyncio.get_running_loop()
                self._timers[action.key] = loop.call_later(action.after_s, self._timer_fired, action.key)
            case CancelTimer():
                self._cancel_timer(action.key)
            case PauseReading(capacity_s=None):
                self._readable.clear()
            case ResumeReading():
                self._readable.set()
            case Detach():
                self.hub.detach(self, action.room_id)
            case EnterRoom():
                joined, self._entering = self._entering, None
                assert joined is not None
                for change in joined.changes:  # before `joined`: a client that has `joined` has them too
                    self.send_frame(change)
                self.send_frame(joined.joined)
                if joined.resync is not None:
                    self.send_frame(joined.resync)
                self.hub.finish_join(self, action.room_id, joined.history, joined.baseline_seq, joined.catch_up)
            case AdoptToken():
                principal, self._adopting = self._adopting, None
                assert principal is not None
                self.principal, self.family = principal, principal.claims.family
            case _:
                return False
        return True

    async def _io(self, action: Action) -> Actions:
        """Perform an action that waits (or may fail); what it returns is the session's answer to its result."""
        match action:
            case Submit(frame=frame):
                # Pipelined: queued in frame order now, acked when its batch commits, while the next frames
                # are read (one socket is not limited to one commit round trip per send).
                try:
                    durable = self.rooms.submit(self.user_id, frame.room_id, frame.content, frame.client_msg_id)
                except errors.Busy as err:
                    return self.session.busy(frame, err)
                durable.add_done_callback(functools.partial(self._on_durable, frame))
                return self.session.queued(frame)
            case PauseReading(capacity_s=float(capacity_s)):
                # Backpressure: this socket is not read until the commit queue has room (or the retry time passed).
                self._readable.clear()
                await self.writer.wait_capacity(capacity_s)
                return self.session.capacity()
            case Join(frame=frame):
                self._entering = await self.rooms.join(
                    self,
                    frame.room_id,
                    frame.since_seq,
                    frame.request_id,
                    rejoin=action.rejoin,
                    epoch=frame.epoch,
                    since_rev=frame.since_rev,
                )
                return self.session.join_answered(frame)
            case Leave():
                if action.presence:
                    await self.rooms.leave(self, action.room_id, detached=action.detached)
                else:
                    await self.hub.leave_room(self, action.room_id)
                return []
            case RelayTyping(frame=frame):
                await self.rooms.typing(self, frame.room_id, frame.is_typing)
                return self.session.typing_relayed(frame)
            case PublishTyping():
                await self.hub.publish_room(action.room_id, action.frame, exclude=self.connection_id)
                return []
            case Authenticate(frame=frame):
                principal = await self.accounts.authenticate(frame.token, exp_leeway=False)
                self._adopting = principal
                return self.session.authenticated(frame, principal.user_id, principal.claims.exp, time.time())
            case Perform(frame=frame):
                return await self._perform(frame)
        raise AssertionError(f"not an I/O action: {action!r}")

    async def _perform(self, frame: Performed) -> Actions:
        assert self.principal is not None
        match frame:
            case client_frames.React():
                row, changed = await self.rooms.react(self.user_id, frame.message_id, frame.emoji, frame.add)
                reply = server_frames.reacted(
                    room_id=int(row["room_id"]),
                    message_id=frame.message_id,
                    emoji=frame.emoji,
                    add=frame.add,
                    changed=changed,
                    reply_to=frame.request_id,
                )
                return [Reply(reply)]
            case client_frames.Read():
                await self.rooms.read(self, frame.room_id, frame.seq, frame.private)
            case client_frames.Edit():
                await self.rooms.edit(self.user_id, self.principal.is_admin, frame.message_id, frame.content)
            case client_frames.Delete():
                await self.rooms.delete(self.user_id, self.principal.is_admin, frame.message_id)
            case client_frames.Cancel() | client_frames.Regenerate():
                assistant = self.rooms.assistant
                if assistant is None:
                    raise errors.NotFound("no such generation")
                await assistant.control(self.user_id, self.principal.is_admin, frame)
        return []

    def _on_durable(self, frame: client_frames.Send, fut: asyncio.Future[Committed]) -> None:
        exc = fut.exception()
        if exc is not None:
            err = exc if isinstance(exc, errors.ChatdError) else errors.Internal()
            self._run_now(self.session.send_failed(frame, err), "ws-send")
            return
        committed = fut.result()
        if committed.error is not None:
            self._run_now(self.session.send_failed(frame, committed.error), "ws-send")
            return
        assert committed.row is not None
        self._run_now(self.session.send_durable(frame, committed.row, committed.duplicate), "ws-send")
        if self.rooms.wants_answer(committed):  # checked here: no task per send in plain rooms
            self.state.tasks.spawn(self._queue_answer(frame, committed), "ws-assistant-enqueue")

    async def _queue_answer(self, frame: client_frames.Send, committed: Committed) -> None:
        result = await self.rooms.after_commit(self.user_id, frame.room_id, committed)
        if result.assistant_error is not None:  # stored and acked; no answer will come
            self._run_now(self.session.answer_refused(frame, result.assistant_error), "ws-send")

    def _timer_fired(self, key: TimerKey) -> None:
        self._timers.pop(key, None)
        actions = self.session.timer_fired(key, time.monotonic(), time.time())
        self._run_now(actions, "typing-expiry" if key[0] == TYPING else "ws-token")

    def _cancel_timer(self, key: TimerKey) -> None:
        timer = self._timers.pop(key, None)
        if timer is not None:
            timer.cancel()

    # -- closing --------------------------------------------------------------------

    @property
    def registered(self) -> bool:
        """Counted in the per-user connection registry (refreshed while it lives)."""
        return self._registered

    def on_close(self) -> None:
        self._closing = True
        self._stopped.set()
        self._readable.set()
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()
        rooms = [action.room_id for action in self.session.connection_closed() if isinstance(action, Leave)]
        self.state.connections.discard(self)
        if self._counted:
            metrics.ws_connections.dec()
            self._counted = False
            if not self._close_sent:  # the client closed first, or the connection dropped (no close code: 1006)
                metrics.ws_closed_by_client.labels(metrics.client_close_label(self.close_code)).inc()
        if self.principal is not None:
            self.state.tasks.spawn(self._cleanup(rooms), "ws-cleanup")

    async def _cleanup(self, rooms: list[int]) -> None:
        for room_id in rooms:
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


def session_for(settings: Settings) -> ServerSession:
    """A socket's protocol state with the limits of ``settings`` (its user is set once authenticated)."""
    ws = settings.ws
    config = SessionConfig(
        max_pending_sends=ws.max_pending_sends,
        typing_interval_s=ws.typing_interval_s,
        typing_ttl_s=ws.typing_ttl_s,
        token_warning_s=settings.auth.token_expiring_warning_s,
    )
    decoder = client_frames.FrameDecoder(max_frame_bytes=ws.max_frame_bytes, max_message_chars=ws.max_message_chars)
    return ServerSession(0, config, decoder, frame_limiter(ws), metrics.hot.frames_received)


def _buckets(ws: WebSocketSettings) -> dict[str, tuple[float, int]]:
    return {
        "all": (ws.frame_rate_per_s, ws.frame_burst),
        "join": (ws.join_rate_per_s, ws.join_burst),
        "read": (ws.read_rate_per_s, ws.read_burst),
        "typing": (ws.typing_rate_per_s, ws.typing_burst),
        "control": (ws.control_rate_per_s, ws.control_burst),
    }


def client_limits(ws: WebSocketSettings) -> dict[str, Any]:
    """``hello.limits``: what a client keeps to so that none of its frames is refused (PROTOCOL.md §5)."""
    limits: dict[str, Any] = {"send": {"count": ws.send_rate_count, "window_ms": int(ws.send_rate_window_s * 1000)}}
    for name, (rate, burst) in _buckets(ws).items():
        limits[name] = {"per_s": rate, "burst": burst}
    return limits


def frame_limiter(ws: WebSocketSettings) -> FrameLimiter:
    """The per-socket frame limits of ``ws`` (sends also have their per-user quota, ``Rooms.submit``)."""
    return FrameLimiter(
        limits=_buckets(ws),
        groups=dict(FRAME_GROUPS),
        max_violations=ws.max_violations,
        violation_window_s=ws.violation_window_s,
    )


def _frame_of(action: Action) -> client_frames.ClientFrame | None:
    """The client frame an I/O action serves: its failure answers that frame."""
    if isinstance(action, Submit | Join | EnterRoom | Leave | RelayTyping | Perform | Authenticate):
        return action.frame
    return None


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
