"""Sans-I/O server state of one socket (docs/PROTOCOL.md): frames, I/O results, kicks and timers in; actions out.

The server twin of ``chatd/client/session.py``.  Nothing here reads a socket, a clock or Postgres: the
caller (``chatd/api/ws.py``'s ``ChatSocket``) passes ``now`` (monotonic seconds, for limits and typing) and
``wall`` (Unix seconds, for the token and ``pong``), performs the returned actions in order and feeds
their results back in.

Inputs:

- ``receive(text)``: one client text frame (decoded here: ``FrameDecoder``; limited here: ``FrameLimiter``).
- I/O results: ``queued`` / ``busy`` (``Submit`` answered), ``send_durable`` / ``send_failed`` (its commit),
  ``join_answered`` (``Join``), ``typing_relayed`` (``RelayTyping``), ``authenticated`` (``Authenticate``),
  ``failed`` (any of them, or a ``Leave`` / ``Perform``, raised an error), ``capacity`` (the commit queue
  has room again after ``busy``), ``answer_refused`` (the assistant will not answer an acked send).
- ``kicked(room)``: removed from the room; ``timer_fired(key)``; ``opened(exp)``: ``hello`` was written;
  ``connection_closed()``.

Outputs: the ``Action`` union below.  Rules it owns:

- Sends: at ``max_pending_sends`` unanswered sends, or after ``busy``, ``PauseReading`` until an answer
  (``ResumeReading``) or the commit queue's capacity (``PauseReading.capacity_s``).
- Joins: one in flight at a time (frames are handled in order).  A kick while the join is in flight answers
  the join ``not_found`` and leaves the room; a kick of a joined room writes ``left`` (``reply_to`` None)
  and leaves it.
- Typing: ``true`` relayed once per ``typing_interval_s``, ``false`` only after a relayed ``true``; a
  ``true`` not refreshed for ``typing_ttl_s`` is ended by the server (``PublishTyping`` false).
- Token: ``token_expiring`` at exp − ``token_warning_s``, close 4001 at exp (never before; the timer is
  re-armed when it fires early); a re-``auth`` of the same user reschedules both, another user is refused.
- Frames: per-type limits; refused frames and invalid fields are violations, too many of them close 1008;
  a ``ProtocolViolation`` writes its error and closes with its code.  Frames after a close are ignored.
"""

from __future__ import annotations

from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass
from typing import Any, Final, TypeAlias

from chatd.core import client_frames, errors, server_frames
from chatd.core.client_frames import FrameDecoder, FrameError
from chatd.core.errors import CloseCode
from chatd.core.framelimits import ALLOWED, FrameLimiter

TimerKey: TypeAlias = tuple[str, int]
Performed: TypeAlias = (
    client_frames.Read
    | client_frames.Edit
    | client_frames.Delete
    | client_frames.React
    | client_frames.Cancel
    | client_frames.Regenerate
)
TOKEN_WARNING: Final[TimerKey] = ("token_warning", 0)
TOKEN_EXPIRY: Final[TimerKey] = ("token_expiry", 0)
TYPING: Final = "typing"  # ("typing", room_id): the room's typing state expires

# Frame types limited together (a group's bucket besides the one for every frame).
FRAME_GROUPS: Final[Mapping[str, str]] = {
    "join": "join",
    "leave": "join",
    "read": "read",
    "typing": "typing",
    **dict.fromkeys(("edit", "delete", "react", "auth", "cancel", "regenerate"), "control"),
}


@dataclass(frozen=True, slots=True)
class SessionConfig:
    max_pending_sends: int
    typing_interval_s: float
    typing_ttl_s: float
    token_warning_s: float


# ---------------------------------------------------------------------------------------------- actions


@dataclass(frozen=True, slots=True)
class Reply:
    """Write this frame to the socket."""

    frame: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Close:
    """Close the socket; ``log``: an event to log (warning) with ``detail`` as its reason."""

    code: int
    reason: str
    log: str | None = None
    detail: str = ""


@dataclass(frozen=True, slots=True)
class Submit:
    """Queue the send for the group commit; answer ``queued``, ``busy`` or ``failed``."""

    frame: client_frames.Send


@dataclass(frozen=True, slots=True)
class Join:
    """Join (or rejoin) the room; answer ``join_answered`` with the result kept, or ``failed``."""

    frame: client_frames.Join
    rejoin: bool


@dataclass(frozen=True, slots=True)
class EnterRoom:
    """The kept join result stands: write its ``joined`` (and ``resync_required``), hand its history to the hub."""

    frame: client_frames.Join

    @property
    def room_id(self) -> int:
        return self.frame.room_id


@dataclass(frozen=True, slots=True)
class Detach:
    """Take the socket out of the room's delivery now (nothing of the room may follow)."""

    room_id: int


@dataclass(frozen=True, slots=True)
class Leave:
    """Leave the room: the hub and presence (``presence`` False: the hub only; ``detached``: after ``Detach``)."""

    room_id: int
    detached: bool = False
    presence: bool = True
    frame: client_frames.Leave | None = None  # a client's leave: its errors answer it


@dataclass(frozen=True, slots=True)
class RelayTyping:
    """Relay the typing frame to the room; answer ``typing_relayed`` or ``failed``."""

    frame: client_frames.Typing


@dataclass(frozen=True, slots=True)
class PublishTyping:
    """Publish this (server-made) typing frame to the room's other sockets, best effort."""

    room_id: int
    frame: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Perform:
    """The frame's service call (read, edit, delete, react, cancel, regenerate); a failure comes back as its
    error, a ``react`` also gets its ``reacted`` reply."""

    frame: Performed


@dataclass(frozen=True, slots=True)
class Authenticate:
    """Check the token; answer ``authenticated`` with the principal kept, or ``failed``."""

    frame: client_frames.Auth


@dataclass(frozen=True, slots=True)
class AdoptToken:
    """The kept principal (from ``Authenticate``) is the socket's now."""


@dataclass(frozen=True, slots=True)
class ArmTimer:
    """Call ``timer_fired(key)`` after ``after_s``; replaces the timer of the same key."""

    key: TimerKey
    after_s: float


@dataclass(frozen=True, slots=True)
class CancelTimer:
    key: TimerKey


@dataclass(frozen=True, slots=True)
class PauseReading:
    """Read no frame until ``ResumeReading``; ``capacity_s``: wait for the commit queue (at most that long),
    then call ``capacity``."""

    capacity_s: float | None = None


@dataclass(frozen=True, slots=True)
class ResumeReading:
    pass


Action: TypeAlias = (
    Reply
    | Close
    | Submit
    | Join
    | EnterRoom
    | Detach
    | Leave
    | RelayTyping
    | PublishTyping
    | Perform
    | Authenticate
    | AdoptToken
    | ArmTimer
    | CancelTimer
    | PauseReading
    | ResumeReading
)
Actions: TypeAlias = list[Action]


# ---------------------------------------------------------------------------------------------- session


class ServerSession:
    """The protocol state of one authenticated socket."""

    def __init__(
        self,
        user_id: int,
        config: SessionConfig,
        decoder: FrameDecoder,
        limiter: FrameLimiter,
        counts: MutableMapping[str, int] | None = None,
    ) -> None:
        self.user_id = user_id
        self.config = config
        self._decoder = decoder
        self._limiter = limiter
        self.counts: MutableMapping[str, int] = {} if counts is None else counts  # frames received, by type
        self.closed = False
        self.joined: set[int] = set()
        self.joining: tuple[int, bool] | None = None  # (room, rejoin) of the join in flight
        self._kicked_while_joining = False
        self.pending = 0  # sends queued, not yet answered
        self._busy = False  # paused after `busy` until the commit queue has room
        self._paused = False
        self._typing_since: dict[int, float] = {}  # room -> when a `true` was last relayed
        self._typing_armed: set[int] = set()  # rooms whose typing expiry timer is armed
        self.exp: float | None = None  # the token's expiry (Unix seconds)

    @property
    def paused(self) -> bool:
        """No frame is read: the last of ``PauseReading`` / ``ResumeReading`` given was a pause."""
        return self._paused

    # -- frames --------------------------------------------------------------------------------

    def receive(self, data: str | bytes, now: float, wall: float) -> Actions:
        """One client frame as it came off the socket."""
        if self.closed:
            return []
        try:
            frame = self._decoder.decode(data)
        except errors.ProtocolViolation as exc:
            self._count("invalid")
            self.closed = True
            reason = exc.message[:100]
            return [
                Reply(server_frames.error(exc, reply_to=None)),
                Close(int(exc.close_code), reason, "ws_protocol_error", reason),
            ]
        except FrameError as exc:
            self._count("invalid")
            return [*self._error_to(exc.request_id, exc.error), *self._violated("invalid frames", now)]
        # Sends have their own quota per user (Rooms.submit) and the commit queue's backpressure.
        decision = ALLOWED if isinstance(frame, client_frames.Send) else self._limiter.hit(frame.TYPE, now)
        if not decision.allowed:
            self._count("limited")
            err = errors.RateLimited(f"too many {frame.TYPE} frames", retry_after_ms=decision.retry_after_ms)
            return [*self._error(frame, err), *self._violated(f"{frame.TYPE} flood", now)]
        self._count(frame.TYPE)
        return self.frame(frame, now, wall)

    def frame(self, frame: client_frames.ClientFrame, now: float, wall: float) -> Actions:
        """A decoded frame that passed the limits."""
        if self.closed:
            return []
        match frame:
            case client_frames.Send():
                return [Submit(frame)]
            case client_frames.Join():
                rejoin = frame.room_id in self.joined
                self.joining = (frame.room_id, rejoin)
                self._kicked_while_joining = False
                return [Join(frame, rejoin)]
            case client_frames.Leave():
                if frame.room_id not in self.joined:
                    return self._error(frame, errors.NotFound("not joined to this room"))
                self.joined.discard(frame.room_id)
                return [
                    Leave(frame.room_id, frame=frame),
                    Reply(server_frames.left(room_id=frame.room_id, reply_to=frame.request_id)),
                ]
            case client_frames.Typing():
                return self._typing(frame, now)
            case client_frames.Ping():
                return [Reply(server_frames.pong(server_time_ms=int(wall * 1000), reply_to=frame.request_id))]
            case client_frames.Auth():
                return [Authenticate(frame)]
            case (
                client_frames.Read()
                | client_frames.Edit()
                | client_frames.Delete()
                | client_frames.React()
                | client_frames.Cancel()
                | client_frames.Regenerate()
            ):
                return [Perform(frame)]

    def _violated(self, reason: str, now: float) -> Actions:
        """A refused frame; a socket that keeps sending them is closed with 1008."""
        if not self._limiter.violation(now) or self.closed:
            return []
        self.closed = True
        code = int(CloseCode.POLICY_VIOLATION)
        return [Close(code, f"too many refused frames ({reason})", "ws_policy_close", reason)]

    def _error(self, frame: client_frames.ClientFrame, err: errors.ChatdError) -> Actions:
        return self._error_to(frame.request_id, err)

    def _error_to(self, request_id: client_frames.RequestId, err: errors.ChatdError) -> Actions:
        return [Reply(server_frames.error(err, reply_to=request_id))]

    def _count(self, label: str) -> None:
        self.counts[label] = self.counts.get(label, 0) + 1

    # -- results of the I/O asked for --------------------------------------------------------------

    def failed(self, frame: client_frames.ClientFrame, err: errors.ChatdError, now: float) -> Actions:
        """The I/O of ``frame`` (``Submit``, ``Join``, ``Leave``, ``RelayTyping``, ``Authenticate``,
        ``Perform``) raised ``err``; the rest of that frame's actions are dropped."""
        if isinstance(frame, client_frames.Join) and self.joining is not None and self.joining[0] == frame.room_id:
            self.joining = None
        elif isinstance(frame, client_frames.Typing):
            self._typing_since.pop(frame.room_id, None)  # not relayed: the next one is tried again
        if self.closed:
            return []
        out = self._error(frame, err)
        if isinstance(err, errors.RateLimited):
            out += self._violated(f"{frame.TYPE} over its rate", now)
        return out

    def queued(self, frame: client_frames.Send) -> Actions:
        """The send is in the commit queue: its answer comes with ``send_durable`` / ``send_failed``."""
        self.pending += 1
        return self._reading()

    def busy(self, frame: client_frames.Send, err: errors.Busy) -> Actions:
        """The commit queue is full: ``busy``, and no frame is read until it has room (or the retry time passed)."""
        if self.closed:
            return []
        self._busy = True
        out = self._error(frame, err)
        out += self._reading((err.retry_after_ms or 1000) / 1000)
        return out

    def capacity(self) -> Actions:
        """The commit queue has room again (or the busy wait is over)."""
        self._busy = False
        return self._reading()

    def send_durable(self, frame: client_frames.Send, row: Mapping[str, Any], duplicate: bool) -> Actions:
        self.pending -= 1
        out = self._reading()
        if not self.closed:
            ack = server_frames.ack(
                room_id=row["room_id"],
                client_msg_id=frame.client_msg_id,
                message_id=row["id"],
                seq=row["seq"],
                created_at=server_frames.iso(row["created_at"]) or "",
                reply_to=frame.request_id,
                duplicate=duplicate,
            )
            out.append(Reply(ack))
        return out

    def send_failed(self, frame: client_frames.Send, err: errors.ChatdError) -> Actions:
        self.pending -= 1
        out = self._reading()
        if not self.closed:
            out += self._error(frame, err)
        return out

    def answer_refused(self, frame: client_frames.Send, err: errors.ChatdError) -> Actions:
        """Stored and acked, but no answer will come (busy assistant, quota)."""
        return [] if self.closed else self._error(frame, err)

    def _reading(self, capacity_s: float | None = None) -> Actions:
        pause = self._busy or self.pending >= self.config.max_pending_sends
        if self.closed:
            pause = False  # a closed socket's reader is released
        if pause and (not self._paused or capacity_s is not None):
            self._paused = True
            return [PauseReading(capacity_s)]
        if not pause and self._paused:
            self._paused = False
            return [ResumeReading()]
        return []

    def join_answered(self, frame: client_frames.Join) -> Actions:
        """``Join`` succeeded (its result kept by the caller)."""
        room_id = frame.room_id
        rejoin = self.joining[1] if self.joining is not None and self.joining[0] == room_id else False
        self.joining = None
        if self._kicked_while_joining or self.closed:
            # Removed after the join read the membership: answered as if the join came after the removal, so a
            # removed member is never left receiving the room. On a rejoin, `kicked` found the room joined and
            # did the leave (presence included) already; so did the close for the rooms joined then.
            kicked, self._kicked_while_joining = self._kicked_while_joining, False
            out: Actions = [Leave(room_id, presence=not rejoin)]
            if kicked and not self.closed:
                out += self._error(frame, errors.NotFound("room not found"))
            return out
        self.joined.add(room_id)
        return [EnterRoom(frame)]

    def typing_relayed(self, frame: client_frames.Typing) -> Actions:
        return self._typing_timer(frame)

    def authenticated(self, frame: client_frames.Auth, user_id: int, exp: float, wall: float) -> Actions:
        """``Authenticate`` found a valid token of ``user_id``, valid until ``exp``."""
        if self.closed:
            return []
        if user_id != self.user_id:
            return self._error(frame, errors.Forbidden("token belongs to another user"))
        out: Actions = [AdoptToken(), *self._schedule_expiry(exp, wall)]
        out.append(Reply(server_frames.authenticated(expires_at_ms=int(exp * 1000), reply_to=frame.request_id)))
        return out

    # -- events -------------------------------------------------------------------------------------

    def opened(self, exp: float, wall: float) -> Actions:
        """``hello`` was written: the token's warning and expiry are scheduled."""
        return [] if self.closed else self._schedule_expiry(exp, wall)

    def kicked(self, room_id: int) -> Actions:
        """Removed from the room by its owner (or a revocation): stop its frames and say so."""
        if self.joining is not None and self.joining[0] == room_id:
            self._kicked_while_joining = True
        if room_id not in self.joined:
            return []
        self.joined.discard(room_id)
        # Out of the room's delivery before `left` is written: the leave runs later, and a room message read in
        # the same loop iteration as the kick (a member_left notice right behind it) must not follow `left`.
        out: Actions = [Detach(room_id)]
        if not self.closed:
            out.append(Reply(server_frames.left(room_id=room_id, reply_to=None)))
        out.append(Leave(room_id, detached=True))
        return out

    def timer_fired(self, key: TimerKey, now: float, wall: float) -> Actions:
        kind, room_id = key
        if kind == TYPING:
            self._typing_armed.discard(room_id)
            self._typing_since.pop(room_id, None)
            if self.closed:
                return []
            frame = server_frames.typing(room_id=room_id, user_id=self.user_id, is_typing=False)
            return [PublishTyping(room_id, frame)]
        if self.closed or self.exp is None:
            return []
        left_s = self.exp - wall
        if key == TOKEN_WARNING:
            return [self._warning(left_s)]
        if left_s > 0:  # the loop's monotonic timer fired before the wall clock reached exp
            return [ArmTimer(TOKEN_EXPIRY, left_s + 0.001)]
        self.closed = True
        return [Close(int(CloseCode.AUTH_EXPIRED), "token expired")]

    def connection_closed(self) -> Actions:
        """The socket closed (either side): the rooms it was in are left; nothing more is written."""
        self.closed = True
        self._busy = False
        out = self._reading()
        out += [Leave(room_id) for room_id in self.joined]
        self.joined.clear()
        self._typing_since.clear()
        self._typing_armed.clear()
        return out

    # -- internals ----------------------------------------------------------------------------------

    def _typing(self, frame: client_frames.Typing, now: float) -> Actions:
        room_id = frame.room_id
        if frame.is_typing:
            last = self._typing_since.get(room_id)
            relay = last is None or now - last >= self.config.typing_interval_s
            if relay:
                self._typing_since[room_id] = now
        else:
            relay = self._typing_since.pop(room_id, None) is not None  # `false` while not typing: nothing to stop
        if relay:
            return [RelayTyping(frame)]  # still typing: receivers keep it for typing_ttl_s
        return self._typing_timer(frame)

    def _typing_timer(self, frame: client_frames.Typing) -> Actions:
        key = (TYPING, frame.room_id)
        if frame.is_typing:
            self._typing_armed.add(frame.room_id)
            return [ArmTimer(key, self.config.typing_ttl_s)]
        if frame.room_id in self._typing_armed:
            self._typing_armed.discard(frame.room_id)
            return [CancelTimer(key)]
        return []

    def _schedule_expiry(self, exp: float, wall: float) -> Actions:
        # `exp` is wall-clock; the caller's timers are monotonic and may fire a millisecond early. So both
        # firings compare with the wall clock again: the warning never announces more than it promises, and
        # the close never comes before `exp`.
        self.exp = exp
        warning_s = self.config.token_warning_s
        remaining_s = exp - wall
        out: Actions = [CancelTimer(TOKEN_WARNING)]
        warning_ms = int(warning_s * 1000)
        if remaining_s * 1000 > warning_ms:
            out.append(ArmTimer(TOKEN_WARNING, remaining_s - warning_ms / 1000))
        elif remaining_s > 0:
            out.append(self._warning(remaining_s))
        out.append(ArmTimer(TOKEN_EXPIRY, max(0.0, remaining_s)))
        return out

    def _warning(self, left_s: float) -> Reply:
        warning_ms = int(self.config.token_warning_s * 1000)
        return Reply(server_frames.token_expiring(expires_in_ms=max(0, min(int(left_s * 1000), warning_ms))))
