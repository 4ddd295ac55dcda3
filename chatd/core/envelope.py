"""What workers publish to each other over Redis pub/sub (pure).

``<origin> <header JSON>[\\n<payload>]*``

* ``origin``: the publishing worker's 12-character id.  A worker drops its
  own publishes by comparing bytes, before parsing anything: it delivered them
  to its local sockets already.
* ``header``: ``{"v": 1, "o": op, ...}``: the format's version, the op
  (below) and what routing needs, so a frame is never re-parsed.  Without
  ``v`` the envelope comes from a chatd before versions, whose format is v1's
  (v1 only added ``v``): it is read as v1, so a rolling upgrade from it loses
  nothing.  Any other version is dropped.  Readers ignore header fields they
  do not know: adding one needs no new version; changing or removing one, or
  the layout, does, and the release writing it must follow one that reads it.
  Any later layout keeps ``<origin> {"v":<n>,`` in front, so that older
  readers see a version they do not read rather than garbage.
* payloads: complete frame JSON, built once by the publisher.  Compact JSON
  never contains a raw newline, so newlines separate payloads.

Ops: ``m`` messages of one room (``"s"``: their seqs, one payload each, in
commit order); ``f`` one seq-less frame (``"x"``: connection to skip, ``"m"``,
``"i"``: answer id and chunk index of a stream frame); ``u`` an edit/delete
(``"r"``: the room's edit revision); ``p`` presence (``"on"``, ``"off"``:
user ids; payload: the frame); and, without payload, ``close``, ``kick`` (user
channels) and the control ops (``cancel``...: their fields are their handler's
to check).

``decode`` returns the op as a typed, checked value (``Body``) or raises ``BadEnvelope``
with a reason from ``REASONS``: the receiver drops it and counts it, and one
bad publish costs nothing else.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypeGuard

ORIGIN_CHARS = 12
VERSION = 1
READABLE_VERSIONS = (0, 1)  # 0: no "v", written by chatd before versions (the same format as v1)

Scope = Literal["room", "user", "control"]  # the kind of channel an envelope arrived on

# Why an envelope was dropped (a metric label: a fixed set).
REASONS = (
    "framing",  # not "<origin> <header>" at all
    "json",  # the header is not a JSON object
    "version",  # a version this worker does not read
    "op",  # no op, or one not known on this kind of channel
    "header",  # a field the op needs is missing or of the wrong type
    "payloads",  # not as many payloads as the op carries
    "channel",  # the channel's room or user id is not an integer
    "delivery",  # a valid envelope whose delivery raised: a chatd bug (logged with its traceback)
)

_dumps = json.JSONEncoder(separators=(",", ":")).encode
_loads = json.JSONDecoder().decode
_HEAD = b' {"v":%d,' % VERSION  # the separator and the start of every header: "v" first, written once
_INT = {int}


class BadEnvelope(ValueError):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


def new_origin() -> bytes:
    return secrets.token_hex(ORIGIN_CHARS // 2).encode()


def encode(origin: bytes, header: dict[str, Any], payloads: Sequence[bytes] = ()) -> bytes:
    """``header``: ``{"o": op, ...}`` (``v`` is added here)."""
    if "v" in header or "o" not in header:
        raise ValueError("a header has an op and no 'v' (the version, written here)")
    parts = [origin, _HEAD, _dumps(header)[1:].encode()]  # '{"o":...}' minus its "{"
    for payload in payloads:
        parts += (b"\n", payload)
    return b"".join(parts)


# The ops, decoded.  Not frozen: a frozen dataclass takes twice as long to build (object.__setattr__ per
# field), and one is built per envelope received.


@dataclass(slots=True)
class Messages:
    """``m``: committed messages of the room, in commit order."""

    seqs: list[int]
    payloads: list[bytes]


@dataclass(slots=True)
class Frame:
    """``f``: one seq-less frame (room or user channel)."""

    payload: bytes
    exclude: str | None = None  # connection id that must not receive it
    stream: tuple[int, int] | None = None  # (answer message id, chunk index; -1 = stream_start)


@dataclass(slots=True)
class Change:
    """``u``: an edit or delete, revision ``rev`` of the room, of message ``message_id``."""

    rev: int
    payload: bytes
    message_id: int | None = None  # None: from a version that did not send it


@dataclass(slots=True)
class Presence:
    online: list[int]
    offline: list[int]
    payload: bytes
    rev: int | None = None  # the room's presence revision (None: from a version without one)


@dataclass(slots=True)
class Close:
    """``close``: the user's sockets (one session's with ``family``) close with ``code``."""

    code: int
    reason: str
    family: str | None


@dataclass(slots=True)
class Kick:
    room_id: int


@dataclass(slots=True)
class Control:
    """An op for every worker; ``fields`` is the whole header, checked by the op's handler."""

    op: str
    fields: dict[str, Any]


Body = Messages | Frame | Change | Presence | Close | Kick | Control


def decode(data: bytes, scope: Scope) -> Body:
    """The op of the envelope ``data`` that arrived on a ``scope`` channel; ``BadEnvelope`` if it is not valid.

    The origin is not parsed: a worker compares it as bytes first (its own publishes), and nothing
    else needs it.
    """
    if len(data) < ORIGIN_CHARS + 3 or data[ORIGIN_CHARS] != 0x20:  # 0x20: b" "
        raise BadEnvelope("framing", "not <origin> <header>")
    head, *payloads = data[ORIGIN_CHARS + 1 :].split(b"\n")
    try:
        header = _loads(head.decode())
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise BadEnvelope("json", type(exc).__name__) from None
    if type(header) is not dict:
        raise BadEnvelope("json", "header is not an object")
    version = header.get("v", 0)
    if type(version) is not int or version not in READABLE_VERSIONS:
        raise BadEnvelope("version", repr(version)[:20])
    op = header.get("o")
    if type(op) is not str:
        raise BadEnvelope("op", "no op")
    reader = _READERS[scope].get(op)
    if reader is None:
        if scope != "control":
            raise BadEnvelope("op", f"{op[:20]!r} on a {scope} channel")
        reader = _control
    return reader(op, header, payloads)


def channel_id(channel: bytes, prefix_len: int) -> int:
    """The room or user id that ends ``channel`` after its ``prefix_len``-byte prefix."""
    tail = channel[prefix_len:]
    if not tail.isdigit() or len(tail) > 18:  # bytes.isdigit: ASCII digits only; 18: fits a bigint
        raise BadEnvelope("channel", repr(tail[:30]))
    return int(tail)


# -- one reader per op ------------------------------------------------------------------


def _is_int(value: Any) -> TypeGuard[int]:
    return type(value) is int  # not bool, which JSON's true would be


def _ints(value: Any) -> TypeGuard[list[int]]:
    return type(value) is list and set(map(type, value)) <= _INT  # one pass in C: no bool, float or str


def _one(op: str, payloads: list[bytes]) -> bytes:
    if len(payloads) != 1 or not payloads[0]:
        raise BadEnvelope("payloads", f"{op}: {len(payloads)} payloads, not 1")
    return payloads[0]


def _none(op: str, payloads: list[bytes]) -> None:
    if payloads:
        raise BadEnvelope("payloads", f"{op}: {len(payloads)} payloads, not 0")


def _messages(op: str, h: dict[str, Any], payloads: list[bytes]) -> Body:
    seqs = h.get("s")
    if not _ints(seqs) or not seqs or min(seqs) < 1:
        raise BadEnvelope("header", "m: s is not a list of seqs")
    if len(seqs) != len(payloads) or not all(payloads):
        raise BadEnvelope("payloads", f"m: {len(seqs)} seqs, {len(payloads)} payloads")
    return Messages(seqs, payloads)


def _frame(op: str, h: dict[str, Any], payloads: list[bytes]) -> Body:
    exclude = h.get("x")
    if exclude is not None and type(exclude) is not str:
        raise BadEnvelope("header", "f: x is not a connection id")
    stream = None
    if "m" in h or "i" in h:
        answer_id, index = h.get("m"), h.get("i")
        if not _is_int(answer_id) or not _is_int(index):
            raise BadEnvelope("header", "f: m and i are not a stream position")
        stream = (answer_id, index)
    return Frame(_one(op, payloads), exclude, stream)


def _change(op: str, h: dict[str, Any], payloads: list[bytes]) -> Body:
    rev, message_id = h.get("r"), h.get("m")
    if not _is_int(rev) or rev < 1:
        raise BadEnvelope("header", "u: r is not a revision")
    if message_id is not None and not _is_int(message_id):
        raise BadEnvelope("header", "u: m is not a message id")
    return Change(rev, _one(op, payloads), message_id)


def _presence(op: str, h: dict[str, Any], payloads: list[bytes]) -> Body:
    online, offline, rev = h.get("on"), h.get("off"), h.get("r")
    if not _ints(online) or not _ints(offline):
        raise BadEnvelope("header", "p: on and off are not lists of user ids")
    if rev is not None and not _is_int(rev):
        raise BadEnvelope("header", "p: r is not a revision")
    return Presence(online, offline, _one(op, payloads), rev)


def _close(op: str, h: dict[str, Any], payloads: list[bytes]) -> Body:
    code, reason, family = h.get("code"), h.get("reason", ""), h.get("fam")
    if not _is_int(code) or type(reason) is not str or (family is not None and type(family) is not str):
        raise BadEnvelope("header", "close: code, reason or fam ill-typed")
    _none(op, payloads)
    return Close(code, reason, family)


def _kick(op: str, h: dict[str, Any], payloads: list[bytes]) -> Body:
    room_id = h.get("room")
    if not _is_int(room_id):
        raise BadEnvelope("header", "kick: room is not a room id")
    _none(op, payloads)
    return Kick(room_id)


def _control(op: str, h: dict[str, Any], payloads: list[bytes]) -> Body:
    _none(op, payloads)
    return Control(op, h)


_Reader = Callable[[str, dict[str, Any], list[bytes]], Body]
_READERS: dict[str, dict[str, _Reader]] = {
    "room": {"m": _messages, "f": _frame, "u": _change, "p": _presence},
    "user": {"f": _frame, "close": _close, "kick": _kick},
    "control": {},  # any op: whether a handler knows it is the hub's to say
}
