"""PostgreSQL access: every SQL statement of the request paths lives here.

Functions take the worker's pool and return plain dicts (rows) or raise
``ChatdError``s.  A Postgres that does not answer (down, restarting, pool
exhausted) becomes ``Unavailable``, so a handler answers ``unavailable``
instead of hanging or leaking a driver error.
"""

from __future__ import annotations

import contextlib
import datetime as dt
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any, cast

import psycopg
from psycopg import AsyncConnection
from psycopg.rows import DictRow
from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from chatd import errors
from chatd.logs import app_log, fields

Row = dict[str, Any]

USER_COLUMNS = "id, email, name, role, status, created_at"
MESSAGE_COLUMNS = (
    "id, room_id, seq, sender_id, role, kind, content, client_msg_id, reply_to_id, created_at, edited_at, deleted_at,"
    " status, superseded_at"
)


@contextlib.asynccontextmanager
async def connection(pool: AsyncConnectionPool) -> AsyncIterator[AsyncConnection[DictRow]]:
    """A pooled connection; driver failures become ``Unavailable``."""
    try:
        async with pool.connection() as conn:
            yield cast(AsyncConnection[DictRow], conn)  # the pool is built with row_factory=dict_row
    except (PoolTimeout, psycopg.OperationalError, psycopg.InterfaceError) as exc:
        app_log.warning("postgres_unavailable", extra=fields(error=str(exc)[:300]))
        if not isinstance(exc, PoolTimeout):
            await _sweep(pool)
        raise errors.Unavailable("database unavailable, try again") from None


async def _sweep(pool: AsyncConnectionPool) -> None:
    """One connection broke (Postgres restarted?): drop every broken idle one, not one per request."""
    try:
        await pool.check()
    except Exception as exc:  # the sweep is best effort; the pool reconnects on its own
        app_log.debug("pool_check_failed", extra=fields(error=str(exc)[:200]))


@contextlib.asynccontextmanager
async def transaction(pool: AsyncConnectionPool) -> AsyncIterator[AsyncConnection[DictRow]]:
    async with connection(pool) as conn:
        try:
            async with conn.transaction():
                yield conn
        except (psycopg.OperationalError, psycopg.InterfaceError) as exc:
            app_log.warning("postgres_unavailable", extra=fields(error=str(exc)[:300]))
            await _sweep(pool)
            raise errors.Unavailable("database unavailable, try again") from None


async def fetch_one(pool: AsyncConnectionPool, sql: str, params: Sequence[Any] = ()) -> Row | None:
    async with connection(pool) as conn:
        cur = await conn.execute(sql, params)  # type: ignore[arg-type]
        return await cur.fetchone()


async def fetch_all(pool: AsyncConnectionPool, sql: str, params: Sequence[Any] = ()) -> list[Row]:
    async with connection(pool) as conn:
        cur = await conn.execute(sql, params)  # type: ignore[arg-type]
        return await cur.fetchall()


# -- users ----------------------------------------------------------------------


async def create_user(pool: AsyncConnectionPool, email: str, name: str, password_hash: str | None, role: str) -> Row:
    try:
        row = await fetch_one(
            pool,
            f"INSERT INTO users (email, name, password_hash, role) VALUES (%s, %s, %s, %s) RETURNING {USER_COLUMNS}",
            (email, name, password_hash, role),
        )
    except psycopg.errors.UniqueViolation:
        raise errors.Conflict("an account with this email already exists") from None
    assert row is not None
    return row


async def user_by_email(pool: AsyncConnectionPool, email: str) -> Row | None:
    return await fetch_one(
        pool, f"SELECT {USER_COLUMNS}, password_hash FROM users WHERE lower(email) = lower(%s)", (email,)
    )


async def user_by_id(pool: AsyncConnectionPool, user_id: int) -> Row | None:
    return await fetch_one(pool, f"SELECT {USER_COLUMNS} FROM users WHERE id = %s", (user_id,))


async def set_user_status(pool: AsyncConnectionPool, user_id: int, status: str) -> Row | None:
    return await fetch_one(
        pool,
        f"UPDATE users SET status = %s, updated_at = now() WHERE id = %s RETURNING {USER_COLUMNS}",
        (status, user_id),
    )


async def set_password_hash(pool: AsyncConnectionPool, user_id: int, password_hash: str) -> None:
    await fetch_one(pool, "UPDATE users SET password_hash = %s WHERE id = %s RETURNING id", (password_hash, user_id))


# -- refresh tokens -------------------------------------------------------------


async def store_refresh(pool: AsyncConnectionPool, jti: str, family: str, user_id: int, expires_at: int) -> None:
    await fetch_one(
        pool,
        "INSERT INTO refresh_tokens (jti, family, user_id, expires_at) VALUES (%s, %s, %s, to_timestamp(%s))"
        " RETURNING jti",
        (jti, family, user_id, expires_at),
    )


@dataclass(frozen=True, slots=True)
class RefreshUse:
    ok: bool  # first use of a live token
    reused: bool  # already used or revoked: the family must die


async def use_refresh(pool: AsyncConnectionPool, jti: str, family: str) -> RefreshUse:
    """Mark a refresh token used, exactly once (one statement: no race between two uses)."""
    async with transaction(pool) as conn:
        cur = await conn.execute(
            "UPDATE refresh_tokens SET used_at = now() WHERE jti = %s AND family = %s"
            " AND used_at IS NULL AND revoked_at IS NULL AND expires_at > now() RETURNING jti",
            (jti, family),
        )
        if await cur.fetchone():
            return RefreshUse(ok=True, reused=False)
        cur = await conn.execute("SELECT 1 FROM refresh_tokens WHERE jti = %s", (jti,))
        known = await cur.fetchone() is not None
    return RefreshUse(ok=False, reused=known)


async def revoke_family(pool: AsyncConnectionPool, family: str) -> None:
    await fetch_one(
        pool,
        "WITH r AS (UPDATE refresh_tokens SET revoked_at = now() WHERE family = %s AND revoked_at IS NULL RETURNING 1)"
        " SELECT count(*) AS n FROM r",
        (family,),
    )


async def user_families(pool: AsyncConnectionPool, user_id: int) -> list[str]:
    rows = await fetch_all(
        pool,
        "SELECT DISTINCT family FROM refresh_tokens WHERE user_id = %s AND revoked_at IS NULL AND expires_at > now()",
        (user_id,),
    )
    return [r["family"] for r in rows]


# -- rooms ----------------------------------------------------------------------

ROOM_COLUMNS = "r.id, r.name, r.kind, r.owner_id, r.status, r.assistant, r.last_seq, r.created_at, r.updated_at"


async def create_room(
    pool: AsyncConnectionPool,
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
                raise errors.BadRequest(f"unknown user ids in members: {missing}")
        await conn.execute(
            "INSERT INTO room_members (room_id, user_id, role)"
            " SELECT %s, u, CASE WHEN u = %s THEN 'owner' ELSE 'member' END FROM unnest(%s::bigint[]) AS u",
            (room["id"], owner_id, [owner_id, *others]),
        )
    return room


async def room_for_member(pool: AsyncConnectionPool, room_id: int, user_id: int) -> Row | None:
    """The room with the caller's membership, or None: non-members cannot tell it exists."""
    return await fetch_one(
        pool,
        f"SELECT {ROOM_COLUMNS}, m.role AS member_role, m.read_seq FROM rooms r"
        " JOIN room_members m ON m.room_id = r.id AND m.user_id = %s WHERE r.id = %s",
        (user_id, room_id),
    )


async def list_rooms(
    pool: AsyncConnectionPool, user_id: int, status: str, limit: int, before_id: int | None
) -> list[Row]:
    return await fetch_all(
        pool,
        f"SELECT {ROOM_COLUMNS}, m.role AS member_role, m.read_seq,"
        " GREATEST(r.last_seq - m.read_seq, 0) AS unread_count,"
        " (SELECT row_to_json(x) FROM (SELECT id, seq, sender_id, role, kind,"
        "     CASE WHEN deleted_at IS NULL THEN content ELSE '' END AS content,"
        "     to_char(created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"') AS created_at"
        "   FROM messages WHERE room_id = r.id ORDER BY seq DESC LIMIT 1) x) AS last_message"
        " FROM rooms r JOIN room_members m ON m.room_id = r.id AND m.user_id = %s"
        " WHERE r.status = %s AND (%s::bigint IS NULL OR r.id < %s)"
        " ORDER BY r.id DESC LIMIT %s",
        (user_id, status, before_id, before_id, limit),
    )


async def update_room(pool: AsyncConnectionPool, room_id: int, changes: dict[str, Any]) -> Row:
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


async def room_member_ids(pool: AsyncConnectionPool, room_id: int) -> list[int]:
    rows = await fetch_all(pool, "SELECT user_id FROM room_members WHERE room_id = %s ORDER BY user_id", (room_id,))
    return [r["user_id"] for r in rows]


async def add_member(pool: AsyncConnectionPool, room_id: int, user_id: int) -> bool:
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


async def remove_member(pool: AsyncConnectionPool, room_id: int, user_id: int) -> bool:
    row = await fetch_one(
        pool,
        "DELETE FROM room_members WHERE room_id = %s AND user_id = %s AND role <> 'owner' RETURNING user_id",
        (room_id, user_id),
    )
    return row is not None


async def set_read(pool: AsyncConnectionPool, room_id: int, user_id: int, seq: int) -> int | None:
    """Advance the read position (never backwards, never past the last message)."""
    row = await fetch_one(
        pool,
        "UPDATE room_members m SET read_seq = GREATEST(m.read_seq, LEAST(%s, r.last_seq)) FROM rooms r"
        " WHERE m.room_id = %s AND m.user_id = %s AND r.id = m.room_id RETURNING m.read_seq",
        (seq, room_id, user_id),
    )
    return None if row is None else int(row["read_seq"])


# -- messages -------------------------------------------------------------------


async def messages_page(
    pool: AsyncConnectionPool, room_id: int, after_seq: int | None, before_seq: int | None, limit: int
) -> tuple[list[Row], bool]:
    """Ascending by seq.  Without after_seq: the newest ``limit`` (before before_seq)."""
    if after_seq is not None:
        rows = await fetch_all(
            pool,
            f"SELECT {MESSAGE_COLUMNS} FROM messages WHERE room_id = %s AND seq > %s"
            " AND (%s::bigint IS NULL OR seq < %s) ORDER BY seq LIMIT %s",
            (room_id, after_seq, before_seq, before_seq, limit + 1),
        )
        return rows[:limit], len(rows) > limit
    rows = await fetch_all(
        pool,
        f"SELECT {MESSAGE_COLUMNS} FROM messages WHERE room_id = %s"
        " AND (%s::bigint IS NULL OR seq < %s) ORDER BY seq DESC LIMIT %s",
        (room_id, before_seq, before_seq, limit + 1),
    )
    has_more = len(rows) > limit
    return list(reversed(rows[:limit])), has_more


async def messages_after(pool: AsyncConnectionPool, room_id: int, after_seq: int, limit: int) -> list[Row]:
    return await fetch_all(
        pool,
        f"SELECT {MESSAGE_COLUMNS} FROM messages WHERE room_id = %s AND seq > %s ORDER BY seq LIMIT %s",
        (room_id, after_seq, limit),
    )


async def message_by_id(pool: AsyncConnectionPool, message_id: int) -> Row | None:
    return await fetch_one(pool, f"SELECT {MESSAGE_COLUMNS} FROM messages WHERE id = %s", (message_id,))


async def edit_message(pool: AsyncConnectionPool, message_id: int, content: str) -> Row | None:
    return await fetch_one(
        pool,
        f"UPDATE messages SET content = %s, edited_at = now() WHERE id = %s AND deleted_at IS NULL"
        f" RETURNING {MESSAGE_COLUMNS}",
        (content, message_id),
    )


async def delete_message(pool: AsyncConnectionPool, message_id: int) -> Row | None:
    """Tombstone: the row and its seq stay, the content goes."""
    return await fetch_one(
        pool,
        f"UPDATE messages SET content = '', deleted_at = now() WHERE id = %s AND deleted_at IS NULL"
        f" RETURNING {MESSAGE_COLUMNS}",
        (message_id,),
    )


@dataclass(slots=True)
class PendingMessage:
    """One message waiting for the group commit."""

    room_id: int
    sender_id: int | None
    role: str
    kind: str
    content: str
    client_msg_id: str | None
    reply_to_id: int | None = None


@dataclass(frozen=True, slots=True)
class Committed:
    row: Row | None  # the stored message (the original one for a duplicate)
    duplicate: bool = False
    error: errors.ChatdError | None = None
    room: Row | None = None  # {kind, assistant, owner_id} of the room, for the assistant trigger


async def commit_batch(pool: AsyncConnectionPool, batch: Sequence[PendingMessage]) -> list[Committed]:
    """Store a batch in ONE transaction; per-room seqs stay gap-free.

    Rooms are locked in id order (no deadlock between concurrent batches); with
    the room rows locked, duplicates of a client_msg_id are found before seqs
    are assigned, so a retry never burns a seq.
    """
    results: list[Committed | None] = [None] * len(batch)
    async with transaction(pool) as conn:
        room_ids = sorted({m.room_id for m in batch})
        cur = await conn.execute(
            "SELECT id, last_seq, status, kind, assistant, owner_id FROM rooms WHERE id = ANY(%s)"
            " ORDER BY id FOR UPDATE",
            (room_ids,),
        )
        rooms = {r["id"]: r for r in await cur.fetchall()}
        senders = sorted({(m.room_id, m.sender_id) for m in batch if m.sender_id is not None})
        members: set[tuple[int, int]] = set()
        if senders:
            cur = await conn.execute(
                "SELECT room_id, user_id FROM room_members WHERE (room_id, user_id) IN"
                " (SELECT * FROM unnest(%s::bigint[], %s::bigint[]))",
                ([s[0] for s in senders], [s[1] for s in senders]),
            )
            members = {(r["room_id"], r["user_id"]) for r in await cur.fetchall()}
        keyed = [(m.room_id, m.sender_id, m.client_msg_id) for m in batch if m.client_msg_id and m.sender_id]
        existing: dict[tuple[int, int | None, str | None], Row] = {}
        if keyed:
            cur = await conn.execute(
                f"SELECT {MESSAGE_COLUMNS} FROM messages WHERE (room_id, sender_id, client_msg_id) IN"
                " (SELECT * FROM unnest(%s::bigint[], %s::bigint[], %s::text[]))",
                ([k[0] for k in keyed], [k[1] for k in keyed], [k[2] for k in keyed]),
            )
            existing = {(r["room_id"], r["sender_id"], r["client_msg_id"]): r for r in await cur.fetchall()}

        to_insert: list[tuple[int, PendingMessage, int]] = []
        next_seq = {rid: r["last_seq"] for rid, r in rooms.items()}
        first_in_batch: dict[tuple[int, int | None, str], int] = {}
        for i, m in enumerate(batch):
            room = rooms.get(m.room_id)
            if room is None or (m.sender_id is not None and (m.room_id, m.sender_id) not in members):
                results[i] = Committed(None, error=errors.NotFound("room not found"))
                continue
            if room["status"] != "active":
                results[i] = Committed(None, error=errors.Conflict("room is archived"))
                continue
            key = (m.room_id, m.sender_id, m.client_msg_id)
            if m.client_msg_id and key in existing:
                results[i] = Committed(existing[key], duplicate=True)
                continue
            if m.client_msg_id:
                dedupe_key = (m.room_id, m.sender_id, m.client_msg_id)
                if dedupe_key in first_in_batch:
                    continue  # resolved after insert from the first copy
                first_in_batch[dedupe_key] = i
            next_seq[m.room_id] += 1
            to_insert.append((i, m, next_seq[m.room_id]))

        if to_insert:
            cur = await conn.execute(
                "INSERT INTO messages (room_id, seq, sender_id, role, kind, content, client_msg_id, reply_to_id)"
                " SELECT * FROM unnest(%s::bigint[], %s::bigint[], %s::bigint[], %s::text[], %s::text[], %s::text[],"
                " %s::text[], %s::bigint[])"
                f" RETURNING {MESSAGE_COLUMNS}",
                (
                    [m.room_id for _, m, _ in to_insert],
                    [seq for _, _, seq in to_insert],
                    [m.sender_id for _, m, _ in to_insert],
                    [m.role for _, m, _ in to_insert],
                    [m.kind for _, m, _ in to_insert],
                    [m.content for _, m, _ in to_insert],
                    [m.client_msg_id for _, m, _ in to_insert],
                    [m.reply_to_id for _, m, _ in to_insert],
                ),
            )
            inserted = {(r["room_id"], r["seq"]): r for r in await cur.fetchall()}
            for i, m, seq in to_insert:
                results[i] = Committed(inserted[(m.room_id, seq)], room=rooms[m.room_id])
            changed = {rid: seq for rid, seq in next_seq.items() if seq != rooms[rid]["last_seq"]}
            await conn.execute(
                "UPDATE rooms SET last_seq = v.seq FROM unnest(%s::bigint[], %s::bigint[]) AS v(id, seq)"
                " WHERE rooms.id = v.id",
                (list(changed), list(changed.values())),
            )
    for i, m in enumerate(batch):
        if results[i] is None and m.client_msg_id:  # a duplicate inside the batch
            first = results[first_in_batch[(m.room_id, m.sender_id, m.client_msg_id)]]
            assert first is not None
            results[i] = Committed(first.row, duplicate=True, error=first.error)
    return [r if r is not None else Committed(None, error=errors.Internal()) for r in results]


# -- assistant ------------------------------------------------------------------


async def reserve_message_id(pool: AsyncConnectionPool) -> int:
    """An id for an answer that is still streaming; the row is written when it ends."""
    row = await fetch_one(pool, "SELECT nextval(pg_get_serial_sequence('messages', 'id')) AS id")
    assert row is not None
    return int(row["id"])


async def answer_for(pool: AsyncConnectionPool, prompt_id: int) -> Row | None:
    return await fetch_one(
        pool,
        f"SELECT {MESSAGE_COLUMNS} FROM messages WHERE reply_to_id = %s AND role = 'assistant'"
        " AND superseded_at IS NULL",
        (prompt_id,),
    )


async def recent_messages(pool: AsyncConnectionPool, room_id: int, up_to_seq: int, limit: int) -> list[Row]:
    """The newest messages up to a seq (ascending), without deleted or superseded ones."""
    rows = await fetch_all(
        pool,
        f"SELECT {MESSAGE_COLUMNS} FROM messages WHERE room_id = %s AND seq <= %s AND deleted_at IS NULL"
        " AND superseded_at IS NULL AND kind = 'text' ORDER BY seq DESC LIMIT %s",
        (room_id, up_to_seq, limit),
    )
    return list(reversed(rows))


@dataclass(frozen=True, slots=True)
class Usage:
    provider: str
    model: str
    stop_reason: str
    input_tokens: int
    output_tokens: int
    first_token_ms: int | None
    latency_ms: int
    retrieved_ids: tuple[int, ...]


async def persist_answer(
    pool: AsyncConnectionPool,
    *,
    message_id: int,
    room_id: int,
    prompt_id: int,
    requester_id: int | None,
    content: str,
    status: str,
    supersede_id: int | None,
    usage: Usage,
) -> Row | None:
    """Write the answer with the room's next seq, its generation and usage, in one transaction.

    None when an answer to this prompt already exists (a job taken over after a
    crash finished twice): the unique index keeps the first one.
    """
    async with transaction(pool) as conn:
        cur = await conn.execute("SELECT last_seq FROM rooms WHERE id = %s FOR UPDATE", (room_id,))
        room = await cur.fetchone()
        if room is None:
            return None
        if supersede_id is not None:
            await conn.execute(
                "UPDATE messages SET superseded_at = now() WHERE id = %s AND superseded_at IS NULL", (supersede_id,)
            )
        cur = await conn.execute(
            "INSERT INTO messages (id, room_id, seq, sender_id, role, kind, content, reply_to_id, status)"
            " OVERRIDING SYSTEM VALUE VALUES (%s, %s, %s, NULL, 'assistant', 'text', %s, %s, %s)"
            " ON CONFLICT (reply_to_id) WHERE role = 'assistant' AND superseded_at IS NULL DO NOTHING"
            f" RETURNING {MESSAGE_COLUMNS}",
            (message_id, room_id, room["last_seq"] + 1, content, prompt_id, status),
        )
        row = await cur.fetchone()
        if row is None:
            return None
        await conn.execute("UPDATE rooms SET last_seq = last_seq + 1 WHERE id = %s", (room_id,))
        await conn.execute(
            "INSERT INTO generations (room_id, prompt_message_id, answer_message_id, requester_id, provider, model,"
            " stop_reason, input_tokens, output_tokens, first_token_ms, latency_ms, retrieved_ids)"
            " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
            (
                room_id,
                prompt_id,
                message_id,
                requester_id,
                usage.provider,
                usage.model,
                usage.stop_reason,
                usage.input_tokens,
                usage.output_tokens,
                usage.first_token_ms,
                usage.latency_ms,
                list(usage.retrieved_ids),
            ),
        )
        if requester_id is not None:
            await conn.execute(
                "INSERT INTO usage_daily AS u (day, user_id, room_id, answers, input_tokens, output_tokens)"
                " VALUES ((now() AT TIME ZONE 'UTC')::date, %s, %s, 1, %s, %s)"
                " ON CONFLICT (day, user_id, room_id) DO UPDATE SET answers = u.answers + 1,"
                " input_tokens = u.input_tokens + EXCLUDED.input_tokens,"
                " output_tokens = u.output_tokens + EXCLUDED.output_tokens",
                (requester_id, room_id, usage.input_tokens, usage.output_tokens),
            )
    return row


async def tokens_used_today(pool: AsyncConnectionPool, user_id: int) -> int:
    row = await fetch_one(
        pool,
        "SELECT COALESCE(sum(input_tokens + output_tokens), 0) AS n FROM usage_daily"
        " WHERE user_id = %s AND day = (now() AT TIME ZONE 'UTC')::date",
        (user_id,),
    )
    return int(row["n"]) if row else 0


def iso(value: dt.datetime | None) -> str | None:
    """Timestamps on the wire: RFC 3339 UTC with milliseconds."""
    if value is None:
        return None
    return value.astimezone(dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
