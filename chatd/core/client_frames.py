"""Client frames, sans-I/O: text in, one frozen dataclass per ``type`` out.

Pure (no asyncio, sockets, Tornado or clock reads), in the style of
python-websockets' sans-I/O core; the server frames are ``server_frames``.

1. ID rules and the client frame dataclasses; ``parse_client_frame``.
2. ``FrameDecoder``: the per-connection state machine (size cap, strikes).

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

import json
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Final, NoReturn, TypeAlias

from chatd.core.errors import BadRequest, ChatdError, CloseCode, ProtocolViolation, TooLarge

# IDs are Postgres bigints but are sent as JSON numbers; browsers parse those
# as doubles, so anything above 2**53-1 would silently lose precision.
MAX_SAFE_INT: Final = 2**53 - 1
MAX_ID_CHARS: Final = 64  # request ``id`` and ``client_msg_id``
MAX_EPOCH_CHARS: Final = 64  # a room epoch echoed back in `join`
MAX_TOKEN_CHARS: Final = 8192

RequestId: TypeAlias = str | int | None


# -- Client frames
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


# -- Decoder state machine

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
