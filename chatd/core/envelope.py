"""What workers publish to each other over Redis pub/sub (pure).

``<origin> <header JSON>[\\n<payload>]*``

* ``origin``: the publishing worker's 12-character id.  A worker drops its
  own publishes by comparing bytes, before parsing anything: it delivered them
  to its local sockets already.
* ``header``: what routing needs, so a frame is never re-parsed:
  ``{"o": op, ...}`` (ops below).
* payloads: complete frame JSON, built once by the publisher.  Compact JSON
  never contains a raw newline, so newlines separate payloads.

Ops: ``m`` messages of one room (``"s"``: their seqs, one payload each, in
commit order); ``f`` one seq-less frame (``"x"``: connection to skip, ``"m"``,
``"i"``: answer id and chunk index of a stream frame); ``u`` an edit/delete
(``"r"``: the room's edit revision); ``p`` presence (``"on"``, ``"off"``:
user ids; payload: the frame); and, without payload, ``close``, ``kick`` (user
channels) and the control ops (``cancel``...).
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

ORIGIN_CHARS = 12

_dumps = json.JSONEncoder(separators=(",", ":")).encode
_loads = json.JSONDecoder().decode


def new_origin() -> bytes:
    return secrets.token_hex(ORIGIN_CHARS // 2).encode()


def encode(origin: bytes, header: dict[str, Any], payloads: Sequence[bytes] = ()) -> bytes:
    parts = [origin, b" ", _dumps(header).encode()]
    for payload in payloads:
        parts += (b"\n", payload)
    return b"".join(parts)


@dataclass(frozen=True, slots=True)
class Envelope:
    origin: bytes
    header: dict[str, Any]
    payloads: list[bytes]


def decode(data: bytes) -> Envelope:
    """Raises ``ValueError`` on anything that is not an envelope."""
    if len(data) < ORIGIN_CHARS + 3 or data[ORIGIN_CHARS : ORIGIN_CHARS + 1] != b" ":
        raise ValueError("not a chatd envelope")
    head, *payloads = data[ORIGIN_CHARS + 1 :].split(b"\n")
    header = _loads(head.decode())
    if not isinstance(header, dict) or "o" not in header:
        raise ValueError("envelope header without op")
    return Envelope(data[:ORIGIN_CHARS], header, payloads)
