"""The server's assistants and the rooms' picks of them, in Postgres (sql/0016).

Admins define assistants (``assistants``: name, provider, model, system prompt, default mode);
a room owner picks some for the room (``room_assistants``, with the mode they answer in there).
Which of them owe an answer to a message is decided by the group commit
(``chatd_commit_messages``), on the locked room row; this module serves the management routes.
"""

from __future__ import annotations

from typing import Any

import psycopg

from chatd.core import errors
from chatd.storage.db import Database, Row, bounded, fetch_all, fetch_one, transaction

ASSISTANT_COLUMNS = "a.id, a.name, a.provider, a.model, a.system_prompt, a.mode, a.status, a.created_at, a.updated_at"
_EDITABLE = ("provider", "model", "system_prompt", "mode", "status")
_COUNT_SQL = (
    "UPDATE rooms SET assistant_count = (SELECT count(*) FROM room_assistants WHERE room_id = %s) WHERE id = %s"
)


@bounded
async def create_assistant(pool: Database, fields: dict[str, Any]) -> Row:
    try:
        row = await fetch_one(
            pool,
            "INSERT INTO assistants AS a (name, provider, model, system_prompt, mode)"
            f" VALUES (%s, %s, %s, %s, %s) RETURNING {ASSISTANT_COLUMNS}",
            (fields["name"], fields["provider"], fields["model"], fields.get("system_prompt", ""), fields["mode"]),
        )
    except psycopg.errors.UniqueViolation:
        raise errors.Conflict(f"an assistant named {fields['name']} exists already") from None
    assert row is not None
    return row


@bounded
async def update_assistant(pool: Database, assistant_id: int, changes: dict[str, Any]) -> Row | None:
    sets = [f"{k} = %s" for k in _EDITABLE if k in changes]
    params = [changes[k] for k in _EDITABLE if k in changes]
    return await fetch_one(
        pool,
        f"UPDATE assistants AS a SET {', '.join([*sets, 'updated_at = now()'])} WHERE a.id = %s"
        f" RETURNING {ASSISTANT_COLUMNS}",
        (*params, assistant_id),
    )


@bounded
async def list_assistants(pool: Database, *, active_only: bool) -> list[Row]:
    return await fetch_all(
        pool,
        f"SELECT {ASSISTANT_COLUMNS} FROM assistants a WHERE (NOT %s OR a.status = 'active') ORDER BY a.name",
        (active_only,),
    )


@bounded
async def assistant_by_id(pool: Database, assistant_id: int) -> Row | None:
    return await fetch_one(pool, f"SELECT {ASSISTANT_COLUMNS} FROM assistants a WHERE a.id = %s", (assistant_id,))


@bounded
async def room_assistants(pool: Database, room_id: int) -> list[Row]:
    """The room's assistants (active ones: a retired assistant no longer answers), by name."""
    return await fetch_all(
        pool,
        f"SELECT {ASSISTANT_COLUMNS}, ra.mode AS room_mode, ra.added_by, ra.created_at AS added_at"
        " FROM room_assistants ra JOIN assistants a ON a.id = ra.assistant_id"
        " WHERE ra.room_id = %s AND a.status = 'active' ORDER BY a.name",
        (room_id,),
    )


@bounded
async def pick_assistant(
    pool: Database, room_id: int, assistant_id: int, mode: str | None, added_by: int, max_per_room: int
) -> bool:
    """Add an active assistant to the room, or change its mode there (``mode`` None: its default).

    True when it was added.  Under the room's row lock, so two owners' picks cannot pass the limit."""
    async with transaction(pool) as conn:
        await conn.execute("SELECT 1 FROM rooms WHERE id = %s FOR UPDATE", (room_id,))
        cur = await conn.execute("SELECT mode FROM assistants WHERE id = %s AND status = 'active'", (assistant_id,))
        found = await cur.fetchone()
        if found is None:
            raise errors.UnknownAssistant("no such assistant on this server")
        cur = await conn.execute(
            "SELECT count(*) FILTER (WHERE assistant_id <> %s) AS others,"
            " count(*) FILTER (WHERE assistant_id = %s) AS mine FROM room_assistants WHERE room_id = %s",
            (assistant_id, assistant_id, room_id),
        )
        counts = await cur.fetchone()
        assert counts is not None
        if not counts["mine"] and counts["others"] >= max_per_room:
            raise errors.Conflict(f"a room has at most {max_per_room} assistants")
        await conn.execute(
            "INSERT INTO room_assistants (room_id, assistant_id, mode, added_by) VALUES (%s, %s, %s, %s)"
            " ON CONFLICT (room_id, assistant_id) DO UPDATE SET mode = EXCLUDED.mode",
            (room_id, assistant_id, mode or found["mode"], added_by),
        )
        await conn.execute(_COUNT_SQL, (room_id, room_id))
    return not counts["mine"]


@bounded
async def drop_assistant(pool: Database, room_id: int, assistant_id: int) -> bool:
    async with transaction(pool) as conn:
        cur = await conn.execute(
            "DELETE FROM room_assistants WHERE room_id = %s AND assistant_id = %s RETURNING assistant_id",
            (room_id, assistant_id),
        )
        dropped = await cur.fetchone() is not None
        await conn.execute(_COUNT_SQL, (room_id, room_id))
    return dropped


@bounded
async def usage_by_assistant(pool: Database, days: int) -> list[Row]:
    """Answers and tokens per UTC day, assistant (0: the default one), model and user, newest first."""
    return await fetch_all(
        pool,
        "SELECT to_char(u.day, 'YYYY-MM-DD') AS day, u.assistant_id, a.name AS assistant, u.model, u.user_id,"
        " u.answers, u.input_tokens, u.output_tokens FROM usage_assistants u"
        " LEFT JOIN assistants a ON a.id = u.assistant_id"
        " WHERE u.day > (now() AT TIME ZONE 'UTC')::date - %s"
        " ORDER BY u.day DESC, u.assistant_id, u.model, u.user_id LIMIT 1000",
        (days,),
    )
