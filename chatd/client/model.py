"""What the client session holds (messages, sends in flight, streams, rooms) and the actions it returns.

Plain data, shared by ``session`` (which changes it) and its drivers (``terminal``, which draw it and
perform the actions).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

PAGE = 50  # newest messages loaded when a room is opened

# ---------------------------------------------------------------------------------------------- model


@dataclass
class Message:
    room_id: int
    message_id: int
    seq: int
    role: str
    content: str
    sender_id: int | None = None
    kind: str = "text"
    client_msg_id: str | None = None
    created_at: str = ""
    edited_at: str | None = None
    deleted: bool = False
    reply_to_message_id: int | None = None
    status: str | None = None  # "cancelled" / "error": a partial answer
    superseded: bool = False
    data: dict[str, Any] | None = None  # kind file: the attachment; kind system: the event
    reactions: list[dict[str, Any]] = field(default_factory=list)  # [{emoji, count, users}], first-reaction order
    rev: int = 0  # the edit revision of the last change applied: an older change frame is dropped
    answered_by: dict[str, Any] | None = None  # a room assistant's answer: {id, name, model}

    def reacted(self, user_id: int | None, emoji: str) -> bool:
        """Whether ``user_id`` reacted with ``emoji`` (frames carry who; "me" is computed here)."""
        return any(r.get("emoji") == emoji and user_id in r.get("users", ()) for r in self.reactions)

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> Message:
        return cls(
            room_id=int(d["room_id"]),
            message_id=int(d["message_id"]),
            seq=int(d["seq"]),
            role=str(d.get("role", "user")),
            content=str(d.get("content", "")),
            sender_id=d.get("sender_id"),
            kind=str(d.get("kind", "text")),
            client_msg_id=d.get("client_msg_id"),
            created_at=str(d.get("created_at", "")),
            edited_at=d.get("edited_at"),
            deleted=bool(d.get("deleted", False)),
            reply_to_message_id=d.get("reply_to_message_id"),
            status=d.get("status"),
            superseded=bool(d.get("superseded", False)),
            data=d.get("data"),
            reactions=list(d.get("reactions") or ()),
            answered_by=d.get("answered_by"),
        )


@dataclass
class Pending:
    """A send the server has not acknowledged yet (or acked, until its message is applied)."""

    room_id: int
    client_msg_id: str
    content: str
    state: str = "queued"  # queued (not on the wire) | sent | waiting (retry_at) | acked | failed
    retry_at: float | None = None
    seq: int | None = None
    error: str | None = None


@dataclass
class Stream:
    """An assistant answer while it streams (PROTOCOL.md §11)."""

    room_id: int
    message_id: int
    reply_to_message_id: int
    model: str = ""
    assistant: str = ""  # the room assistant's name (answered_by), "" for the server's default one
    text: str = ""
    last_index: int = -1
    ended: bool = False
    stop_reason: str | None = None
    interrupted: bool = False  # the socket dropped; dropped unless re-announced on resume


@dataclass
class Room:
    id: int
    name: str = ""
    kind: str = "group"
    owner_id: int | None = None
    status: str = "active"  # or "archived"
    read_seq: int = 0
    mention_count: int = 0  # mentions of you after read_seq, as the server last counted them
    latest_seq: int = 0  # highest seq known to exist (joined, message, ack, stream_end)
    loaded: bool = False  # history is kept: last_seq is contiguous and messages are stored
    last_seq: int = 0
    epoch: str | None = None  # of the room's seqs (from `joined`): sent back with since_seq
    edit_rev: int | None = None  # the room's edit revision at the last `joined`: sent back as since_rev
    first_seq: int = 0  # oldest loaded seq, for scrolling back
    has_older: bool = False
    messages: dict[int, Message] = field(default_factory=dict)  # by seq
    buffer: dict[int, Message] = field(default_factory=dict)  # seq > last_seq + 1, waiting for the gap
    joined: bool = False  # `joined` received on the current socket
    join_retry_at: float | None = None
    fetching: str | None = None  # purpose of the REST page in flight
    gap_since: float | None = None
    online: set[int] = field(default_factory=set)
    typing: dict[int, float] = field(default_factory=dict)  # user id -> expiry
    streams: dict[int, Stream] = field(default_factory=dict)  # by answer message_id
    queued: dict[int, int] = field(default_factory=dict)  # prompt id -> position
    notes: dict[int, str] = field(default_factory=dict)  # message id -> "the assistant did not answer: ..."

    @property
    def unread(self) -> int:
        return max(0, self.latest_seq - self.read_seq)

    def ordered(self) -> list[Message]:
        return [self.messages[s] for s in sorted(self.messages)]


# ---------------------------------------------------------------------------------------------- actions


@dataclass(frozen=True)
class SendFrame:
    frame: dict[str, Any]


@dataclass(frozen=True)
class FetchPage:
    """GET /api/v1/rooms/{room_id}/messages; feed the answer to ``ClientSession.page``."""

    room_id: int
    purpose: str  # latest | fill | older
    after_seq: int | None = None
    before_seq: int | None = None
    limit: int = PAGE

    def query(self) -> dict[str, int]:
        q = {"limit": self.limit}
        if self.after_seq is not None:
            q["after_seq"] = self.after_seq
        if self.before_seq is not None:
            q["before_seq"] = self.before_seq
        return q


@dataclass(frozen=True)
class RefreshToken:
    """Refresh the access token over REST, then call ``ClientSession.token_refreshed``."""


@dataclass(frozen=True)
class Show:
    """A message joined the room's contiguous history: render it (once per seq)."""

    message: Message


@dataclass(frozen=True)
class ShowOlder:
    """Older messages loaded by scrolling back, oldest first."""

    room_id: int
    messages: tuple[Message, ...]


@dataclass(frozen=True)
class Reset:
    """The room's history was replaced by its newest page (a gap too large to replay)."""

    room_id: int


@dataclass(frozen=True)
class Notice:
    text: str
    room_id: int | None = None
    level: str = "info"  # or "error"


@dataclass(frozen=True)
class RoomRemoved:
    room_id: int


@dataclass(frozen=True)
class Reacted:
    """A shown message's reactions changed (a line-printing client cannot redraw it in place)."""

    message: Message


@dataclass(frozen=True)
class Redraw:
    """Live state changed (streams, typing, presence, pending, unread counts)."""


Action = SendFrame | FetchPage | RefreshToken | Show | ShowOlder | Reset | Notice | RoomRemoved | Reacted | Redraw


def reconnect_delay(attempt: int, close_code: int | None, rand: float) -> float:
    """Seconds before the next connection attempt (PROTOCOL.md §6).

    ``attempt`` counts failures since the last successful ``hello``; ``rand`` is uniform in [0, 1).
    """
    if close_code == 1008:  # too many refused frames: reconnect, not at once (a ban: see ``after_close``)
        return 2.0 + rand * min(30.0, 1.0 * 2.0 ** min(attempt, 10))
    if close_code == 1001:  # a worker stops: another one serves at once
        return 0.05 + 0.5 * rand
    if close_code == 4029:  # too many connections: a slot frees up slowly
        return 10.0 + 20.0 * rand
    return max(0.1, rand * min(30.0, 0.5 * 2.0 ** min(attempt, 10)))  # full jitter


@dataclass(frozen=True)
class AfterClose:
    """What a client does when its socket closed (PROTOCOL.md §6, §10 step 1)."""

    refresh_first: bool  # refresh the token before reconnecting; a refresh answered 401 signs out
    policy: bool  # closed for refused frames: say so in words (then reconnect, not a sign-out)
    delay: float  # seconds before the next connection attempt


def after_close(code: int | None, reason: str, attempt: int, rand: float) -> AfterClose:
    """4001 (token expired, session revoked, ...) and 1008 ``account banned``: a refresh tells whether the
    session goes on (the ban's answers 401); any other 1008 is a policy close: reconnect after a pause."""
    banned = code == 1008 and "banned" in reason
    return AfterClose(code == 4001 or banned, code == 1008 and not banned, reconnect_delay(attempt, code, rand))
