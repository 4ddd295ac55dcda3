"""Server frames, sans-I/O: one builder per server ``type``, so each wire shape lives in one place.

``encode`` / ``encode_bytes`` serialize them; stored rows become frames here too (live, replay,
repair and REST share them).  Pure: times are arguments.  ``wsframe`` frames the bytes for fan-out.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Mapping, Sequence
from typing import Any, Final, Literal, TypeAlias

from chatd.core.client_frames import RequestId
from chatd.core.errors import ChatdError

PROTOCOL_VERSION: Final = 1

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


# -- Server frame builders
# Keyword-only so call sites cannot swap two ints (room_id / seq) silently.
# None values are dropped by ``encode``.


def hello(
    *, user_id: int, connection_id: str, server_time_ms: int, heartbeat_ms: int, limits: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """``limits``: the send quota and per-socket frame limits a client keeps to (PROTOCOL.md, hello)."""
    frame: dict[str, Any] = {
        "type": "hello",
        "user_id": user_id,
        "connection_id": connection_id,
        "server_time": server_time_ms,
        "heartbeat_ms": heartbeat_ms,
        "protocol": PROTOCOL_VERSION,
    }
    if limits is not None:
        frame["limits"] = limits
    return frame


def token_expiring(*, expires_in_ms: int) -> dict[str, Any]:
    return {"type": "token_expiring", "expires_in_ms": expires_in_ms}


def authenticated(*, expires_at_ms: int, reply_to: RequestId) -> dict[str, Any]:
    return {
        "type": "authenticated",
        "expires_at_ms": expires_at_ms,
        "reply_to": reply_to,
    }


def joined(
    *, room_id: int, last_seq: int, epoch: str, online: list[int], reply_to: RequestId, edit_rev: int | None = None
) -> dict[str, Any]:
    """``edit_rev``: the room's edit revision at the join; a client sends it back as ``since_rev`` to get the
    edits, deletes and reaction changes it missed while away."""
    return {
        "type": "joined",
        "room_id": room_id,
        "last_seq": last_seq,
        "epoch": epoch,
        "edit_rev": edit_rev,
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


def message_updated(
    *,
    room_id: int,
    message_id: int,
    seq: int,
    content: str,
    edited_at: str | None,
    reactions: Sequence[Mapping[str, Any]] = (),
    rev: int | None = None,
) -> dict[str, Any]:
    """The message's whole changeable state (an edit or a reaction): applying it twice, or a later one
    first, cannot leave a client with a mix.  ``edited_at`` None (omitted): a reaction on an unedited message."""
    return {
        "type": "message_updated",
        "room_id": room_id,
        "message_id": message_id,
        "seq": seq,
        "content": content,
        "edited_at": edited_at,
        "reactions": list(reactions),
        "rev": rev,  # the room's edit revision of this change: a client drops a change older than one it has
    }


def reacted(
    *, room_id: int, message_id: int, emoji: str, add: bool, changed: bool, reply_to: RequestId
) -> dict[str, Any]:
    """The direct reply to ``react``; the new counts reach the room (this socket too) as ``message_updated``."""
    return {
        "type": "reacted",
        "room_id": room_id,
        "message_id": message_id,
        "emoji": emoji,
        "add": add,
        "changed": changed,
        "reply_to": reply_to,
    }


def message_deleted(*, room_id: int, message_id: int, seq: int, rev: int | None = None) -> dict[str, Any]:
    return {
        "type": "message_deleted",
        "room_id": room_id,
        "message_id": message_id,
        "seq": seq,
        "rev": rev,
    }


def typing(*, room_id: int, user_id: int, is_typing: bool) -> dict[str, Any]:
    return {
        "type": "typing",
        "room_id": room_id,
        "user_id": user_id,
        "is_typing": is_typing,
    }


def read(*, room_id: int, user_id: int, seq: int, mention_count: int) -> dict[str, Any]:
    """Your read marker moved (on another of your devices): unread and mention counts follow it."""
    return {"type": "read", "room_id": room_id, "user_id": user_id, "seq": seq, "mention_count": mention_count}


def receipts(*, room_id: int, seqs: Mapping[int, int]) -> dict[str, Any]:
    """Members' shared read markers that moved since the room's last ``receipts`` frame (batched)."""
    return {
        "type": "receipts",
        "room_id": room_id,
        "receipts": [{"user_id": user_id, "read_seq": seq} for user_id, seq in sorted(seqs.items())],
    }


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
    if "mention_count" in row:  # the rooms list (the counts cost a query the other room reads skip)
        out["mention_count"] = row["mention_count"]
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
    *,
    room_id: int,
    message_id: int,
    reply_to_message_id: int,
    model: str,
    supersedes: int | None = None,
    answered_by: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """``supersedes``: a takeover's new attempt replaces that stream (ended with ``error``), which members
    may have seen in part; ``resumed: true`` then says the answer starts over.  ``answered_by``: the room's
    assistant that answers (``{id, name, model}``), absent for the server's default assistant."""
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
    if answered_by is not None:
        frame["answered_by"] = answered_by
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
    error: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """``first_token_ms`` is None when no token arrived (cancelled / error).  ``error``: why a room
    assistant's answer ended with ``error`` (``{code, message}``), for members to read."""
    frame: dict[str, Any] = {
        "type": "stream_end",
        "room_id": room_id,
        "message_id": message_id,
        "seq": seq,
        "stop_reason": stop_reason,
        "usage": {"input_tokens": input_tokens, "output_tokens": output_tokens},
        "first_token_ms": first_token_ms,
        "latency_ms": latency_ms,
    }
    if error is not None:
        frame["error"] = error
    return frame


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
    data = row.get("data")
    if data is not None and row["role"] == "assistant":
        # A room assistant's answer: who answered with which model, and why it failed (sql/0016).
        if "answered_by" in data:
            frame["answered_by"] = data["answered_by"]
        if "error" in data:
            frame["error"] = data["error"]
    elif data is not None:
        frame["data"] = data  # kind file: the attachment; kind system: the event
    if row.get("reactions"):
        frame["reactions"] = row["reactions"]  # [{emoji, count, users}]; omitted when none
    return frame


def change_from_row(row: Mapping[str, Any]) -> dict[str, Any]:
    """The last change of a stored message: ``message_deleted`` or ``message_updated``."""
    rev = int(row["edit_rev"]) if row.get("edit_rev") else None
    if row["deleted_at"] is not None:
        return message_deleted(room_id=row["room_id"], message_id=row["id"], seq=row["seq"], rev=rev)
    return message_updated(
        room_id=row["room_id"],
        message_id=row["id"],
        seq=row["seq"],
        content=row["content"],
        edited_at=iso(row["edited_at"]),
        reactions=row.get("reactions") or (),
        rev=rev,
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
        error=(row.get("data") or {}).get("error") if row["role"] == "assistant" else None,
    )
