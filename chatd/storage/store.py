"""PostgreSQL access: every SQL statement of chatd lives here.

Functions take the worker's ``Database`` (a psycopg pool with a deadline) and
return plain dicts (rows) or raise ``ChatdError``s.  One error policy: a
Postgres that does not answer (down, restarting, paused, pool exhausted)
becomes ``Unavailable``, so a handler answers ``unavailable`` instead of
hanging or leaking a driver error.

Every call has a deadline (``storage.pg_query_timeout_s``), enforced on both
sides: the server's ``statement_timeout``, and the client, which stops waiting
when a paused or unreachable server does not answer at all.  The client-side
deadline runs the call in a task of its own and abandons it on expiry:
psycopg's own clean-up of a cancelled query can wait up to 10 s on a server
that does not answer, and the caller must not.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import functools
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ParamSpec, TypeVar, cast

import psycopg
from psycopg import AsyncConnection, sql
from psycopg.rows import DictRow, dict_row
from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from chatd.core import errors, protocol
from chatd.process import metrics
from chatd.process.config import StorageSettings
from chatd.process.logs import app_log, fields

Row = dict[str, Any]
P = ParamSpec("P")
R = TypeVar("R")

USER_COLUMNS = "id, email, name, role, status, created_at"
MESSAGE_COLUMNS = (
    "id, room_id, seq, sender_id, role, kind, content, client_msg_id, reply_to_id, created_at, edited_at, deleted_at,"
    " status, superseded_at, edit_rev, data"
)


class Database(AsyncConnectionPool):
    """The worker's connection pool, and the deadline of every call made through it."""

    query_timeout_s: float = 5.0


async def open_database(storage: StorageSettings, name: str) -> Database:
    """Opened without waiting: a worker starts and serves (readiness 503) while Postgres is down."""
    timeout_ms = int(storage.pg_query_timeout_s * 1000)
    db = Database(
        storage.database_url,
        min_size=storage.pg_pool_min,
        max_size=storage.pg_pool_max,
        timeout=min(storage.pg_timeout_s, storage.pg_query_timeout_s),
        kwargs={"autocommit": True, "row_factory": dict_row, "options": f"-c statement_timeout={timeout_ms}"},
        # No per-checkout check (a round trip on every query): connection() sweeps the pool with
        # pool.check() when a connection turns out broken, e.g. after a Postgres restart.
        open=False,
        name=name,
    )
    db.query_timeout_s = storage.pg_query_timeout_s
    await db.open(wait=False)
    return db


_abandoned: set[asyncio.Task[Any]] = set()  # calls past their deadline, left to clean up


def bounded(fn: Callable[P, Awaitable[R]]) -> Callable[P, Awaitable[R]]:
    """Give a store call its deadline: ``Unavailable`` when Postgres does not answer in time."""

    @functools.wraps(fn)
    async def call(*args: P.args, **kwargs: P.kwargs) -> R:
        db = args[0]
        timeout_s = db.query_timeout_s if isinstance(db, Database) else None
        task = asyncio.ensure_future(fn(*args, **kwargs))
        try:
            done, _ = await asyncio.wait((task,), timeout=timeout_s)
        except asyncio.CancelledError:
            task.cancel()
            raise
        if not done:
            task.cancel()
            _abandoned.add(task)
            task.add_done_callback(_forget)
            app_log.warning("postgres_timeout", extra=fields(call=fn.__name__, timeout_s=timeout_s))
            metrics.pg_errors.labels("deadline").inc()
            raise errors.Unavailable("database did not answer in time, try again")
        return task.result()

    return call


def _forget(task: asyncio.Task[Any]) -> None:
    _abandoned.discard(task)
    if not task.cancelled():
        task.exception()  # retrieved: the caller got 'unavailable' already


@contextlib.asynccontextmanager
async def connection(pool: Database) -> AsyncIterator[AsyncConnection[DictRow]]:
    """A pooled connection; driver failures become ``Unavailable``."""
    try:
        async with pool.connection() as conn:
            yield cast(AsyncConnection[DictRow], conn)  # the pool is built with row_factory=dict_row
    except psycopg.errors.QueryCanceled:
        app_log.warning("postgres_statement_timeout")
        metrics.pg_errors.labels("statement_timeout").inc()
        raise errors.Unavailable("database did not answer in time, try again") from None
    except (PoolTimeout, psycopg.OperationalError, psycopg.InterfaceError) as exc:
        app_log.warning("postgres_unavailable", extra=fields(error=str(exc)[:300]))
        metrics.pg_errors.labels("pool_timeout" if isinstance(exc, PoolTimeout) else "connection").inc()
        if not isinstance(exc, PoolTimeout):
            await _sweep(pool)
        raise errors.Unavailable("database unavailable, try again") from None


async def _sweep(pool: Database) -> None:
    """One connection broke (Postgres restarted?): drop every broken idle one, not one per request."""
    try:
        await pool.check()
    except Exception as exc:  # the sweep is best effort; the pool reconnects on its own
        app_log.debug("pool_check_failed", extra=fields(error=str(exc)[:200]))


@contextlib.asynccontextmanager
async def transaction(pool: Database) -> AsyncIterator[AsyncConnection[DictRow]]:
    async with connection(pool) as conn:
        try:
            async with conn.transaction():
                yield conn
        except psycopg.errors.QueryCanceled:
            raise
        except (psycopg.OperationalError, psycopg.InterfaceError) as exc:
            app_log.warning("postgres_unavailable", extra=fields(error=str(exc)[:300]))
            metrics.pg_errors.labels("connection").inc()
            await _sweep(pool)
            raise errors.Unavailable("database unavailable, try again") from None


async def _fetch_one(pool: Database, query: str, params: Sequence[Any] | Mapping[str, Any] = ()) -> Row | None:
    async with connection(pool) as conn:
        cur = await conn.execute(query, params)  # type: ignore[arg-type]
        return await cur.fetchone()


async def _fetch_all(pool: Database, query: str, params: Sequence[Any] = ()) -> list[Row]:
    async with connection(pool) as conn:
        cur = await conn.execute(query, params)  # type: ignore[arg-type]
        return await cur.fetchall()


@bounded
async def ping(pool: Database) -> None:
    await _fetch_one(pool, "SELECT 1")


# -- users ----------------------------------------------------------------------


@bounded
async def create_user(pool: Database, email: str, name: str, password_hash: str | None, role: str) -> Row:
    try:
        row = await _fetch_one(
            pool,
            f"INSERT INTO users (email, name, password_hash, role) VALUES (%s, %s, %s, %s) RETURNING {USER_COLUMNS}",
            (email, name, password_hash, role),
        )
    except psycopg.errors.UniqueViolation:
        raise errors.Conflict("an account with this email already exists") from None
    assert row is not None
    return row


@bounded
async def auth_statuses(pool: Database, holders: Sequence[tuple[int, str | None]]) -> list[Row | None]:
    """For each token holder ``(user id, session family)``: ``status``, ``role`` and whether the session
    was revoked; None for an unknown user.  One query for many (connect storms go through ``Batched``)."""
    rows = await _fetch_all(
        pool,
        "SELECT h.ord, u.status, u.role,"
        " EXISTS (SELECT 1 FROM refresh_tokens t WHERE t.family = h.family AND t.revoked_at IS NOT NULL) AS revoked"
        " FROM unnest(%s::bigint[], %s::text[]) WITH ORDINALITY AS h (user_id, family, ord)"
        " LEFT JOIN users u ON u.id = h.user_id ORDER BY h.ord",
        ([h[0] for h in holders], [h[1] for h in holders]),
    )
    return [None if r["status"] is None else r for r in rows]


def upsert_user_sync(database_url: str, email: str, name: str, password_hash: str, role: str) -> Row:
    """Create a user, or reset the password and role of an existing email (the CLI, without a loop)."""
    with psycopg.connect(database_url, row_factory=dict_row) as conn:
        row = conn.execute(
            "INSERT INTO users (email, name, password_hash, role) VALUES (%s, %s, %s, %s)"
            " ON CONFLICT (lower(email)) DO UPDATE SET password_hash = EXCLUDED.password_hash, role = EXCLUDED.role,"
            " status = 'active', updated_at = now()"
            f" RETURNING {USER_COLUMNS}",
            (email, name, password_hash, role),
        ).fetchone()
    assert row is not None
    return row


@bounded
async def user_by_email(pool: Database, email: str) -> Row | None:
    return await _fetch_one(
        pool, f"SELECT {USER_COLUMNS}, password_hash FROM users WHERE lower(email) = lower(%s)", (email,)
    )


@bounded
async def user_by_id(pool: Database, user_id: int) -> Row | None:
    return await _fetch_one(pool, f"SELECT {USER_COLUMNS} FROM users WHERE id = %s", (user_id,))


@bounded
async def set_user_status(pool: Database, user_id: int, status: str) -> Row | None:
    return await _fetch_one(
        pool,
        f"UPDATE users SET status = %s, updated_at = now() WHERE id = %s RETURNING {USER_COLUMNS}",
        (status, user_id),
    )


@bounded
async def set_password_hash(pool: Database, user_id: int, password_hash: str) -> None:
    await _fetch_one(pool, "UPDATE users SET password_hash = %s WHERE id = %s RETURNING id", (password_hash, user_id))


# -- refresh tokens -------------------------------------------------------------


@bounded
async def store_refresh(pool: Database, jti: str, family: str, user_id: int, expires_at: int) -> None:
    await _fetch_one(
        pool,
        "INSERT INTO refresh_tokens (jti, family, user_id, expires_at) VALUES (%s, %s, %s, to_timestamp(%s))"
        " RETURNING jti",
        (jti, family, user_id, expires_at),
    )


@dataclass(frozen=True, slots=True)
class RefreshUse:
    ok: bool  # first use of a live token
    reused: bool  # already used or revoked: the family must die


@bounded
async def use_refresh(pool: Database, jti: str, family: str) -> RefreshUse:
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


@bounded
async def revoke_family(pool: Database, family: str) -> None:
    await _fetch_one(
        pool,
        "WITH r AS (UPDATE refresh_tokens SET revoked_at = now() WHERE family = %s AND revoked_at IS NULL RETURNING 1)"
        " SELECT count(*) AS n FROM r",
        (family,),
    )


@bounded
async def user_families(pool: Database, user_id: int) -> list[str]:
    rows = await _fetch_all(
        pool,
        "SELECT DISTINCT family FROM refresh_tokens WHERE user_id = %s AND revoked_at IS NULL AND expires_at > now()",
        (user_id,),
    )
    return [r["family"] for r in rows]


# -- rooms ----------------------------------------------------------------------

ROOM_COLUMNS = "r.id, r.name, r.kind, r.owner_id, r.status, r.assistant, r.last_seq, r.created_at, r.updated_at"


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
    return await _fetch_one(pool, f"SELECT {ROOM_COLUMNS} FROM rooms r WHERE r.id = %s", (room_id,))


@bounded
async def room_for_member(pool: Database, room_id: int, user_id: int) -> Row | None:
    """The room with the caller's membership, or None: non-members cannot tell it exists."""
    return await _fetch_one(
        pool,
        f"SELECT {ROOM_COLUMNS}, m.role AS member_role, m.read_seq FROM rooms r"
        " JOIN room_members m ON m.room_id = r.id AND m.user_id = %s WHERE r.id = %s",
        (user_id, room_id),
    )


@dataclass(frozen=True, slots=True)
class JoinRead:
    room: Row | None  # the room with the caller's membership; None: not a member (or no such room)
    history: list[Row]  # messages after since_seq, when a replay was asked and fits the limit
    resync: bool = False  # the gap since since_seq is over the replay limit: nothing read


@bounded
async def join_reads(pool: Database, joins: Sequence[tuple[int, int, int | None]], replay_limit: int) -> list[JoinRead]:
    """For each join ``(room, user, since_seq)``: membership, last_seq and the replay, for many joins at
    once (a reconnect storm re-joins thousands of rooms; ``Batched`` groups them): two queries in all."""
    rows = await _fetch_all(
        pool,
        f"SELECT j.ord, {ROOM_COLUMNS}, m.role AS member_role, m.read_seq"
        " FROM unnest(%s::bigint[], %s::bigint[]) WITH ORDINALITY AS j (room_id, user_id, ord)"
        " JOIN rooms r ON r.id = j.room_id JOIN room_members m ON m.room_id = r.id AND m.user_id = j.user_id",
        ([j[0] for j in joins], [j[1] for j in joins]),
    )
    rooms: dict[int, Row] = {int(r.pop("ord")) - 1: r for r in rows}
    replays: dict[int, tuple[int, int]] = {}  # join index -> (first, last) seqs to replay
    resync: set[int] = set()
    for i, (_, _, since) in enumerate(joins):
        room = rooms.get(i)
        if room is None or since is None or since >= room["last_seq"]:
            continue
        if room["last_seq"] - since > replay_limit:
            resync.add(i)
        else:
            replays[i] = (since + 1, room["last_seq"])
    history: dict[tuple[int, int], Row] = {}
    if replays:
        ranges = sorted({(joins[i][0], first, last) for i, (first, last) in replays.items()})
        for row in await _messages_in_ranges(pool, ranges):
            history[(row["room_id"], row["seq"])] = row
    out = []
    for i, (room_id, _, _) in enumerate(joins):
        first_last = replays.get(i)
        rows_i = (
            [history[(room_id, s)] for s in range(first_last[0], first_last[1] + 1) if (room_id, s) in history]
            if first_last
            else []
        )
        out.append(JoinRead(rooms.get(i), rows_i, i in resync))
    return out


@bounded
async def list_rooms(pool: Database, user_id: int, status: str, limit: int, before_id: int | None) -> list[Row]:
    return await _fetch_all(
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
    row = await _fetch_one(
        pool, f"UPDATE rooms AS r SET {', '.join(sets)} WHERE id = %s RETURNING {ROOM_COLUMNS}", (*params, room_id)
    )
    if row is None:
        raise errors.NotFound("room not found")
    return row


@bounded
async def room_member_ids(pool: Database, room_id: int) -> list[int]:
    rows = await _fetch_all(pool, "SELECT user_id FROM room_members WHERE room_id = %s ORDER BY user_id", (room_id,))
    return [r["user_id"] for r in rows]


@bounded
async def add_member(pool: Database, room_id: int, user_id: int) -> bool:
    try:
        row = await _fetch_one(
            pool,
            "INSERT INTO room_members (room_id, user_id) SELECT %s, id FROM users WHERE id = %s AND status = 'active'"
            " ON CONFLICT DO NOTHING RETURNING user_id",
            (room_id, user_id),
        )
    except psycopg.errors.ForeignKeyViolation:
        raise errors.NotFound("room not found") from None
    if row is None:
        exists = await _fetch_one(pool, "SELECT 1 FROM users WHERE id = %s AND status = 'active'", (user_id,))
        if exists is None:
            raise errors.NotFound("user not found")
        return False  # already a member
    return True


@bounded
async def remove_member(pool: Database, room_id: int, user_id: int) -> bool:
    row = await _fetch_one(
        pool,
        "DELETE FROM room_members WHERE room_id = %s AND user_id = %s AND role <> 'owner' RETURNING user_id",
        (room_id, user_id),
    )
    return row is not None


@bounded
async def set_read(pool: Database, room_id: int, user_id: int, seq: int) -> int | None:
    """Advance the read position (never backwards, never past the last message)."""
    row = await _fetch_one(
        pool,
        "UPDATE room_members m SET read_seq = GREATEST(m.read_seq, LEAST(%s, r.last_seq)) FROM rooms r"
        " WHERE m.room_id = %s AND m.user_id = %s AND r.id = m.room_id RETURNING m.read_seq",
        (seq, room_id, user_id),
    )
    return None if row is None else int(row["read_seq"])


# -- messages -------------------------------------------------------------------


@bounded
async def messages_page(
    pool: Database, room_id: int, after_seq: int | None, before_seq: int | None, limit: int
) -> tuple[list[Row], bool]:
    """Ascending by seq.  Without after_seq: the newest ``limit`` (before before_seq)."""
    if after_seq is not None:
        rows = await _fetch_all(
            pool,
            f"SELECT {MESSAGE_COLUMNS} FROM messages WHERE room_id = %s AND seq > %s"
            " AND (%s::bigint IS NULL OR seq < %s) ORDER BY seq LIMIT %s",
            (room_id, after_seq, before_seq, before_seq, limit + 1),
        )
        return rows[:limit], len(rows) > limit
    rows = await _fetch_all(
        pool,
        f"SELECT {MESSAGE_COLUMNS} FROM messages WHERE room_id = %s"
        " AND (%s::bigint IS NULL OR seq < %s) ORDER BY seq DESC LIMIT %s",
        (room_id, before_seq, before_seq, limit + 1),
    )
    has_more = len(rows) > limit
    return list(reversed(rows[:limit])), has_more


@bounded
async def messages_after(pool: Database, room_id: int, after_seq: int, limit: int) -> list[Row]:
    return await _fetch_all(
        pool,
        f"SELECT {MESSAGE_COLUMNS} FROM messages WHERE room_id = %s AND seq > %s ORDER BY seq LIMIT %s",
        (room_id, after_seq, limit),
    )


async def _messages_in_ranges(pool: Database, ranges: Sequence[tuple[int, int, int]]) -> list[Row]:
    """Messages of several rooms, seqs ``first..last`` of each ``(room, first, last)``: the fan-out's gap fill.

    Answers come with their generation (``g_*`` columns) so their ``stream_end`` can be rebuilt.
    """
    if not ranges:
        return []
    return await _fetch_all(
        pool,
        f"SELECT {', '.join('m.' + c.strip() for c in MESSAGE_COLUMNS.split(','))},"
        " g.stop_reason AS g_stop_reason, g.input_tokens AS g_input_tokens, g.output_tokens AS g_output_tokens,"
        " g.first_token_ms AS g_first_token_ms, g.latency_ms AS g_latency_ms"
        " FROM unnest(%s::bigint[], %s::bigint[], %s::bigint[]) AS r(room_id, first_seq, last_seq)"
        " JOIN messages m ON m.room_id = r.room_id AND m.seq BETWEEN r.first_seq AND r.last_seq"
        " LEFT JOIN generations g ON g.answer_message_id = m.id AND m.role = 'assistant'"
        " ORDER BY m.room_id, m.seq",
        ([r[0] for r in ranges], [r[1] for r in ranges], [r[2] for r in ranges]),
    )


@bounded
async def messages_in_ranges(pool: Database, ranges: Sequence[tuple[int, int, int]]) -> list[Row]:
    """Messages of several rooms, seqs ``first..last`` of each ``(room, first, last)``: the fan-out's gap fill.

    Answers come with their generation (``g_*`` columns) so their ``stream_end`` can be rebuilt.
    """
    return await _messages_in_ranges(pool, ranges)


@bounded
async def changes_after(pool: Database, revs: Sequence[tuple[int, int]], limit: int) -> list[Row]:
    """Per ``(room, revision)``: the messages changed after it, oldest change first, at most ``limit`` each."""
    if not revs:
        return []
    return await _fetch_all(
        pool,
        f"SELECT {', '.join('m.' + c.strip() for c in MESSAGE_COLUMNS.split(','))}"
        " FROM unnest(%s::bigint[], %s::bigint[]) AS r(room_id, after_rev)"
        " CROSS JOIN LATERAL (SELECT * FROM messages WHERE room_id = r.room_id AND edit_rev > r.after_rev"
        "   ORDER BY edit_rev LIMIT %s) m"
        " ORDER BY m.room_id, m.edit_rev",
        ([r[0] for r in revs], [r[1] for r in revs], limit),
    )


@bounded
async def message_by_id(pool: Database, message_id: int) -> Row | None:
    return await _fetch_one(pool, f"SELECT {MESSAGE_COLUMNS} FROM messages WHERE id = %s", (message_id,))


async def _change_message(
    pool: Database, message_id: int, assignments: str, params: Sequence[Any], delete_files: bool = False
) -> Row | None:
    """Edit or tombstone a message and give the change the room's next edit revision (one transaction).

    None when the message is unknown or deleted, also when a delete committed while this change waited
    for the room's row: under READ COMMITTED the first UPDATE re-checks only the locked room row, so the
    second re-checks the message itself (a fresh snapshot) and rolls the revision back if it is gone.
    """
    row = None
    async with transaction(pool) as conn:
        cur = await conn.execute(
            "UPDATE rooms SET edit_rev = rooms.edit_rev + 1 FROM messages m"
            " WHERE m.id = %s AND m.deleted_at IS NULL AND rooms.id = m.room_id RETURNING rooms.edit_rev",
            (message_id,),
        )
        rev = await cur.fetchone()
        if rev is None:
            return None  # unknown or already deleted
        cur = await conn.execute(
            f"UPDATE messages SET {assignments}, edit_rev = %s WHERE id = %s AND deleted_at IS NULL"
            f" RETURNING {MESSAGE_COLUMNS}",
            (*params, rev["edit_rev"], message_id),
        )
        row = await cur.fetchone()
        if row is None:
            raise psycopg.Rollback()  # deleted meanwhile: no revision is used, nothing is announced
        if delete_files:  # the blob goes with its message: marked here, removed by the sweeper
            await conn.execute(
                "UPDATE files SET deleted_at = now() WHERE message_id = %s AND deleted_at IS NULL", (message_id,)
            )
    return row


@bounded
async def edit_message(pool: Database, message_id: int, content: str) -> Row | None:
    return await _change_message(pool, message_id, "content = %s, edited_at = now()", (content,))


@bounded
async def delete_message(pool: Database, message_id: int, deleted_by: int | None = None) -> Row | None:
    """Tombstone: the row and its seq stay, the content (and an attachment's blob) goes."""
    return await _change_message(
        pool, message_id, "content = '', data = NULL, deleted_at = now(), deleted_by = %s", (deleted_by,), True
    )


@bounded
async def room_last_seq(pool: Database, room_id: int) -> tuple[int, int]:
    """``(last_seq, edit_rev)`` of a room; (0, 0) for an unknown one."""
    row = await _fetch_one(pool, "SELECT last_seq, edit_rev FROM rooms WHERE id = %s", (room_id,))
    return (int(row["last_seq"]), int(row["edit_rev"])) if row else (0, 0)


@bounded
async def probe_rooms(pool: Database, room_ids: Sequence[int]) -> list[tuple[int, int, int]]:
    """``(room id, last_seq, edit_rev)`` of many rooms in one query (the fan-out's repair probe)."""
    rows = await _fetch_all(pool, "SELECT id, last_seq, edit_rev FROM rooms WHERE id = ANY(%s)", (list(room_ids),))
    return [(int(r["id"]), int(r["last_seq"]), int(r["edit_rev"])) for r in rows]


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
    data: dict[str, Any] | None = None  # kind file / system: the structured payload (messages.data)
    file_id: int | None = None  # kind file: the uploaded file this message attaches (files.message_id)
    mentions_assistant: bool = False  # "@assistant" in the text (rooms in mode "mention" answer it)


@dataclass(frozen=True, slots=True)
class Committed:
    row: Row | None  # the stored message (the original one for a duplicate)
    duplicate: bool = False
    error: errors.ChatdError | None = None
    room: Row | None = None  # {kind, assistant, owner_id} of the room, for the assistant trigger
    answer_owed: bool = False  # an `answers_owed` row exists for it (written now, or still owed for a duplicate)


_COMMIT_ERRORS: dict[str, type[errors.ChatdError]] = {"not_found": errors.NotFound, "archived": errors.Conflict}
_COMMIT_MESSAGES = {"not_found": "room not found", "archived": "room is archived"}


@bounded
async def commit_batch(pool: Database, batch: Sequence[PendingMessage]) -> list[Committed]:
    """Store a batch in ONE round trip (``chatd_commit_messages``, sql/0012); per-room seqs stay gap-free.

    Rooms are locked in id order (no deadlock between concurrent batches); with
    the room rows locked, duplicates of a client_msg_id are found before seqs
    are assigned, so a retry never burns a seq.  A prompt the assistant must
    answer gets an ``answers_owed`` row in the same transaction: an acked prompt
    is never forgotten, whatever happens between the commit and the enqueue.  A
    duplicate whose answer is still owed says so (its retry re-enqueues).
    """
    rows = await _fetch_all(
        pool,
        "SELECT * FROM chatd_commit_messages(%s::bigint[], %s::bigint[], %s::text[], %s::text[], %s::text[],"
        " %s::text[], %s::bigint[], %s::text[]::jsonb[], %s::bigint[], %s::boolean[])",
        (
            [m.room_id for m in batch],
            [m.sender_id for m in batch],
            [m.role for m in batch],
            [m.kind for m in batch],
            [m.content for m in batch],
            [m.client_msg_id for m in batch],
            [m.reply_to_id for m in batch],
            [json.dumps(m.data) if m.data is not None else None for m in batch],
            [m.file_id for m in batch],
            [m.mentions_assistant for m in batch],
        ),
    )
    results = []
    for row in rows:
        outcome = row.pop("outcome")
        owed = bool(row.pop("answer_owed"))
        row.pop("ord")
        room = {
            "kind": row.pop("room_kind"),
            "assistant": row.pop("room_assistant"),
            "owner_id": row.pop("room_owner_id"),
        }
        if outcome in _COMMIT_ERRORS:
            results.append(Committed(None, error=_COMMIT_ERRORS[outcome](_COMMIT_MESSAGES[outcome])))
        else:
            results.append(Committed(row, duplicate=outcome != "stored", room=room, answer_owed=owed))
    return results


# -- assistant ------------------------------------------------------------------


_ANSWER_SQL = (
    f"SELECT {', '.join('m.' + c.strip() for c in MESSAGE_COLUMNS.split(','))},"
    " g.stop_reason AS g_stop_reason, g.input_tokens AS g_input_tokens, g.output_tokens AS g_output_tokens,"
    " g.first_token_ms AS g_first_token_ms, g.latency_ms AS g_latency_ms, g.model AS g_model"
    " FROM messages m LEFT JOIN generations g ON g.answer_message_id = m.id"
    " WHERE m.reply_to_id = %s AND m.role = 'assistant' AND m.superseded_at IS NULL"
)


@bounded
async def answer_for(pool: Database, prompt_id: int) -> Row | None:
    """The live answer to a prompt, with its generation (``g_*`` columns, for ``stream_end_from_row``)."""
    return await _fetch_one(pool, _ANSWER_SQL, (prompt_id,))


@dataclass(frozen=True, slots=True)
class AnswerInputs:
    """What a claimed job needs from Postgres before it streams."""

    prompt: Row | None
    room: Row | None
    answer: Row | None  # the live answer, if one is stored already
    history: list[Row]  # text messages up to the prompt, ascending, without deleted or superseded ones
    reserved_id: int  # an id for the answer (reserved whether it is used or not)


@bounded
async def answer_inputs(pool: Database, jobs: Sequence[tuple[int, int]], history_limit: int) -> list[AnswerInputs]:
    """For each ``(prompt id, room id)``: prompt, room, stored answer, recent history and a reserved
    answer id.  Five statements for the whole list, in ONE round trip (pipeline mode): a burst of
    claimed jobs costs Postgres a few statements, not five per job."""
    prompt_ids, room_ids = [p for p, _ in jobs], [r for _, r in jobs]
    columns = ", ".join("h." + c.strip() for c in MESSAGE_COLUMNS.split(","))
    async with connection(pool) as conn:
        async with conn.pipeline():
            prompts = await conn.execute(f"SELECT {MESSAGE_COLUMNS} FROM messages WHERE id = ANY(%s)", (prompt_ids,))
            rooms = await conn.execute(f"SELECT {ROOM_COLUMNS} FROM rooms r WHERE r.id = ANY(%s)", (room_ids,))
            answers = await conn.execute(
                _ANSWER_SQL.replace("m.reply_to_id = %s", "m.reply_to_id = ANY(%s)"), (prompt_ids,)
            )
            history = await conn.execute(
                f"SELECT j.prompt_id AS for_prompt, {columns}"
                " FROM unnest(%s::bigint[], %s::bigint[]) AS j(prompt_id, room_id)"
                " CROSS JOIN LATERAL (SELECT * FROM messages m WHERE m.room_id = j.room_id"
                "   AND m.seq <= (SELECT seq FROM messages WHERE id = j.prompt_id) AND m.deleted_at IS NULL"
                "   AND m.superseded_at IS NULL AND m.kind = 'text' ORDER BY m.seq DESC LIMIT %s) h",
                (prompt_ids, room_ids, history_limit),
            )
            reserved = await conn.execute(
                "SELECT nextval(pg_get_serial_sequence('messages', 'id')) AS id FROM generate_series(1, %s)",
                (len(jobs),),
            )
        by_prompt = {r["id"]: r for r in await prompts.fetchall()}
        by_room = {r["id"]: r for r in await rooms.fetchall()}
        answered = {r["reply_to_id"]: r for r in await answers.fetchall()}
        histories: dict[int, list[Row]] = {}
        for r in await history.fetchall():
            histories.setdefault(r.pop("for_prompt"), []).append(r)
        ids = [int(r["id"]) for r in await reserved.fetchall()]
    return [
        AnswerInputs(by_prompt.get(p), by_room.get(r), answered.get(p), list(reversed(histories.get(p, []))), i)
        for (p, r), i in zip(jobs, ids, strict=True)
    ]


@bounded
async def settle_answer(pool: Database, prompt_id: int) -> bool:
    """No answer is owed any more: refused (busy, quota), cancelled while queued, or dropped.

    True when one was owed."""
    row = await _fetch_one(pool, "DELETE FROM answers_owed WHERE prompt_id = %s RETURNING prompt_id", (prompt_id,))
    return row is not None


@bounded
async def answers_owed(pool: Database, older_than_s: float, limit: int) -> list[Row]:
    """Prompts still owed an answer for longer than ``older_than_s`` (oldest first): the sweeper's input."""
    return await _fetch_all(
        pool,
        "SELECT prompt_id, room_id, requester_id FROM answers_owed"
        " WHERE created_at < now() - make_interval(secs => %s) ORDER BY created_at LIMIT %s",
        (older_than_s, limit),
    )


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


@bounded
async def persist_answer(
    pool: Database,
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
        await conn.execute("DELETE FROM answers_owed WHERE prompt_id = %s", (prompt_id,))  # answered
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


@bounded
async def tokens_used_today(pool: Database, user_id: int) -> int:
    row = await _fetch_one(
        pool,
        "SELECT COALESCE(sum(input_tokens + output_tokens), 0) AS n FROM usage_daily"
        " WHERE user_id = %s AND day = (now() AT TIME ZONE 'UTC')::date",
        (user_id,),
    )
    return int(row["n"]) if row else 0


# -- retrieval (chatd.retrieval) -----------------------------------------------------

_CAPABILITIES_SQL = """
SELECT
    (SELECT n.nspname FROM pg_extension e JOIN pg_namespace n ON n.oid = e.extnamespace
      WHERE e.extname = 'vector') AS vector_schema,
    (SELECT e.extversion FROM pg_extension e WHERE e.extname = 'vector') AS vector_version,
    (SELECT n.nspname FROM pg_extension e JOIN pg_namespace n ON n.oid = e.extnamespace
      WHERE e.extname = 'pg_trgm') AS trgm_schema,
    to_regclass('message_embeddings') IS NOT NULL AS embeddings_table,
    (SELECT a.atttypmod FROM pg_attribute a
      WHERE a.attrelid = to_regclass('message_embeddings') AND a.attname = 'embedding') AS embeddings_dim
"""

# Messages waiting for an embedding (new, or edited since embedded), oldest first.
_PENDING_SQL = """
SELECT m.id, m.room_id, m.content
  FROM messages m
  JOIN rooms r ON r.id = m.room_id AND r.kind = 'assistant'
  LEFT JOIN message_embeddings e ON e.message_id = m.id
 WHERE m.id > %s AND m.deleted_at IS NULL AND m.role IN ('user', 'assistant') AND btrim(m.content) <> ''
   AND (e.message_id IS NULL OR m.edited_at > e.embedded_at)
 ORDER BY m.id
 LIMIT %s
"""

_INSERT_SQL = """
INSERT INTO message_embeddings (message_id, room_id, embedding)
SELECT u.id, u.room_id, u.embedding::{vector}
  FROM unnest(%s::bigint[], %s::bigint[], %s::text[]) AS u (id, room_id, embedding)
ON CONFLICT (message_id) DO UPDATE SET embedding = EXCLUDED.embedding, embedded_at = now()
"""

# The CTE is materialized so that an HNSW iterative scan (which may return
# rows slightly out of order) is re-sorted exactly.
_VECTOR_SQL = """
WITH hits AS MATERIALIZED (
    SELECT m.id, m.seq, m.role, m.content, m.created_at, e.embedding OPERATOR({schema}.<=>) %s::{vector} AS distance
      FROM message_embeddings e
      JOIN messages m ON m.id = e.message_id
     WHERE e.room_id = %s AND m.room_id = %s AND m.seq < %s AND m.deleted_at IS NULL
       AND m.superseded_at IS NULL AND m.status = 'final'
     ORDER BY e.embedding OPERATOR({schema}.<=>) %s::{vector}
     LIMIT %s
)
SELECT id, seq, role, content, created_at, 1 - distance AS score FROM hits ORDER BY distance, seq DESC
"""

# {hits}: the number of query words found in the content, {any_hit}: at least one found (one ILIKE
# per word, so that a trigram index can serve each); {trgm}: pg_trgm's word_similarity, or 0.
_TEXT_SQL = """
SELECT m.id, m.seq, m.role, m.content, m.created_at,
       ({hits})::float8 / %(n_terms)s
       + ts_rank(m.content_tsv, to_tsquery('simple', %(tsq)s))
       + {trgm_weight} * {trgm} AS score
  FROM messages m
 WHERE m.room_id = %(room_id)s AND m.seq < %(before_seq)s AND m.deleted_at IS NULL
  AND m.superseded_at IS NULL AND m.status = 'final'
   AND m.role IN ('user', 'assistant')
   AND (m.content_tsv @@ to_tsquery('simple', %(tsq)s) OR {any_hit})
 ORDER BY score DESC, m.seq DESC
 LIMIT %(k)s
"""


def _vector_sql(template: str, schema_name: str) -> sql.Composed:
    schema = sql.Identifier(schema_name)
    return sql.SQL(template).format(schema=schema, vector=sql.SQL("{}.vector").format(schema))


@bounded
async def retrieval_capabilities(pool: Database) -> Row:
    """Which extensions and embedding table the database offers."""
    row = await _fetch_one(pool, _CAPABILITIES_SQL)
    assert row is not None
    return row


@bounded
async def take_indexer_lease(pool: Database, holder: str, ttl_s: float) -> bool:
    """The indexing lease (one batch at a time across all instances): True when ``holder`` has it now."""
    row = await _fetch_one(
        pool,
        "INSERT INTO indexer_lease AS l (id, holder, until) VALUES (1, %s, now() + make_interval(secs => %s))"
        " ON CONFLICT (id) DO UPDATE SET holder = EXCLUDED.holder, until = EXCLUDED.until"
        " WHERE l.until < now() OR l.holder = EXCLUDED.holder RETURNING holder",
        (holder, ttl_s),
    )
    return row is not None


@bounded
async def release_indexer_lease(pool: Database, holder: str) -> None:
    await _fetch_one(
        pool, "UPDATE indexer_lease SET until = now() WHERE id = 1 AND holder = %s RETURNING id", (holder,)
    )


@bounded
async def pending_embeddings(pool: Database, after_id: int, batch_size: int) -> tuple[list[Row], int | None]:
    """Messages waiting for an embedding, ids after ``after_id``; and the largest message id when the
    scan reached the end (None otherwise)."""
    async with connection(pool) as conn:
        cur = await conn.execute(_PENDING_SQL, (after_id, batch_size))
        rows = await cur.fetchall()
        max_id: int | None = None
        if len(rows) < batch_size:  # the pass reached the end
            cur = await conn.execute("SELECT coalesce(max(id), 0) AS max_id FROM messages")
            top = await cur.fetchone()
            max_id = int(top["max_id"]) if top else 0
    return rows, max_id


@bounded
async def store_embeddings(
    pool: Database, vector_schema: str, holder: str, rows: Sequence[Row], vectors: Sequence[str]
) -> None:
    """Write a batch's embeddings and give the indexing lease back."""
    async with transaction(pool) as conn:
        if rows:
            await conn.execute(
                _vector_sql(_INSERT_SQL, vector_schema),
                ([r["id"] for r in rows], [r["room_id"] for r in rows], list(vectors)),
            )
        await conn.execute("UPDATE indexer_lease SET until = now() WHERE id = 1 AND holder = %s", (holder,))


@bounded
async def vector_search(
    pool: Database, vector_schema: str, iterative: bool, literal: str, room_id: int, before_seq: int, k: int
) -> list[Row]:
    async with transaction(pool) as conn:
        if iterative:
            # Keep scanning the graph until k rows pass the room filter (pgvector >= 0.8).
            await conn.execute("SET LOCAL hnsw.iterative_scan = relaxed_order")
        else:
            await conn.execute("SET LOCAL hnsw.ef_search = 400")
        cur = await conn.execute(
            _vector_sql(_VECTOR_SQL, vector_schema), (literal, room_id, room_id, before_seq, literal, k)
        )
        return await cur.fetchall()


@bounded
async def text_search(
    pool: Database,
    trgm_schema: str | None,
    trgm_weight: float,
    patterns: Sequence[str],
    tsquery: str,
    query: str,
    room_id: int,
    before_seq: int,
    k: int,
) -> list[Row]:
    """Full-text + substring (+ trigram) ranking; ``patterns`` are ILIKE patterns, one per query word."""
    if trgm_schema is not None:
        trgm: sql.Composable = sql.SQL("{}.word_similarity(%(query)s, m.content)").format(sql.Identifier(trgm_schema))
    else:
        trgm = sql.SQL("0")
    likes = [sql.SQL("m.content ILIKE {}").format(sql.Placeholder(f"p{i}")) for i in range(len(patterns))]
    statement = sql.SQL(_TEXT_SQL).format(
        hits=sql.SQL(" + ").join(sql.SQL("({})::int").format(like) for like in likes),
        any_hit=sql.SQL(" OR ").join(likes),
        trgm=trgm,
        trgm_weight=sql.Literal(trgm_weight),
    )
    params: dict[str, Any] = {f"p{i}": p for i, p in enumerate(patterns)}
    params.update(tsq=tsquery, n_terms=len(patterns), query=query, room_id=room_id, before_seq=before_seq, k=k)
    async with connection(pool) as conn:
        cur = await conn.execute(statement, params)
        return await cur.fetchall()


# -- accounts and the user directory (issue 11) ----------------------------------------


@bounded
async def update_user_name(pool: Database, user_id: int, name: str) -> Row | None:
    return await _fetch_one(
        pool,
        f"UPDATE users SET name = %s, updated_at = now() WHERE id = %s AND status = 'active' RETURNING {USER_COLUMNS}",
        (name, user_id),
    )


@bounded
async def password_hash_of(pool: Database, user_id: int) -> str | None:
    row = await _fetch_one(pool, "SELECT password_hash FROM users WHERE id = %s AND status = 'active'", (user_id,))
    return None if row is None else row["password_hash"]


@bounded
async def revoke_families_except(pool: Database, user_id: int, keep: str | None) -> list[str]:
    """Revoke every live session of a user but ``keep``; the revoked families."""
    rows = await _fetch_all(
        pool,
        "WITH r AS (UPDATE refresh_tokens SET revoked_at = now() WHERE user_id = %s AND revoked_at IS NULL"
        " AND (%s::text IS NULL OR family <> %s) RETURNING family) SELECT DISTINCT family FROM r",
        (user_id, keep, keep),
    )
    return sorted({r["family"] for r in rows})


@bounded
async def lookup_users(pool: Database, query: str, limit: int) -> list[Row]:
    """Active users by exact email (case-insensitive), else by name prefix: id and name only."""
    rows = await _fetch_all(
        pool, "SELECT id, name FROM users WHERE lower(email) = lower(%s) AND status = 'active'", (query,)
    )
    if rows or "@" in query:
        return rows
    pattern = query.lower().replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
    return await _fetch_all(
        pool,
        "SELECT id, name FROM users WHERE lower(name) LIKE %s AND status = 'active' ORDER BY lower(name), id LIMIT %s",
        (pattern, limit),
    )


@bounded
async def room_roster(pool: Database, room_id: int, after_user_id: int, limit: int) -> list[Row]:
    """Members of a room by user id, with names (deleted accounts keep their row, status 'deleted')."""
    return await _fetch_all(
        pool,
        "SELECT u.id, u.name, u.status, m.role, m.read_seq, m.joined_at FROM room_members m"
        " JOIN users u ON u.id = m.user_id WHERE m.room_id = %s AND m.user_id > %s ORDER BY m.user_id LIMIT %s",
        (room_id, after_user_id, limit),
    )


@bounded
async def user_names(pool: Database, user_ids: Sequence[int]) -> dict[int, str]:
    rows = await _fetch_all(pool, "SELECT id, name FROM users WHERE id = ANY(%s)", (list(user_ids),))
    return {int(r["id"]): r["name"] for r in rows}


# -- files ------------------------------------------------------------------------------

FILE_COLUMNS = (
    "id, room_id, uploader_id, message_id, storage_key, name, content_type, size, sha256, width, height,"
    " created_at, deleted_at, purged_at"
)


@bounded
async def create_file(
    pool: Database,
    *,
    room_id: int,
    uploader_id: int,
    storage_key: str,
    name: str,
    content_type: str,
    size: int,
    sha256: str,
    width: int | None,
    height: int | None,
) -> Row:
    row = await _fetch_one(
        pool,
        "INSERT INTO files (room_id, uploader_id, storage_key, name, content_type, size, sha256, width, height)"
        f" VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s) RETURNING {FILE_COLUMNS}",
        (room_id, uploader_id, storage_key, name, content_type, size, sha256, width, height),
    )
    assert row is not None
    return row


@bounded
async def file_for_member(pool: Database, file_id: int, user_id: int) -> Row | None:
    """A live attachment (its message committed and not deleted) of a room the caller belongs to."""
    return await _fetch_one(
        pool,
        f"SELECT {', '.join('f.' + c.strip() for c in FILE_COLUMNS.split(','))} FROM files f"
        " JOIN room_members m ON m.room_id = f.room_id AND m.user_id = %s"
        " WHERE f.id = %s AND f.message_id IS NOT NULL AND f.deleted_at IS NULL AND f.purged_at IS NULL",
        (user_id, file_id),
    )


@bounded
async def files_to_sweep(pool: Database, orphan_after_s: float, limit: int) -> list[Row]:
    """Blobs to remove: of deleted messages, or uploads never attached to a message within ``orphan_after_s``."""
    return await _fetch_all(
        pool,
        f"SELECT {FILE_COLUMNS} FROM files WHERE purged_at IS NULL"
        " AND (deleted_at IS NOT NULL OR (message_id IS NULL AND created_at < now() - make_interval(secs => %s)))"
        " ORDER BY id LIMIT %s",
        (orphan_after_s, limit),
    )


@bounded
async def mark_files_purged(pool: Database, file_ids: Sequence[int]) -> None:
    await _fetch_one(
        pool,
        "WITH p AS (UPDATE files SET purged_at = now(), deleted_at = coalesce(deleted_at, now())"
        " WHERE id = ANY(%s) RETURNING 1) SELECT count(*) AS n FROM p",
        (list(file_ids),),
    )


@bounded
async def forget_file(pool: Database, file_id: int) -> None:
    """An upload whose message was refused: its row goes (the caller removes the blob)."""
    await _fetch_one(pool, "DELETE FROM files WHERE id = %s AND message_id IS NULL RETURNING id", (file_id,))


# -- admin -------------------------------------------------------------------------------


@bounded
async def write_audit(
    pool: Database,
    actor_id: int,
    action: str,
    target: str | None,
    details: dict[str, Any] | None,
    ip: str | None,
    status: int,
) -> None:
    await _fetch_one(
        pool,
        "INSERT INTO audit_log (actor_id, action, target, details, ip, status) VALUES (%s, %s, %s, %s, %s, %s)"
        " RETURNING id",
        (actor_id, action, target, Jsonb(details) if details is not None else None, ip, status),
    )


@bounded
async def audit_page(pool: Database, before_id: int | None, limit: int) -> list[Row]:
    return await _fetch_all(
        pool,
        "SELECT id, actor_id, action, target, details, ip, status, created_at FROM audit_log"
        " WHERE (%s::bigint IS NULL OR id < %s) ORDER BY id DESC LIMIT %s",
        (before_id, before_id, limit),
    )


@bounded
async def admin_stats(pool: Database, start: dt.datetime, end: dt.datetime) -> Row:
    """Totals and per-day figures over ``[start, end)`` in one round trip."""
    row = await _fetch_one(
        pool,
        """
SELECT
  (SELECT count(*) FROM users) AS users,
  (SELECT count(*) FROM users WHERE status = 'active') AS users_active_accounts,
  (SELECT count(DISTINCT sender_id) FROM messages WHERE created_at >= %(s)s AND created_at < %(e)s
     AND sender_id IS NOT NULL) AS active_users,
  (SELECT count(*) FROM rooms) AS rooms,
  (SELECT count(*) FROM rooms WHERE status = 'active') AS rooms_active,
  (SELECT coalesce(json_agg(x ORDER BY x.day), '[]') FROM (
     SELECT to_char((created_at AT TIME ZONE 'UTC')::date, 'YYYY-MM-DD') AS day, count(*) AS messages
       FROM messages WHERE created_at >= %(s)s AND created_at < %(e)s GROUP BY 1) x) AS messages_per_day,
  (SELECT count(*) FROM generations WHERE created_at >= %(s)s AND created_at < %(e)s) AS assistant_answers,
  (SELECT coalesce(json_agg(x ORDER BY x.tokens DESC), '[]') FROM (
     SELECT model, sum(input_tokens + output_tokens) AS tokens, count(*) AS answers FROM generations
      WHERE created_at >= %(s)s AND created_at < %(e)s GROUP BY model) x) AS tokens_by_model,
  (SELECT coalesce(json_agg(x ORDER BY x.tokens DESC), '[]') FROM (
     SELECT user_id, sum(input_tokens + output_tokens) AS tokens FROM usage_daily
      WHERE day >= (%(s)s AT TIME ZONE 'UTC')::date AND day <= (%(e)s AT TIME ZONE 'UTC')::date
      GROUP BY user_id ORDER BY 2 DESC LIMIT 50) x) AS tokens_by_user,
  (SELECT coalesce(json_agg(x ORDER BY x.tokens DESC), '[]') FROM (
     SELECT room_id, sum(input_tokens + output_tokens) AS tokens FROM usage_daily
      WHERE day >= (%(s)s AT TIME ZONE 'UTC')::date AND day <= (%(e)s AT TIME ZONE 'UTC')::date
      GROUP BY room_id ORDER BY 2 DESC LIMIT 50) x) AS tokens_by_room,
  (SELECT coalesce(json_agg(x ORDER BY x.day), '[]') FROM (
     SELECT to_char(day, 'YYYY-MM-DD') AS day, sum(input_tokens + output_tokens) AS tokens, sum(answers) AS answers
       FROM usage_daily WHERE day >= (%(s)s AT TIME ZONE 'UTC')::date AND day <= (%(e)s AT TIME ZONE 'UTC')::date
      GROUP BY day) x) AS tokens_per_day,
  (SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY first_token_ms) FROM generations
    WHERE created_at >= %(s)s AND created_at < %(e)s AND first_token_ms IS NOT NULL) AS first_token_p50_ms,
  (SELECT percentile_cont(0.95) WITHIN GROUP (ORDER BY first_token_ms) FROM generations
    WHERE created_at >= %(s)s AND created_at < %(e)s AND first_token_ms IS NOT NULL) AS first_token_p95_ms
""",
        {"s": start, "e": end},
    )
    assert row is not None
    return row


@bounded
async def admin_users(
    pool: Database, query: str | None, status: str | None, before_id: int | None, limit: int
) -> list[Row]:
    pattern = None
    if query:
        pattern = "%" + query.lower().replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
    return await _fetch_all(
        pool,
        f"SELECT {USER_COLUMNS} FROM users WHERE (%s::text IS NULL OR lower(email) LIKE %s OR lower(name) LIKE %s)"
        " AND (%s::text IS NULL OR status = %s) AND (%s::bigint IS NULL OR id < %s) ORDER BY id DESC LIMIT %s",
        (pattern, pattern, pattern, status, status, before_id, before_id, limit),
    )


@bounded
async def set_user_role(pool: Database, user_id: int, role: str) -> Row | None:
    return await _fetch_one(
        pool,
        f"UPDATE users SET role = %s, updated_at = now() WHERE id = %s RETURNING {USER_COLUMNS}",
        (role, user_id),
    )


@bounded
async def unban_user(pool: Database, user_id: int) -> Row | None:
    """banned -> active; None for an unknown user (a deleted account stays deleted: Conflict)."""
    row = await _fetch_one(pool, f"SELECT {USER_COLUMNS} FROM users WHERE id = %s", (user_id,))
    if row is None:
        return None
    if row["status"] == "deleted":
        raise errors.Conflict("the account was deleted by its owner")
    return await set_user_status(pool, user_id, "active")


@bounded
async def admin_room_messages(pool: Database, room_id: int, before_seq: int | None, limit: int) -> list[Row]:
    """A room's log for admins: deleted messages too, with who deleted them (newest first)."""
    return await _fetch_all(
        pool,
        f"SELECT {MESSAGE_COLUMNS}, deleted_by FROM messages WHERE room_id = %s"
        " AND (%s::bigint IS NULL OR seq < %s) ORDER BY seq DESC LIMIT %s",
        (room_id, before_seq, before_seq, limit),
    )


@bounded
async def active_room_ids(pool: Database) -> list[int]:
    rows = await _fetch_all(pool, "SELECT id FROM rooms WHERE status = 'active' ORDER BY id")
    return [int(r["id"]) for r in rows]


@bounded
async def active_user_ids(pool: Database) -> list[int]:
    rows = await _fetch_all(pool, "SELECT id FROM users WHERE status = 'active' ORDER BY id")
    return [int(r["id"]) for r in rows]


@bounded
async def usage_of(pool: Database, user_id: int, days: int) -> list[Row]:
    return await _fetch_all(
        pool,
        "SELECT to_char(day, 'YYYY-MM-DD') AS day, sum(answers)::int AS answers,"
        " sum(input_tokens)::bigint AS input_tokens, sum(output_tokens)::bigint AS output_tokens FROM usage_daily"
        " WHERE user_id = %s AND day > (now() AT TIME ZONE 'UTC')::date - %s GROUP BY day ORDER BY day DESC",
        (user_id, days),
    )


# -- search (chatd.search) --------------------------------------------------------------

# The caller's rooms (or one of them), resolved once; messages of those rooms only.
_SEARCH_ROOMS = (
    "SELECT room_id FROM room_members WHERE user_id = %(user_id)s AND (%(room_id)s::bigint IS NULL"
    " OR room_id = %(room_id)s)"
)

# Candidates: full text ('simple' config, prefix terms, so Korean particles stay attached: '서울:*' finds
# '서울에서') OR substring for terms of 3+ characters (ILIKE, served by the pg_trgm index; a 2-character
# pattern has no trigram, and one unindexable branch would turn the whole OR into a scan of every row).
# The newest CANDIDATES of them are ranked by share of terms found (any length) + ts_rank (+ trigram
# word similarity), newest first among equals.
SEARCH_CANDIDATES = 1000
# Up to this many rooms in scope, candidates are read room by room (newest first, through the room's seq
# index); beyond it, newest first over the whole table (the indexes).  Postgres cannot tell which is cheaper:
# it assumes the caller's rooms are spread evenly over the table, so for a member of 20 rooms out of 1000
# it walks the whole table backwards (300 ms over 1M messages instead of 20).
SEARCH_PER_ROOM_MAX = 100
_SEARCH_MATCH = "(m.content_tsv @@ to_tsquery('simple', %(tsq)s) OR {indexed_hit})"
_CANDIDATES_GLOBAL = (
    """
    SELECT m.id FROM messages m
     WHERE m.room_id IN ("""
    + _SEARCH_ROOMS
    + """) AND """
    + _SEARCH_MATCH
    + """
     ORDER BY m.id DESC
     LIMIT %(candidates)s"""
)
_CANDIDATES_PER_ROOM = (
    """
    SELECT x.id FROM ("""
    + _SEARCH_ROOMS
    + """) r
     CROSS JOIN LATERAL (SELECT m.id FROM messages m WHERE m.room_id = r.room_id AND """
    + _SEARCH_MATCH
    + """
                          ORDER BY m.seq DESC LIMIT %(candidates)s) x
     ORDER BY x.id DESC
     LIMIT %(candidates)s"""
)
_SEARCH_TEXT_SQL = """
WITH candidates AS MATERIALIZED ({candidates}
)
SELECT m.id, m.room_id, m.seq, m.sender_id, m.role, m.kind, m.content, m.created_at,
       ({hits})::float8 / %(n_terms)s
       + ts_rank(m.content_tsv, to_tsquery('simple', %(tsq)s))
       + 0.3 * {trgm} AS score
  FROM candidates c JOIN messages m ON m.id = c.id
 WHERE m.deleted_at IS NULL AND m.superseded_at IS NULL AND m.kind IN ('text', 'file')
 ORDER BY score DESC, m.id DESC
 LIMIT %(limit)s OFFSET %(offset)s
"""

_SEARCH_VECTOR_SQL = (
    """
WITH hits AS MATERIALIZED (
    SELECT m.id, m.room_id, m.seq, m.sender_id, m.role, m.kind, m.content, m.created_at,
           e.embedding OPERATOR({schema}.<=>) %(vec)s::{vector} AS distance
      FROM message_embeddings e
      JOIN messages m ON m.id = e.message_id
     WHERE e.room_id IN ("""
    + _SEARCH_ROOMS
    + """)
       AND m.deleted_at IS NULL AND m.superseded_at IS NULL
     ORDER BY e.embedding OPERATOR({schema}.<=>) %(vec)s::{vector}
     LIMIT %(k)s
)
SELECT id, room_id, seq, sender_id, role, kind, content, created_at, 1 - distance AS score
  FROM hits ORDER BY distance, id DESC LIMIT %(limit)s OFFSET %(offset)s
"""
)


@bounded
async def search_text(
    pool: Database,
    *,
    trgm_schema: str | None,
    patterns: Sequence[str],
    tsquery: str,
    query: str,
    user_id: int,
    room_id: int | None,
    limit: int,
    offset: int,
) -> list[Row]:
    if trgm_schema is not None:
        trgm: sql.Composable = sql.SQL("{}.word_similarity(%(query)s, m.content)").format(sql.Identifier(trgm_schema))
    else:
        trgm = sql.SQL("0")
    likes = [sql.SQL("m.content ILIKE {}").format(sql.Placeholder(f"p{i}")) for i in range(len(patterns))]
    # '%abc%' has a trigram (the pattern is %term% with LIKE's wildcards escaped)
    indexed = [like for like, p in zip(likes, patterns, strict=True) if trgm_schema and len(p) >= 5]
    async with connection(pool) as conn:
        if room_id is not None:
            per_room = True
        else:
            cur = await conn.execute("SELECT count(*) AS n FROM room_members WHERE user_id = %s", (user_id,))
            counted = await cur.fetchone()
            per_room = counted is not None and counted["n"] <= SEARCH_PER_ROOM_MAX
    indexed_hit = sql.SQL(" OR ").join(indexed) if indexed else sql.SQL("false")
    statement = sql.SQL(_SEARCH_TEXT_SQL).format(
        candidates=sql.SQL(_CANDIDATES_PER_ROOM if per_room else _CANDIDATES_GLOBAL).format(indexed_hit=indexed_hit),
        hits=sql.SQL(" + ").join(sql.SQL("({})::int").format(like) for like in likes),
        trgm=trgm,
    )
    params: dict[str, Any] = {f"p{i}": p for i, p in enumerate(patterns)}
    params.update(
        tsq=tsquery,
        n_terms=len(patterns),
        query=query,
        user_id=user_id,
        room_id=room_id,
        limit=limit,
        offset=offset,
        candidates=SEARCH_CANDIDATES,
    )
    async with connection(pool) as conn:
        # Never prepared: a generic plan cannot see the patterns, so it cannot pick the trigram index
        # (seconds instead of milliseconds over 1M rows).
        cur = await conn.execute(statement, params, prepare=False)
        return await cur.fetchall()


@bounded
async def search_vector(
    pool: Database,
    *,
    vector_schema: str,
    iterative: bool,
    literal: str,
    user_id: int,
    room_id: int | None,
    limit: int,
    offset: int,
) -> list[Row]:
    async with transaction(pool) as conn:
        if iterative:  # keep scanning the graph until enough rows pass the rooms filter (pgvector >= 0.8)
            await conn.execute("SET LOCAL hnsw.iterative_scan = relaxed_order")
        else:
            await conn.execute("SET LOCAL hnsw.ef_search = 400")
        cur = await conn.execute(
            _vector_sql(_SEARCH_VECTOR_SQL, vector_schema),
            {
                "vec": literal,
                "user_id": user_id,
                "room_id": room_id,
                "k": limit + offset,
                "limit": limit,
                "offset": offset,
            },
            prepare=False,  # see search_text
        )
        return await cur.fetchall()


def iso(value: dt.datetime | None) -> str | None:
    return protocol.iso(value)
