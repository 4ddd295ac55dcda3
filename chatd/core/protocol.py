"""The chatd wire protocol, sans-I/O.

Everything here is pure: strings and bytes in, dataclasses / dicts / bytes out.
No asyncio, no sockets, no Tornado, no clock reads (times are arguments), so
the whole protocol is unit-testable without a loop, in the style of
python-websockets' sans-I/O core.

Contents:

1. Wire basics: ``PROTOCOL_VERSION``, ``encode`` / ``encode_bytes``, ID rules.
2. Client frames: one frozen dataclass per ``type``; ``parse_client_frame``.
3. ``FrameDecoder``: per-connection state machine (size cap, strikes).
4. Server frame builders: one function per server ``type``, so each wire
   shape lives in exactly one place.
5. ``ws_text_frame``: pre-framed RFC 6455 text frames for fan-out.

Error design
------------
Decoding fails in exactly two ways, so a socket handler needs two clauses:

* ``ProtocolViolation`` (from ``chatd.errors``): fatal; close the socket with
  ``exc.close_code``.
* ``FrameError``: the frame is rejected but the connection lives on.  It is a
  plain wrapper (not a ``ChatdError``, so the error tree stays as it is) that
  holds the client-visible ``error`` (``BadRequest`` or ``TooLarge``) plus the
  frame's ``request_id``, recovered before field validation so the reply can
  carry ``reply_to``::

      try:
          frame = decoder.decode(text)
      except ProtocolViolation as exc:
          close(exc.close_code, exc.message)
      except FrameError as exc:
          send(encode(error(exc.error, reply_to=exc.request_id)))

A wrapper was chosen over setting an ad-hoc ``request_id`` attribute on the
error because it is visible to mypy and cannot be forgotten by a raiser.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import re
import struct
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Final, Literal, NoReturn, TypeAlias

from chatd.core.errors import BadRequest, ChatdError, CloseCode, ProtocolViolation, TooLarge

__all__ = [
    "CLIENT_FRAME_TYPES",
    "MAX_ID_CHARS",
    "MAX_SAFE_INT",
    "MAX_TOKEN_CHARS",
    "PROTOCOL_VERSION",
    "Auth",
    "Cancel",
    "ClientFrame",
    "Delete",
    "Edit",
    "FrameDecoder",
    "FrameError",
    "Join",
    "Kind",
    "Leave",
    "Ping",
    "Read",
    "Regenerate",
    "RequestId",
    "Role",
    "Send",
    "StopReason",
    "Typing",
    "ack",
    "announcement",
    "authenticated",
    "cancelled",
    "change_from_row",
    "encode",
    "encode_bytes",
    "error",
    "hello",
    "iso",
    "joined",
    "left",
    "message",
    "message_deleted",
    "message_from_row",
    "message_updated",
    "parse_client_frame",
    "pong",
    "presence",
    "queued",
    "read",
    "resync_required",
    "room_added",
    "room_object",
    "room_removed",
    "room_updated",
    "stream_chunk",
    "stream_end",
    "stream_end_from_row",
    "stream_start",
    "token_expiring",
    "typing",
    "ws_frame_payloads",
    "ws_text_frame",
]

# --------------------------------------------------------------------------
# 1. Wire basics
# --------------------------------------------------------------------------

PROTOCOL_VERSION: Final = 1

# IDs are Postgres bigints but are sent as JSON numbers; browsers parse those
# as doubles, so anything above 2**53-1 would silently lose precision.
MAX_SAFE_INT: Final = 2**53 - 1
MAX_ID_CHARS: Final = 64  # request ``id`` and ``client_msg_id``
MAX_EPOCH_CHARS: Final = 64  # a room epoch echoed back in `join`
MAX_TOKEN_CHARS: Final = 8192

RequestId: TypeAlias = str | int | None
Role: TypeAlias = Literal["user", "assistant", "system"]
Kind: TypeAlias = Literal["text", "file", "system"]
StopReason: TypeAlias = Literal["end_turn", "max_tokens", "cancelled", "error"]


_ENCODER: Final = json.JSONEncoder(
    separators=(",", ":"),
    ensure_ascii=False,  # UTF-8 is ~3x smaller than \\uXXXX for CJK text
    allow_nan=False,
)


def encode(frame: Mapping[str, Any]) -> str:
    """Serialize a server frame compactly.

    Top-level ``None`` values are dropped so optional members (``reply_to``,
    ``edited_at``, ...) vanish instead of appearing as ``null``; nested values
    are left alone.  ``allow_nan=False`` because NaN is not JSON.  One shared
    encoder: ``json.dumps`` with options builds a new one per call.
    """
    return _ENCODER.encode({key: value for key, value in frame.items() if value is not None})


def encode_bytes(frame: Mapping[str, Any]) -> bytes:
    """``encode`` as UTF-8 bytes, ready for ``ws_text_frame``."""
    return encode(frame).encode("utf-8")


# --------------------------------------------------------------------------
# 2. Client frames
# --------------------------------------------------------------------------
# ``request_id`` is keyword-only so positional fields read like the wire frame.


@dataclass(frozen=True, slots=True)
class Join:
    TYPE: ClassVar[str] = "join"
    room_id: int
    since_seq: int | None = None  # None: no backfill wanted
    epoch: str | None = None  # the epoch since_seq belongs to (from `joined`); None: not known
    request_id: RequestId = field(default=None, kw_only=True)


@dataclass(frozen=True, slots=True)
class Leave:
    TYPE: ClassVar[str] = "leave"
    room_id: int
    request_id: RequestId = field(default=None, kw_only=True)


@dataclass(frozen=True, slots=True)
class Send:
    TYPE: ClassVar[str] = "send"
    room_id: int
    content: str
    client_msg_id: str  # idempotency key: a retried send yields ack(duplicate=True)
    request_id: RequestId = field(default=None, kw_only=True)


@dataclass(frozen=True, slots=True)
class Typing:
    TYPE: ClassVar[str] = "typing"
    room_id: int
    is_typing: bool
    request_id: RequestId = field(default=None, kw_only=True)


@dataclass(frozen=True, slots=True)
class Read:
    TYPE: ClassVar[str] = "read"
    room_id: int
    seq: int
    request_id: RequestId = field(default=None, kw_only=True)


@dataclass(frozen=True, slots=True)
class Edit:
    TYPE: ClassVar[str] = "edit"
    message_id: int
    content: str
    request_id: RequestId = field(default=None, kw_only=True)


@dataclass(frozen=True, slots=True)
class Delete:
    TYPE: ClassVar[str] = "delete"
    message_id: int
    request_id: RequestId = field(default=None, kw_only=True)


@dataclass(frozen=True, slots=True)
class Ping:
    TYPE: ClassVar[str] = "ping"
    request_id: RequestId = field(default=None, kw_only=True)


@dataclass(frozen=True, slots=True)
class Auth:
    """In-band token refresh, so a long-lived socket survives token rotation."""

    TYPE: ClassVar[str] = "auth"
    token: str
    request_id: RequestId = field(default=None, kw_only=True)


@dataclass(frozen=True, slots=True)
class Cancel:
    """Cancel the assistant generation producing ``message_id``."""

    TYPE: ClassVar[str] = "cancel"
    message_id: int
    request_id: RequestId = field(default=None, kw_only=True)


@dataclass(frozen=True, slots=True)
class Regenerate:
    """Ask the assistant to answer the user message ``message_id`` again."""

    TYPE: ClassVar[str] = "regenerate"
    message_id: int
    request_id: RequestId = field(default=None, kw_only=True)


ClientFrame: TypeAlias = Join | Leave | Send | Typing | Read | Edit | Delete | Ping | Auth | Cancel | Regenerate


class FrameError(Exception):
    """A rejected client frame that does not end the connection.

    ``error`` is the client-visible ``BadRequest`` / ``TooLarge``; ``request_id``
    is the frame's ``id`` (None if absent, invalid, or the frame was unparsable)
    to echo as ``reply_to``.
    """

    def __init__(self, error: ChatdError, request_id: RequestId = None) -> None:
        super().__init__(error.message)
        self.error = error
        self.request_id = request_id


_MISSING: Final = object()


def _get(obj: Mapping[str, Any], frame_type: str, name: str) -> Any:
    value = obj.get(name, _MISSING)
    if value is _MISSING:
        raise BadRequest(f"{frame_type}.{name} is required")
    return value


def _int(obj: Mapping[str, Any], frame_type: str, name: str, minimum: int) -> int:
    return _check_int(_get(obj, frame_type, name), frame_type, name, minimum)


def _check_int(value: Any, frame_type: str, name: str, minimum: int) -> int:
    # bool is an int subclass: ``true`` must not become room 1.
    if type(value) is not int or value < minimum:
        adjective = "positive" if minimum >= 1 else "non-negative"
        raise BadRequest(f"{frame_type}.{name} must be a {adjective} integer")
    if value > MAX_SAFE_INT:
        raise BadRequest(f"{frame_type}.{name} must be at most {MAX_SAFE_INT}")
    return value


def _room_id(obj: Mapping[str, Any], frame_type: str) -> int:
    return _int(obj, frame_type, "room_id", 1)


def _message_id(obj: Mapping[str, Any], frame_type: str) -> int:
    return _int(obj, frame_type, "message_id", 1)


def _content(obj: Mapping[str, Any], frame_type: str, max_message_chars: int) -> str:
    value = _get(obj, frame_type, "content")
    if not isinstance(value, str):
        raise BadRequest(f"{frame_type}.content must be a string")
    # Length first: it is the cheapest check and the most useful answer.
    if len(value) > max_message_chars:
        raise TooLarge(f"{frame_type}.content exceeds {max_message_chars} characters")
    if "\x00" in value:  # Postgres text cannot store NUL
        raise BadRequest(f"{frame_type}.content must not contain NUL characters")
    if not value.strip():
        raise BadRequest(f"{frame_type}.content must not be empty")
    return value  # kept verbatim: leading spaces matter in code blocks


def _is_printable_ascii_id(value: str) -> bool:
    return 1 <= len(value) <= MAX_ID_CHARS and all("!" <= ch <= "~" for ch in value)


def _client_msg_id(obj: Mapping[str, Any], frame_type: str) -> str:
    value = _get(obj, frame_type, "client_msg_id")
    if not isinstance(value, str) or not _is_printable_ascii_id(value):
        raise BadRequest(
            f"{frame_type}.client_msg_id must be 1..{MAX_ID_CHARS} printable ASCII characters without spaces"
        )
    return value


def _request_id(obj: Mapping[str, Any]) -> RequestId:
    value = obj.get("id")
    if value is None:
        return None
    if isinstance(value, str) and 1 <= len(value) <= MAX_ID_CHARS:
        return value
    if type(value) is int and -MAX_SAFE_INT <= value <= MAX_SAFE_INT:
        return value
    raise BadRequest(f"id must be a string of 1..{MAX_ID_CHARS} characters or an integer")


_Parser: TypeAlias = Callable[[Mapping[str, Any], RequestId, int], ClientFrame]


def _parse_join(obj: Mapping[str, Any], rid: RequestId, _max_chars: int) -> ClientFrame:
    since = obj.get("since_seq")
    since_seq = None if since is None else _check_int(since, "join", "since_seq", 0)
    epoch = obj.get("epoch")
    if epoch is not None and (not isinstance(epoch, str) or not 0 < len(epoch) <= MAX_EPOCH_CHARS):
        raise BadRequest(f"join.epoch must be a string of 1..{MAX_EPOCH_CHARS} characters")
    return Join(_room_id(obj, "join"), since_seq, epoch, request_id=rid)


def _parse_leave(obj: Mapping[str, Any], rid: RequestId, _max_chars: int) -> ClientFrame:
    return Leave(_room_id(obj, "leave"), request_id=rid)


def _parse_send(obj: Mapping[str, Any], rid: RequestId, max_chars: int) -> ClientFrame:
    return Send(
        _room_id(obj, "send"),
        _content(obj, "send", max_chars),
        _client_msg_id(obj, "send"),
        request_id=rid,
    )


def _parse_typing(obj: Mapping[str, Any], rid: RequestId, _max_chars: int) -> ClientFrame:
    room_id = _room_id(obj, "typing")
    is_typing = _get(obj, "typing", "is_typing")
    if not isinstance(is_typing, bool):
        raise BadRequest("typing.is_typing must be a boolean")
    return Typing(room_id, is_typing, request_id=rid)


def _parse_read(obj: Mapping[str, Any], rid: RequestId, _max_chars: int) -> ClientFrame:
    return Read(_room_id(obj, "read"), _int(obj, "read", "seq", 0), request_id=rid)


def _parse_edit(obj: Mapping[str, Any], rid: RequestId, max_chars: int) -> ClientFrame:
    return Edit(_message_id(obj, "edit"), _content(obj, "edit", max_chars), request_id=rid)


def _parse_delete(obj: Mapping[str, Any], rid: RequestId, _max_chars: int) -> ClientFrame:
    return Delete(_message_id(obj, "delete"), request_id=rid)


def _parse_ping(obj: Mapping[str, Any], rid: RequestId, _max_chars: int) -> ClientFrame:
    return Ping(request_id=rid)


def _parse_auth(obj: Mapping[str, Any], rid: RequestId, _max_chars: int) -> ClientFrame:
    token = _get(obj, "auth", "token")
    if not isinstance(token, str) or not 1 <= len(token) <= MAX_TOKEN_CHARS:
        raise BadRequest(f"auth.token must be a string of 1..{MAX_TOKEN_CHARS} characters")
    return Auth(token, request_id=rid)


def _parse_cancel(obj: Mapping[str, Any], rid: RequestId, _max_chars: int) -> ClientFrame:
    return Cancel(_message_id(obj, "cancel"), request_id=rid)


def _parse_regenerate(obj: Mapping[str, Any], rid: RequestId, _max_chars: int) -> ClientFrame:
    return Regenerate(_message_id(obj, "regenerate"), request_id=rid)


_PARSERS: Final[Mapping[str, _Parser]] = {
    "join": _parse_join,
    "leave": _parse_leave,
    "send": _parse_send,
    "typing": _parse_typing,
    "read": _parse_read,
    "edit": _parse_edit,
    "delete": _parse_delete,
    "ping": _parse_ping,
    "auth": _parse_auth,
    "cancel": _parse_cancel,
    "regenerate": _parse_regenerate,
}
CLIENT_FRAME_TYPES: Final = frozenset(_PARSERS)


def parse_client_frame(obj: Mapping[str, Any], *, max_message_chars: int = 4000) -> ClientFrame:
    """Validate an already-decoded JSON object into a ``ClientFrame``.

    Unknown members are ignored (forward compatibility).  Raises ``FrameError``
    wrapping ``BadRequest`` (message names the field) or ``TooLarge``; the
    request id is read first so it survives any later failure.
    """
    try:
        request_id = _request_id(obj)
    except BadRequest as exc:
        raise FrameError(exc, None) from None
    try:
        frame_type = obj.get("type", _MISSING)
        if frame_type is _MISSING:
            raise BadRequest("frame.type is required")
        if not isinstance(frame_type, str):
            raise BadRequest("frame.type must be a string")
        parser = _PARSERS.get(frame_type)
        if parser is None:
            # Truncated: the reply must not echo a 60 KB attacker string.
            raise BadRequest(f"unknown frame type {frame_type[:32]!r}")
        return parser(obj, request_id, max_message_chars)
    except (BadRequest, TooLarge) as exc:
        raise FrameError(exc, request_id) from None


# --------------------------------------------------------------------------
# 3. Decoder state machine
# --------------------------------------------------------------------------

_SURROGATE_RE: Final = re.compile("[\ud800-\udfff]")
# Gate for the post-parse walk: only text with a \uD8xx..\uDFxx escape can
# decode to a lone surrogate (json.loads joins valid pairs itself).
_SURROGATE_ESCAPE_RE: Final = re.compile(r"\\u[dD][89abcdefABCDEF]")


def _reject_constant(name: str) -> NoReturn:
    raise ValueError(f"{name} is not allowed")


def _parse_finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e999 would otherwise become inf
        raise ValueError(f"number {text[:32]} is out of range")
    return value


def _contains_surrogate(value: object) -> bool:
    # Iterative: nesting depth is attacker-controlled.
    stack: list[object] = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if _SURROGATE_RE.search(item):
                return True
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False


# Shared: json.loads with hooks builds a decoder per call.
_DECODER: Final = json.JSONDecoder(parse_constant=_reject_constant, parse_float=_parse_finite_float)


class FrameDecoder:
    """Per-connection decoder: text frame in, ``ClientFrame`` out.

    Raises ``ProtocolViolation`` (close the socket) or ``FrameError`` (reply
    with an error frame); see the module docstring.

    Strikes: unparsable frames (invalid JSON / UTF-8, non-object) are usually
    a broken or hostile client, so each counts a strike and the
    ``max_invalid_strikes``-th closes with 1007.  Valid frames do NOT reset
    the count: strikes are per connection lifetime, otherwise a client could
    interleave pings to send garbage forever.  Frames that parse but fail
    field validation are ordinary client bugs and cost no strike.

    After a ``ProtocolViolation`` the decoder is closed: every later call
    raises the same violation again.
    """

    def __init__(
        self,
        max_frame_bytes: int = 65536,
        max_message_chars: int = 4000,
        max_invalid_strikes: int = 3,
    ) -> None:
        if max_frame_bytes < 1 or max_message_chars < 1 or max_invalid_strikes < 1:
            raise ValueError("decoder limits must be positive")
        self.max_frame_bytes = max_frame_bytes
        self.max_message_chars = max_message_chars
        self.max_invalid_strikes = max_invalid_strikes
        self._strikes = 0
        self._fatal: ProtocolViolation | None = None

    @property
    def invalid_strikes(self) -> int:
        """Unparsable frames seen so far on this connection."""
        return self._strikes

    @property
    def closed(self) -> bool:
        """True once a ``ProtocolViolation`` was raised."""
        return self._fatal is not None

    def decode(self, data: str | bytes) -> ClientFrame:
        """Decode one WebSocket message (``str`` = text frame, ``bytes`` = binary)."""
        if self._fatal is not None:
            raise ProtocolViolation(self._fatal.message, self._fatal.close_code)
        if isinstance(data, bytes):
            self._fail("binary frames are not supported", CloseCode.UNSUPPORTED_DATA)
        # Each char is >= 1 UTF-8 byte, so long text is oversize without encoding.
        # surrogatepass: only measure here; lone surrogates are judged below.
        if len(data) > self.max_frame_bytes or len(data.encode("utf-8", "surrogatepass")) > self.max_frame_bytes:
            self._fail(f"frame exceeds {self.max_frame_bytes} bytes", CloseCode.MESSAGE_TOO_BIG)
        obj = self._load(data)
        return parse_client_frame(obj, max_message_chars=self.max_message_chars)

    def _load(self, text: str) -> dict[str, Any]:
        if _SURROGATE_RE.search(text):
            self._strike("invalid UTF-8 in frame")
        try:
            obj = _DECODER.decode(text)
        except RecursionError:
            self._strike("nesting too deep")
        except ValueError as exc:  # JSONDecodeError, NaN, huge ints
            self._strike(str(exc))
        if not isinstance(obj, dict):
            self._strike(f"expected an object, got {type(obj).__name__}")
        if _SURROGATE_ESCAPE_RE.search(text) and _contains_surrogate(obj):
            self._strike("lone surrogate in string")
        return obj

    def _strike(self, reason: str) -> NoReturn:
        self._strikes += 1
        if self._strikes >= self.max_invalid_strikes:
            self._fail(f"too many invalid frames (last: {reason})", CloseCode.INVALID_PAYLOAD)
        raise FrameError(BadRequest(f"invalid JSON: {reason}"), None)

    def _fail(self, reason: str, close_code: CloseCode) -> NoReturn:
        self._fatal = ProtocolViolation(reason, close_code)
        raise ProtocolViolation(reason, close_code)


# --------------------------------------------------------------------------
# 4. Server frame builders
# --------------------------------------------------------------------------
# Keyword-only so call sites cannot swap two ints (room_id / seq) silently.
# None values are dropped by ``encode``.


def hello(*, user_id: int, connection_id: str, server_time_ms: int, heartbeat_ms: int) -> dict[str, Any]:
    return {
        "type": "hello",
        "user_id": user_id,
        "connection_id": connection_id,
        "server_time": server_time_ms,
        "heartbeat_ms": heartbeat_ms,
        "protocol": PROTOCOL_VERSION,
    }


def token_expiring(*, expires_in_ms: int) -> dict[str, Any]:
    return {"type": "token_expiring", "expires_in_ms": expires_in_ms}


def authenticated(*, expires_at_ms: int, reply_to: RequestId) -> dict[str, Any]:
    return {
        "type": "authenticated",
        "expires_at_ms": expires_at_ms,
        "reply_to": reply_to,
    }


def joined(*, room_id: int, last_seq: int, epoch: str, online: list[int], reply_to: RequestId) -> dict[str, Any]:
    return {
        "type": "joined",
        "room_id": room_id,
        "last_seq": last_seq,
        "epoch": epoch,
        "online": list(online),  # copy: the caller's set/list may change later
        "reply_to": reply_to,
    }


def left(*, room_id: int, reply_to: RequestId) -> dict[str, Any]:
    return {"type": "left", "room_id": room_id, "reply_to": reply_to}


def resync_required(*, room_id: int, last_seq: int, epoch: str | None, reply_to: RequestId) -> dict[str, Any]:
    """The socket cannot be brought up to date frame by frame: refetch via REST, then rejoin.

    In reply to a ``join`` whose ``since_seq`` gap is over ``ws.replay_limit``, or at
    any time when the server could not deliver a room's messages in order.
    """
    frame: dict[str, Any] = {"type": "resync_required", "room_id": room_id, "last_seq": last_seq}
    if epoch is not None:
        frame["epoch"] = epoch
    frame["reply_to"] = reply_to
    return frame


def ack(
    *,
    room_id: int,
    client_msg_id: str,
    message_id: int,
    seq: int,
    created_at: str,
    reply_to: RequestId,
    duplicate: bool = False,
) -> dict[str, Any]:
    return {
        "type": "ack",
        "room_id": room_id,
        "client_msg_id": client_msg_id,
        "message_id": message_id,
        "seq": seq,
        "created_at": created_at,
        "reply_to": reply_to,
        "duplicate": duplicate,
    }


def message(
    *,
    room_id: int,
    message_id: int,
    seq: int,
    sender_id: int | None,
    role: Role,
    kind: Kind,
    content: str,
    client_msg_id: str | None,
    created_at: str,
    edited_at: str | None = None,
    deleted: bool = False,
) -> dict[str, Any]:
    return {
        "type": "message",
        "room_id": room_id,
        "message_id": message_id,
        "seq": seq,
        "sender_id": sender_id,
        "role": role,
        "kind": kind,
        "content": content,
        "client_msg_id": client_msg_id,
        "created_at": created_at,
        "edited_at": edited_at,
        "deleted": deleted,
    }


def message_updated(*, room_id: int, message_id: int, seq: int, content: str, edited_at: str) -> dict[str, Any]:
    return {
        "type": "message_updated",
        "room_id": room_id,
        "message_id": message_id,
        "seq": seq,
        "content": content,
        "edited_at": edited_at,
    }


def message_deleted(*, room_id: int, message_id: int, seq: int) -> dict[str, Any]:
    return {
        "type": "message_deleted",
        "room_id": room_id,
        "message_id": message_id,
        "seq": seq,
    }


def typing(*, room_id: int, user_id: int, is_typing: bool) -> dict[str, Any]:
    return {
        "type": "typing",
        "room_id": room_id,
        "user_id": user_id,
        "is_typing": is_typing,
    }


def read(*, room_id: int, user_id: int, seq: int) -> dict[str, Any]:
    return {"type": "read", "room_id": room_id, "user_id": user_id, "seq": seq}


def presence(*, room_id: int, online: Sequence[int], offline: Sequence[int]) -> dict[str, Any]:
    """Members who came online / went offline in a room since the last one (batched per tick)."""
    return {
        "type": "presence",
        "room_id": room_id,
        "online": list(online),
        "offline": list(offline),
    }


def room_object(row: Mapping[str, Any]) -> dict[str, Any]:
    """A stored room (``storage.rooms.ROOM_COLUMNS``, + the caller's ``read_seq``) as the REST room object."""
    out = {
        "id": row["id"],
        "name": row["name"],
        "kind": row["kind"],
        "owner_id": row["owner_id"],
        "status": row["status"],
        "assistant": row["assistant"],
        "last_seq": row["last_seq"],
        "created_at": iso(row["created_at"]),
        "updated_at": iso(row["updated_at"]),
    }
    if "read_seq" in row:
        out["read_seq"] = row["read_seq"]
        out["unread_count"] = max(0, row["last_seq"] - row["read_seq"])
    if "last_message" in row:
        out["last_message"] = row["last_message"]
    return out


def room_added(*, room: Mapping[str, Any]) -> dict[str, Any]:
    """You were added to a room (or created it): ``room`` is the REST room object, so the client can join it."""
    return {"type": "room_added", "room": dict(room)}


def room_removed(*, room_id: int, reason: str) -> dict[str, Any]:
    """You are no longer a member (``removed``, ``left``): drop the room."""
    return {"type": "room_removed", "room_id": room_id, "reason": reason}


def room_updated(*, room: Mapping[str, Any]) -> dict[str, Any]:
    """A room of yours was renamed, reconfigured or archived: ``room`` is the REST room object."""
    return {"type": "room_updated", "room": dict(room)}


def announcement(*, content: str, created_at: str, by: int) -> dict[str, Any]:
    """A server broadcast to every connected user (admin API); not stored, not in any room."""
    return {"type": "announcement", "content": content, "created_at": created_at, "by": by}


def pong(*, server_time_ms: int, reply_to: RequestId) -> dict[str, Any]:
    return {"type": "pong", "server_time": server_time_ms, "reply_to": reply_to}


def error(err: ChatdError, *, reply_to: RequestId) -> dict[str, Any]:
    """Socket twin of the REST error body (``details`` only when present)."""
    return {
        "type": "error",
        "code": err.code,
        "message": err.message,
        "reply_to": reply_to,
        "retry_after_ms": err.retry_after_ms,
        "details": err.details or None,
    }


def queued(*, room_id: int, reply_to_message_id: int, position: int) -> dict[str, Any]:
    return {
        "type": "queued",
        "room_id": room_id,
        "reply_to_message_id": reply_to_message_id,
        "position": position,
    }


def cancelled(*, room_id: int, reply_to_message_id: int) -> dict[str, Any]:
    """A queued answer to this prompt was cancelled before it started: no ``stream_start`` comes."""
    return {"type": "cancelled", "room_id": room_id, "reply_to_message_id": reply_to_message_id}


def stream_start(
    *, room_id: int, message_id: int, reply_to_message_id: int, model: str, supersedes: int | None = None
) -> dict[str, Any]:
    """``supersedes``: a takeover's new attempt replaces that stream (ended with ``error``), which members
    may have seen in part; ``resumed: true`` then says the answer starts over."""
    frame: dict[str, Any] = {
        "type": "stream_start",
        "room_id": room_id,
        "message_id": message_id,
        "reply_to_message_id": reply_to_message_id,
        "model": model,
    }
    if supersedes is not None:
        frame["resumed"] = True
        frame["supersedes"] = supersedes
    return frame


def stream_chunk(*, room_id: int, message_id: int, index: int, content: str) -> dict[str, Any]:
    return {
        "type": "stream_chunk",
        "room_id": room_id,
        "message_id": message_id,
        "index": index,  # lets the client detect gaps / reorder
        "content": content,
    }


def stream_end(
    *,
    room_id: int,
    message_id: int,
    seq: int,
    stop_reason: StopReason,
    input_tokens: int,
    output_tokens: int,
    first_token_ms: int | None,
    latency_ms: int,
) -> dict[str, Any]:
    """``first_token_ms`` is None when no token arrived (cancelled / error)."""
    return {
        "type": "stream_end",
        "room_id": room_id,
        "message_id": message_id,
        "seq": seq,
        "stop_reason": stop_reason,
        "usage": {"input_tokens": input_tokens, "output_tokens": output_tokens},
        "first_token_ms": first_token_ms,
        "latency_ms": latency_ms,
    }


# Stored rows as frames (live, replay, repair and REST share them).


def iso(value: dt.datetime | None) -> str | None:
    """Timestamps on the wire: RFC 3339 UTC with milliseconds."""
    if value is None:
        return None
    return value.astimezone(dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def message_from_row(row: Mapping[str, Any]) -> dict[str, Any]:
    """A stored message (``storage.messages.MESSAGE_COLUMNS``) as the ``message`` frame."""
    frame = message(
        room_id=row["room_id"],
        message_id=row["id"],
        seq=row["seq"],
        sender_id=row["sender_id"],
        role=row["role"],
        kind=row["kind"],
        content=row["content"],
        client_msg_id=row["client_msg_id"],
        created_at=iso(row["created_at"]) or "",
        edited_at=iso(row["edited_at"]),
        deleted=row["deleted_at"] is not None,
    )
    # Assistant answers: which prompt they answer, and whether the text is partial or replaced.
    if row.get("reply_to_id") is not None:
        frame["reply_to_message_id"] = row["reply_to_id"]
    if row.get("status", "final") != "final":
        frame["status"] = row["status"]  # "cancelled" or "error": a partial answer, kept
    if row.get("superseded_at") is not None:
        frame["superseded"] = True
    if row.get("data") is not None:
        frame["data"] = row["data"]  # kind file: the attachment; kind system: the event
    return frame


def change_from_row(row: Mapping[str, Any]) -> dict[str, Any]:
    """The last change of a stored message: ``message_deleted`` or ``message_updated``."""
    if row["deleted_at"] is not None:
        return message_deleted(room_id=row["room_id"], message_id=row["id"], seq=row["seq"])
    return message_updated(
        room_id=row["room_id"],
        message_id=row["id"],
        seq=row["seq"],
        content=row["content"],
        edited_at=iso(row["edited_at"]) or "",
    )


_STOP_BY_STATUS: Final[dict[str, StopReason]] = {"cancelled": "cancelled", "error": "error"}


def stream_end_from_row(row: Mapping[str, Any]) -> dict[str, Any]:
    """The ``stream_end`` of a stored answer, rebuilt from its generation (columns ``g_*``)."""
    return stream_end(
        room_id=row["room_id"],
        message_id=row["id"],
        seq=row["seq"],
        stop_reason=row.get("g_stop_reason") or _STOP_BY_STATUS.get(row["status"], "end_turn"),
        input_tokens=row.get("g_input_tokens") or 0,
        output_tokens=row.get("g_output_tokens") or 0,
        first_token_ms=row.get("g_first_token_ms"),
        latency_ms=row.get("g_latency_ms") or 0,
    )


# --------------------------------------------------------------------------
# 5. Pre-framed WebSocket text frames for fan-out
# --------------------------------------------------------------------------

_MAX_WS_PAYLOAD_BYTES: Final = 2**63 - 1  # RFC 6455: the 64-bit length's MSB must be 0


def ws_text_frame(payload: bytes) -> bytes:
    """One complete, unmasked, FIN=1 text frame (RFC 6455 section 5.2).

    Lets fan-out serialize and frame an event once and write the same bytes
    to every socket.  Server frames are never masked (section 5.1).  With
    permessage-deflate negotiated this is still valid: RSV1=0 marks the
    message as uncompressed (RFC 7692 section 6).  ``payload`` must be UTF-8
    (use ``encode_bytes``); it is not re-validated here.
    """
    length = len(payload)
    if length < 126:
        header = struct.pack("!BB", 0x81, length)
    elif length <= 0xFFFF:
        header = struct.pack("!BBH", 0x81, 126, length)
    elif length <= _MAX_WS_PAYLOAD_BYTES:
        header = struct.pack("!BBQ", 0x81, 127, length)
    else:  # pragma: no cover - not representable in memory
        raise ValueError("payload too large for a WebSocket frame")
    return header + payload


def ws_frame_payloads(data: bytes) -> list[bytes]:
    """The payloads of ``ws_text_frame`` output (one or several frames back to back)."""
    out = []
    while data:
        length = data[1] & 0x7F
        offset = 2
        if length == 126:
            length, offset = struct.unpack("!H", data[2:4])[0], 4
        elif length == 127:
            length, offset = struct.unpack("!Q", data[2:10])[0], 10
        out.append(data[offset : offset + length])
        data = data[offset + length :]
    return out
