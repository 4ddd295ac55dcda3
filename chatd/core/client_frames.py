"""Client frames, sans-I/O: text in, one frozen msgspec model per ``type`` out.

Pure (no asyncio, sockets, Tornado or clock reads), in the style of
python-websockets' sans-I/O core; the server frames are ``server_frames``.

1. ID rules and the client frame models; ``parse_client_frame``.
2. ``FrameDecoder``: the per-connection state machine (size cap, strikes).

Models
------
Each frame is declared once as a msgspec ``Struct`` (a tagged union on
``type``): its constraints validate the frame and generate its JSON Schema
(``json_schema``, docs/client-frames.schema.json), as ``chatd/api/bodies.py``
does for the REST bodies.  Two paths use them:

* fast: msgspec decodes the text straight into a frame.  The models
  refuse members they do not declare, so this path only accepts frames whose
  every member it validated itself (a scalar of the declared type).
* on any complaint from it: the frame is parsed with ``json`` (the strike
  rules: NaN, numbers out of range, lone surrogates, nesting) and validated by
  ``parse_client_frame``: unknown members are dropped (the protocol ignores
  them) and the rest converted to the type's model.  If that fails, the
  error is found as before: the request id first (so that it can be echoed),
  the type, then each member alone in a fixed order, what msgspec says worded
  as before (``_wrong``), e.g. ``send.room_id must be a positive integer``.

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

import dataclasses
import json
import math
import re
import typing
from collections.abc import Mapping
from typing import Annotated, Any, ClassVar, Final, NoReturn, TypeAlias

import msgspec
from msgspec import Meta

from chatd.core.errors import BadRequest, ChatdError, CloseCode, ProtocolViolation, TooLarge

# IDs are Postgres bigints but are sent as JSON numbers; browsers parse those
# as doubles, so anything above 2**53-1 would silently lose precision.
MAX_SAFE_INT: Final = 2**53 - 1
MAX_ID_CHARS: Final = 64  # request ``id`` and ``client_msg_id``
MAX_EPOCH_CHARS: Final = 64  # a room epoch echoed back in `join`
MAX_TOKEN_CHARS: Final = 8192
DEFAULT_MAX_MESSAGE_CHARS: Final = 4000  # ws.max_message_chars' default: the schema's bound for a content

RequestId: TypeAlias = str | int | None

# Patterns are written so that Python's ``re.search`` (msgspec) and ECMA-262 (the schema's readers) accept the
# same strings: whitespace spelled out (``\s`` differs) and ``END`` instead of ``$`` (Python's ``$`` also matches
# before a final newline).  chatd/api/bodies.py uses them too.
# Python's whitespace (str.strip, re's \s), spelled out: a pattern's \s is ECMA-262's, which differs (U+0085).
WS: Final = r"\t-\r\x1c-\x20\x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"
END: Final = r"(?![\s\S])"  # the end of the string in both dialects ($ in Python also matches before a final \n)
# Not blank, no NUL (Postgres text cannot store it).  Linear time (a content has no length bound in the model:
# ws.max_message_chars is checked after): the leading whitespace and the first other character are disjoint
# classes, so nothing backtracks more than one step.
CONTENT_PATTERN: Final = rf"^[{WS}]*[^{WS}\x00][^\x00]*{END}"
CLIENT_MSG_ID_PATTERN: Final = rf"^[!-~]{{1,{MAX_ID_CHARS}}}{END}"

# A reaction: one emoji or a :shortcode:.  Not a full UTS #51 parser (that needs the Unicode emoji data), but its
# shape over the emoji blocks: a pictograph, then a presentation selector or skin tone and tag characters
# (subdivision flags), joined by ZWJ into one sequence; a flag (two regional indicators); a keycap.  So one emoji,
# never text, never two side by side.  The characters are literal (no escapes), so that Python's re and ECMA-262
# (with the u flag, as JSON Schema 2020-12 reads patterns) read the same classes.
_PICTO: Final = (
    "\u00a9\u00ae\u203c\u2049\u2122\u2139\u2194-\u2199\u21a9\u21aa\u231a-\u23ff\u24c2\u25aa-\u27bf"
    "\u2934\u2935\u2b05-\u2b55\u3030\u303d\u3297\u3299\U0001f000-\U0001f1e5\U0001f200-\U0001f3fa"
    "\U0001f400-\U0001faff"
)
_ELEMENT: Final = f"[{_PICTO}](?:\ufe0f|[\U0001f3fb-\U0001f3ff])?(?:[\U000e0020-\U000e007e]+\U000e007f)?"
EMOJI_PATTERN: Final = (
    f"^(?:{_ELEMENT}(?:\u200d{_ELEMENT})*"  # a pictograph sequence (👍, 👍🏽, 👨‍👩‍👧, 🏴 England)
    "|[\U0001f1e6-\U0001f1ff]{2}"  # a flag
    "|[0-9#*]\ufe0f?\u20e3"  # a keycap
    f"|:[a-z0-9_+-]{{1,32}}:){END}"  # a shortcode, for custom emoji a client maps
)
MAX_EMOJI_CHARS: Final = 34  # code points: a 32-character :shortcode:, and bounds the regex's work


# -- Member types: the constraints, and what a refused value is told (after ``<type>.<member> ``)


def _says(says: str, **constraints: Any) -> Meta:
    return Meta(**constraints, extra={"says": says})


PositiveId = Annotated[int, _says("must be a positive integer", ge=1, le=MAX_SAFE_INT)]
Seq = Annotated[int, _says("must be a non-negative integer", ge=0, le=MAX_SAFE_INT)]
Content = Annotated[  # kept verbatim: leading spaces matter in code blocks
    str,
    _says(
        "must be a string",  # a string breaking the pattern: see _wrong
        pattern=CONTENT_PATTERN,
        description="at most ws.max_message_chars characters (default 4000; longer: too_large), not blank, no NUL",
        extra_json_schema={"maxLength": DEFAULT_MAX_MESSAGE_CHARS},
    ),
]
ClientMsgId = Annotated[
    str, _says(f"must be 1..{MAX_ID_CHARS} printable ASCII characters without spaces", pattern=CLIENT_MSG_ID_PATTERN)
]
Epoch = Annotated[
    str, _says(f"must be a string of 1..{MAX_EPOCH_CHARS} characters", min_length=1, max_length=MAX_EPOCH_CHARS)
]
Token = Annotated[
    str, _says(f"must be a string of 1..{MAX_TOKEN_CHARS} characters", min_length=1, max_length=MAX_TOKEN_CHARS)
]
Flag = Annotated[bool, _says("must be a boolean")]
Emoji = Annotated[
    str,
    _says(
        "must be one emoji or a :shortcode: (a-z, 0-9, _ + -, at most 32)",
        pattern=EMOJI_PATTERN,
        max_length=MAX_EMOJI_CHARS,
        description="one emoji (a pictograph with its modifiers, a ZWJ sequence, a flag, a keycap) or a :shortcode:",
    ),
]
# A bool is not an int here (msgspec is strict): ``true`` must not become room 1.
WireRequestId = (
    Annotated[str, Meta(min_length=1, max_length=MAX_ID_CHARS)]
    | Annotated[int, Meta(ge=-MAX_SAFE_INT, le=MAX_SAFE_INT)]
    | None
)
_REQUEST_ID_SAYS: Final = f"id must be a string of 1..{MAX_ID_CHARS} characters or an integer"


# -- Client frames
# ``request_id`` (``id`` on the wire) is keyword-only so positional fields read like the wire frame.


class BaseFrame(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True, tag_field="type", gc=False):
    """A client frame: its ``type`` (``TYPE``) is the tag.

    Members it does not declare are refused by the model, which only sends such a frame down the slow path;
    ``parse_client_frame`` ignores them (forward compatibility) and the published schema allows them.
    """

    TYPE: ClassVar[str]  # the tag, set below
    # gc=False: a frame holds only str, int, bool and None, so it can be in no reference cycle.
    request_id: WireRequestId = msgspec.field(default=None, name="id")


class Join(BaseFrame, tag="join", frozen=True):
    room_id: PositiveId
    since_seq: Seq | None = None  # None: no backfill wanted
    epoch: Epoch | None = None  # the epoch since_seq belongs to (from `joined`); None: not known
    since_rev: Seq | None = None  # the edit_rev of the last `joined`: changes after it are sent again


class Leave(BaseFrame, tag="leave", frozen=True):
    room_id: PositiveId


class Send(BaseFrame, tag="send", frozen=True):
    room_id: PositiveId
    content: Content
    client_msg_id: ClientMsgId  # idempotency key: a retried send yields ack(duplicate=True)


class Typing(BaseFrame, tag="typing", frozen=True):
    room_id: PositiveId
    is_typing: Flag


class Read(BaseFrame, tag="read", frozen=True):
    room_id: PositiveId
    seq: Seq
    private: Flag = False  # share the marker with your own devices only (no receipt to other members)


class Edit(BaseFrame, tag="edit", frozen=True):
    message_id: PositiveId
    content: Content


class Delete(BaseFrame, tag="delete", frozen=True):
    message_id: PositiveId


class React(BaseFrame, tag="react", frozen=True):
    """Add (``add`` true) or remove one reaction of the caller on ``message_id``."""

    message_id: PositiveId
    emoji: Emoji
    add: Flag = True


class Ping(BaseFrame, tag="ping", frozen=True):
    pass


class Auth(BaseFrame, tag="auth", frozen=True):
    """In-band token refresh, so a long-lived socket survives token rotation."""

    token: Token


class Cancel(BaseFrame, tag="cancel", frozen=True):
    """Cancel the assistant generation producing ``message_id``."""

    message_id: PositiveId


class Regenerate(BaseFrame, tag="regenerate", frozen=True):
    """Ask the assistant to answer the user message ``message_id`` again."""

    message_id: PositiveId


ClientFrame: TypeAlias = Join | Leave | Send | Typing | Read | Edit | Delete | React | Ping | Auth | Cancel | Regenerate
FRAME_MODELS: Final[tuple[type[ClientFrame], ...]] = typing.get_args(ClientFrame)


for _model in FRAME_MODELS:
    _model.TYPE = str(_model.__struct_config__.tag)

CLIENT_FRAME_TYPES: Final = frozenset(model.TYPE for model in FRAME_MODELS)
_MODEL_OF_TYPE: Final[Mapping[str, type[ClientFrame]]] = {model.TYPE: model for model in FRAME_MODELS}


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


def json_schema() -> dict[str, Any]:
    """The client frames' JSON Schema (2020-12), generated from the models.

    Unknown members are allowed (the protocol ignores them; the models refuse them only to leave such frames to
    the slow path), and a content's ``maxLength`` is ws.max_message_chars' default.  JSON Schema's ``integer``
    also matches ``1.0``, which a frame may not use.
    """
    schema = msgspec.json.schema(ClientFrame)
    for model in schema["$defs"].values():
        model.pop("additionalProperties", None)
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "chatd client frame",
        "description": (
            "A WebSocket text frame from a client (docs/PROTOCOL.md): one of these, chosen by `type`. Members not"
            " listed are ignored. Integers are written as integers: `1`, not `1.0` (which `integer` also matches)."
        ),
        **schema,
    }


def json_schema_text() -> str:
    """``json_schema()`` as docs/client-frames.schema.json holds it (``make docs`` / ``chatd frames-schema``)."""
    return json.dumps(json_schema(), indent=2, ensure_ascii=False) + "\n"


# -- Validation of a decoded object, member by member


@dataclasses.dataclass(frozen=True, slots=True)
class _Member:
    name: str  # the attribute
    wire: str  # its name in the frame
    kind: Any  # its annotation
    required: bool
    says: str  # what a refused value is told
    # A model of this member alone, to check a lone value: msgspec keeps what it learns about a model, but reads a
    # bare annotation again on every convert (0.5-10 µs).
    alone: type[msgspec.Struct]


def _says_of(kind: Any) -> str:
    arms = typing.get_args(kind) if typing.get_origin(kind) is typing.Union else (kind,)
    for arm in arms:
        for meta in getattr(arm, "__metadata__", ()):
            if isinstance(meta, Meta) and meta.extra and "says" in meta.extra:
                return str(meta.extra["says"])
    raise TypeError(f"{kind} says nothing about a value it refuses")


# The order the members are checked in (the first wrong one is reported): declaration order, except that a
# join's optional members come before its room_id, as they always have.
_CHECKED_FIRST: Final[Mapping[type[ClientFrame], tuple[str, ...]]] = {Join: ("since_seq", "epoch", "since_rev")}


def _members(model: type[ClientFrame]) -> tuple[_Member, ...]:
    members = [
        _Member(
            f.name,
            f.encode_name,
            f.type,
            f.required,
            _says_of(f.type),
            msgspec.defstruct(f"{model.__name__}_{f.name}", [(f.encode_name, f.type)]),
        )
        for f in msgspec.structs.fields(model)
        if f.name != "request_id"
    ]
    first = _CHECKED_FIRST.get(model, ())
    return tuple(sorted(members, key=lambda m: 0 if m.name in first else 1))  # stable: otherwise as declared


_MEMBERS: Final[Mapping[type[ClientFrame], tuple[_Member, ...]]] = {model: _members(model) for model in FRAME_MODELS}
_WIRE_NAMES: Final[Mapping[type[ClientFrame], tuple[str, ...]]] = {
    model: model.__struct_encode_fields__
    for model in FRAME_MODELS  # its members' names in a frame, with "id"
}
_MISSING: Final = object()


def _wrong(member: _Member, value: Any, what: str) -> str:
    """msgspec's complaint ``what`` about a member's ``value``, in the words clients have always been given."""
    if what.startswith("Expected `int` <="):  # within the type, above 2**53-1
        return f"must be at most {MAX_SAFE_INT}"
    if member.kind == Content and isinstance(value, str):  # a string breaking the pattern
        return "must not contain NUL characters" if "\x00" in value else "must not be empty"
    return member.says


def _request_id(obj: Mapping[str, Any]) -> RequestId:
    value = obj.get("id")
    if value is None:
        return None
    try:  # the member every frame has: BaseFrame's
        request_id: RequestId = msgspec.convert({"id": value}, BaseFrame).request_id
    except msgspec.ValidationError:
        raise BadRequest(_REQUEST_ID_SAYS) from None
    return request_id


def _model_of(obj: Mapping[str, Any]) -> type[ClientFrame]:
    frame_type = obj.get("type", _MISSING)
    if frame_type is _MISSING:
        raise BadRequest("frame.type is required")
    if not isinstance(frame_type, str):
        raise BadRequest("frame.type must be a string")
    model = _MODEL_OF_TYPE.get(frame_type)
    if model is None:
        # Truncated: the reply must not echo a 60 KB attacker string.
        raise BadRequest(f"unknown frame type {frame_type[:32]!r}")
    return model


def _first_wrong(model: type[ClientFrame], obj: Mapping[str, Any], max_message_chars: int) -> ChatdError:
    """The first member of ``obj`` that ``model`` refuses, as the error a client is given."""
    for member in _MEMBERS[model]:
        value = obj.get(member.wire, _MISSING)
        if value is _MISSING:
            if member.required:
                return BadRequest(f"{model.TYPE}.{member.wire} is required")
            continue
        # Length first: it is the cheapest check and the most useful answer.
        if member.kind == Content and isinstance(value, str) and len(value) > max_message_chars:
            return TooLarge(f"{model.TYPE}.content exceeds {max_message_chars} characters")
        try:
            msgspec.convert({member.wire: value}, member.alone)
        except msgspec.ValidationError as exc:
            return BadRequest(f"{model.TYPE}.{member.wire} {_wrong(member, value, str(exc))}")
    return BadRequest(f"{model.TYPE} is not a valid frame")  # not reached: each member alone is as together


def _refusal(obj: Mapping[str, Any], max_message_chars: int) -> FrameError:
    """Why ``obj`` is not a frame, in today's order: the request id (echoed as ``reply_to`` by every later
    error), the type, then the members one at a time."""
    try:
        request_id = _request_id(obj)
    except BadRequest as exc:
        return FrameError(exc, None)
    try:
        model = _model_of(obj)
    except BadRequest as exc:
        return FrameError(exc, request_id)
    return FrameError(_first_wrong(model, obj, max_message_chars), request_id)


def _within_limit(frame: ClientFrame, max_message_chars: int) -> ClientFrame:
    """``frame``, unless its content is longer than this server takes (a setting: no static schema states it)."""
    if isinstance(frame, (Send, Edit)) and len(frame.content) > max_message_chars:
        raise FrameError(TooLarge(f"{frame.TYPE}.content exceeds {max_message_chars} characters"), frame.request_id)
    return frame


def parse_client_frame(obj: Mapping[str, Any], *, max_message_chars: int = DEFAULT_MAX_MESSAGE_CHARS) -> ClientFrame:
    """Validate an already-decoded JSON object into a ``ClientFrame``.

    Unknown members are ignored (forward compatibility).  Raises ``FrameError``
    wrapping ``BadRequest`` (message names the field) or ``TooLarge``; the
    request id is read first so it survives any later failure.
    """
    frame_type = obj.get("type")
    model = _MODEL_OF_TYPE.get(frame_type) if isinstance(frame_type, str) else None
    if model is not None:
        # Converted to its type's model, not to the union: msgspec reads a union's annotation on every call.
        known = {name: obj[name] for name in _WIRE_NAMES[model] if name in obj}
        try:
            frame: ClientFrame = msgspec.convert(known, model)
        except msgspec.ValidationError:
            pass
        else:
            return _within_limit(frame, max_message_chars)
    raise _refusal(obj, max_message_chars)


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
_JSON_DECODER: Final = json.JSONDecoder(parse_constant=_reject_constant, parse_float=_parse_finite_float)
# The fast path: text straight into a frame.  It accepts only frames whose members are all declared scalars it
# checked itself (strict UTF-8, no lone surrogate, no control character in a string, integers only where the
# model has one), so everything the strike rules below would refuse, it refuses too.
_FRAME_DECODER: Final = msgspec.json.Decoder(ClientFrame)


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
        max_message_chars: int = DEFAULT_MAX_MESSAGE_CHARS,
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
        # Each char is >= 1 UTF-8 byte, so long text is oversize without encoding; ASCII text is 1 byte a char.
        # surrogatepass: only measure here; lone surrogates are judged by _load.
        limit = self.max_frame_bytes
        if len(data) > limit or (not data.isascii() and len(data.encode("utf-8", "surrogatepass")) > limit):
            self._fail(f"frame exceeds {limit} bytes", CloseCode.MESSAGE_TOO_BIG)
        try:
            frame: ClientFrame = _FRAME_DECODER.decode(data)
        except (msgspec.DecodeError, RecursionError, UnicodeEncodeError):
            # ValidationError is a DecodeError; RecursionError: deep nesting skipped while looking for a late
            # "type"; UnicodeEncodeError: a lone surrogate.  Judged, and worded, by the slow path.
            return parse_client_frame(self._load(data), max_message_chars=self.max_message_chars)
        return _within_limit(frame, self.max_message_chars)

    def _load(self, text: str) -> dict[str, Any]:
        if _SURROGATE_RE.search(text):
            self._strike("invalid UTF-8 in frame")
        try:
            obj = _JSON_DECODER.decode(text)
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

