"""Rooms and their membership in Postgres.

The ``rooms`` and ``room_members`` rows behind the room endpoints and every
membership check: create with members, the caller's rooms with unread counts
and last message, rename, archive and assistant settings, add and remove
members, the roster, read positions.  A room's message log, and the join's
replay of it, are in ``messages``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg.types.json import Jsonb

from chatd.core import errors
from chatd.storage.db import Database, Row, bounded, fetch_all, fetch_one, transaction

# Messages after member m's read marker that mention it (user_id 0: @room), not deleted, not its own
# (sql/0017_mentions_receipts.sql).
MENTION_COUNT_SQL = (
    "(SELECT count(*) FROM mentions x JOIN messages msg ON msg.id = x.message_id"
    " WHERE x.user_id IN (m.user_id, 0) AND x.room_id = m.room_id AND x.seq > m.read_seq"
    " AND msg.deleted_at IS NULL AND msg.sender_id IS DISTINCT FROM m.user_id)"
)

ROOM_COLUMNS = (
    "r.id, r.name, r.kind, r.owner_id, r.status, r.assistant, r.last_seq, r.created_at, r.updated_at, r.assistant_count"
)


@bounded
async def create_room(
    pool: Database,
    name: str,
    kind: str,
    owner_id: int,
    members: Sequence[int],
    assistant: dict[str, Any] | None,
) -> Row:
    async with transaction(pool) as conn:
        cur = await conn.execute(
            "INSERT INTO rooms AS r (name, kind, owner_id, assistant) VALUES (%s, %s, %s, %s)"
            f" RETURNING {ROOM_COLUMNS}",
            (name, kind, owner_id, Jsonb(assistant) if assistant is not None else None),
        )
        room = await cur.fetchone()
        assert room is not None
        others = sorted(set(members) - {owner_id})
        if others:
            cur = await conn.execute("SELECT id FROM users WHERE id = ANY(%s) AND status = 'active'", (others,))
            found = {r["id"] for r in await cur.fetchall()}
            missing = [u for u in others if u not in found]
            if missing:
                raise errors.NotFound(f"unknown user ids in members: {missing}")  # as adding one: POST /members
        await conn.execute(
            "INSERT INTO room_members (room_id, user_id, role)"
            " SELECT %s, u, CASE WHEN u = %s THEN 'owner' ELSE 'member' END FROM unnest(%s::bigint[]) AS u",
            (room["id"], owner_id, [owner_id, *others]),
        )
    return room


@bounded
async def room_by_id(pool: Database, room_id: int) -> Row | None:
    return await fetch_one(pool, f"SELECT {ROOM_COLUMNS} FROM rooms r WHERE r.id = %s", (room_id,))


@bounded
async def room_for_member(pool: Database, room_id: int, user_id: int) -> Row | None:
    """The room with the caller's membership, or None: non-members cannot tell it exists."""
    return await fetch_one(
        pool,
        f"SELECT {ROOM_COLUMNS}, m.role AS member_role, m.read_seq FROM rooms r"
        " JOIN room_members m ON m.room_id = r.id AND m.user_id = %s WHERE r.id = %s",
        (user_id, room_id),
    )


@bounded
async def list_rooms(pool: Database, user_id: int, status: str, limit: int, before_id: int | None) -> list[Row]:
    return await fetch_all(
        pool,
        f"SELECT {ROOM_COLUMNS}, m.role AS member_role, m.read_seq,"
        " GREATEST(r.last_seq - m.read_seq, 0) AS unread_count,"
        f" {MENTION_COUNT_SQL} AS mention_count,"
        " (SELECT row_to_json(x) FROM (SELECT id, seq, sender_id, role, kind,"
        "     CASE WHEN deleted_at IS NULL THEN content ELSE '' END AS content,"
        "     to_char(created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"') AS created_at"
        "   FROM messages WHERE room_id = r.id ORDER BY seq DESC LIMIT 1) x) AS last_message"
        " FROM rooms r JOIN room_members m ON m.room_id = r.id AND m.user_id = %s"
        " WHERE r.status = %s AND (%s::bigint IS NULL OR r.id < %s)"
        " ORDER BY r.id DESC LIMIT %s",
        (user_id, status, before_id, before_id, limit),
    )


@bounded
async def update_room(pool: Database, room_id: int, changes: dict[str, Any]) -> Row:
    sets, params = [], []
    for column in ("name", "status"):
        if column in changes:
            sets.append(f"{column} = %s")
            params.append(changes[column])
    if "assistant" in changes:
        sets.append("assistant = %s")
        params.append(Jsonb(changes["assistant"]))
    sets.append("updated_at = now()")
    row = await fetch_one(
        pool, f"UPDATE rooms AS r SET {', '.join(sets)} WHERE id = %s RETURNING {ROOM_COLUMNS}", (*params, room_id)
    )
    if row is None:
        raise errors.NotFound("room not found")
    return row


@bounded
async def room_member_ids(pool: Database, room_id: int) -> list[int]:
    rows = await fetch_all(pool, "SELECT user_id FROM room_members WHERE room_id = %s ORDER BY user_id", (room_id,))
    return [r["user_id"] for r in rows]


@bounded
async def add_member(pool: Database, room_id: int, user_id: int) -> bool:
    try:
        row = await fetch_one(
            pool,
            "INSERT INTO room_members (room_id, user_id) SELECT %s, id FROM users WHERE id = %s AND status = 'active'"
            " ON CONFLICT DO NOTHING RETURNING user_id",
            (room_id, user_id),
        )
    except psycopg.errors.ForeignKeyViolation:
        raise errors.NotFound("room not found") from None
    if row is None:
        exists = await fetch_one(pool, "SELECT 1 FROM users WHERE id = %s AND status = 'active'", (user_id,))
        if exists is None:
            raise errors.NotFound("user not found")
        return False  # already a member
    return True


@bounded
async def remove_member(pool: Database, room_id: int, user_id: int) -> bool:
    row = await fetch_one(
        pool,
        "DELETE FROM room_members WHERE room_id = %s AND user_id = %s AND role <> 'owner' RETURNING user_id",
        (room_id, user_id),
    )
    return row is not None


@dataclass(frozen=True, slots=True)
class ReadMarker:
    read_seq: int  # the user's own marker (their devices; unread and mention counts)
    shared_seq: int  # the receipt other members see
    mention_count: int  # mentions after read_seq


@bounded
async def set_read(pool: Database, room_id: int, user_id: int, seq: int, private: bool = False) -> ReadMarker | None:
    """Advance the read position (never backwards, never past the last message).

    A public read advances the shared marker too; a private one leaves it where it was.  ``shared_seq``
    is stored NULL while it equals ``read_seq`` (the NULLIF), so a user who never reads privately
    has one marker.
    """
    row = await fetch_one(
        pool,
        "WITH s AS (SELECT LEAST(%(seq)s::bigint, r.last_seq) AS seq FROM rooms r WHERE r.id = %(room)s)"
        " UPDATE room_members m SET read_seq = GREATEST(m.read_seq, s.seq),"
        "   shared_seq = NULLIF(CASE WHEN %(private)s THEN COALESCE(m.shared_seq, m.read_seq)"
        "     ELSE GREATEST(COALESCE(m.shared_seq, m.read_seq), s.seq) END, GREATEST(m.read_seq, s.seq))"
        " FROM s WHERE m.room_id = %(room)s AND m.user_id = %(user)s"
        " RETURNING m.read_seq, COALESCE(m.shared_seq, m.read_seq) AS shared_seq,"
        f" {MENTION_COUNT_SQL} AS mention_count",
        {"seq": seq, "room": room_id, "user": user_id, "private": private},
    )
    if row is None:
        return None
    return ReadMarker(int(row["read_seq"]), int(row["shared_seq"]), int(row["mention_count"]))


@bounded
async def room_roster(pool: Database, room_id: int, viewer_id: int, after_user_id: int, limit: int) -> list[Row]:
    """Members of a room by user id, with names (deleted accounts keep their row, status 'deleted').

    ``read_seq`` is the viewer's own marker on the viewer's row and the shared receipt on the others'.
    """
    return await fetch_all(
        pool,
        "SELECT u.id, u.name, u.status, m.role, m.joined_at,"
        " CASE WHEN m.user_id = %s THEN m.read_seq ELSE COALESCE(m.shared_seq, m.read_seq) END AS read_seq"
        " FROM room_members m"
        " JOIN users u ON u.id = m.user_id WHERE m.room_id = %s AND m.user_id > %s ORDER BY m.user_id LIMIT %s",
        (viewer_id, room_id, after_user_id, limit),
    )


@bounded
async def room_receipts(pool: Database, room_id: int, viewer_id: int, after_user_id: int, limit: int) -> list[Row]:
    """Each member's read receipt by user id (the viewer's own marker for the viewer, as the roster)."""
    return await fetch_all(
        pool,
        "SELECT m.user_id,"
        " CASE WHEN m.user_id = %s THEN m.read_seq ELSE COALESCE(m.shared_seq, m.read_seq) END AS read_seq"
        " FROM room_members m WHERE m.room_id = %s AND m.user_id > %s ORDER BY m.user_id LIMIT %s",
        (viewer_id, room_id, after_user_id, limit),
    )
