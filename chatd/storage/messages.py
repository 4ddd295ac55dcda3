"""The message log in Postgres: each room's gap-free seqs and edit revisions.

The group commit (``commit_batch``: one round trip through
``chatd_commit_messages``), history pages, the reads joins and the fan-out's
repair use (``join_reads``, ``messages_in_ranges``, ``changes_after``, the
``probe_rooms`` probe), and edits and tombstones, which take the room's next
``edit_rev`` in the same transaction, as do reaction changes (``react``).  ``join_reads`` is here rather than in
``rooms`` because its cost is the replay: it shares the range read with the
fan-out's gap fill.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import psycopg

from chatd.core import errors
from chatd.storage.db import Database, Row, bounded, connection, fetch_all, fetch_one, transaction
from chatd.storage.rooms import ROOM_COLUMNS

MESSAGE_COLUMNS = (
    "id, room_id, seq, sender_id, role, kind, content, client_msg_id, reply_to_id, created_at, edited_at, deleted_at,"
    " status, superseded_at, edit_rev, data, reactions"
)


@dataclass(frozen=True, slots=True)
class JoinRead:
    room: Row | None  # the room with the caller's membership; None: not a member (or no such room)
    history: list[Row]  # messages after since_seq, when a replay was asked and fits the limit
    resync: bool = False  # the gap since since_seq is over the replay limit: nothing read
    epoch: str = ""  # which history of the database the seqs belong to (EPOCH_SQL)
    edit_rev: int = 0  # the room's edit revision, read with last_seq


# The history a seq belongs to: the cluster (its system identifier: a restore into a new cluster changes it)
# and the WAL timeline (a point-in-time restore, or the promotion of a replica that may lack the newest
# commits, moves it on).  Seqs of one room are comparable only within one epoch.
EPOCH_SQL = "left(md5(%s || '/' || substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8)), 12)"


async def _identity(pool: Database) -> str:
    """The cluster's system identifier, read once per worker: pg_control_system() reads a file, which a
    checkpoint can make fail for a moment (then this join is answered `unavailable` and retried)."""
    for _ in range(_IDENTITY_TRIES):
        if pool.identity is not None:
            return pool.identity
        async with connection(pool) as conn:
            try:
                cur = await conn.execute("SELECT system_identifier::text AS id FROM pg_control_system()")
                row = await cur.fetchone()
            except psycopg.Error:  # seen: "could not open file .../pg_control: Permission denied", once
                await asyncio.sleep(0.05)
                continue
        if row is not None:
            pool.identity = str(row["id"])
    if pool.identity is None:
        raise errors.Unavailable("database identity unreadable, try again")
    return pool.identity


_IDENTITY_TRIES = 5


@bounded
async def join_reads(pool: Database, joins: Sequence[tuple[int, int, int | None]], replay_limit: int) -> list[JoinRead]:
    """For each join ``(room, user, since_seq)``: membership, last_seq and the replay, for many joins at
    once (a reconnect storm re-joins thousands of rooms; ``Batched`` groups them): two queries in all."""
    rows = await fetch_all(
        pool,
        f"SELECT j.ord, {ROOM_COLUMNS}, m.role AS member_role, m.read_seq, {EPOCH_SQL} AS epoch,"
        " r.edit_rev AS j_edit_rev"
        " FROM unnest(%s::bigint[], %s::bigint[]) WITH ORDINALITY AS j (room_id, user_id, ord)"
        " JOIN rooms r ON r.id = j.room_id JOIN room_members m ON m.room_id = r.id AND m.user_id = j.user_id",
        (await _identity(pool), [j[0] for j in joins], [j[1] for j in joins]),
    )
    rooms: dict[int, Row] = {int(r.pop("ord")) - 1: r for r in rows}
    epochs = {i: str(r.pop("epoch")) for i, r in rooms.items()}
    revs = {i: int(r.pop("j_edit_rev")) for i, r in rooms.items()}
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
        out.append(JoinRead(rooms.get(i), rows_i, i in resync, epochs.get(i, ""), revs.get(i, 0)))
    return out


@bounded
async def messages_page(
    pool: Database, room_id: int, after_seq: int | None, before_seq: int | None, limit: int
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


@bounded
async def messages_after(pool: Database, room_id: int, after_seq: int, limit: int) -> list[Row]:
    return await fetch_all(
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
    return await fetch_all(
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
    return await fetch_all(
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
    return await fetch_one(pool, f"SELECT {MESSAGE_COLUMNS} FROM messages WHERE id = %s", (message_id,))


async def _change_message(
    pool: Database,
    message_id: int,
    assignments: str,
    params: Sequence[Any],
    delete_files: bool = False,
    delete_reactions: bool = False,
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
        if delete_reactions:  # a tombstone carries none (react refuses a deleted message, under the same lock)
            await conn.execute("DELETE FROM message_reactions WHERE message_id = %s", (message_id,))
    return row


@bounded
async def edit_message(pool: Database, message_id: int, content: str) -> Row | None:
    return await _change_message(pool, message_id, "content = %s, edited_at = now()", (content,))


@bounded
async def delete_message(pool: Database, message_id: int, deleted_by: int | None = None) -> Row | None:
    """Tombstone: the row and its seq stay, the content (and an attachment's blob) goes."""
    return await _change_message(
        pool,
        message_id,
        "content = '', data = NULL, reactions = NULL, deleted_at = now(), deleted_by = %s",
        (deleted_by,),
        True,
        delete_reactions=True,
    )


@dataclass(frozen=True, slots=True)
class Reacted:
    row: Row | None  # the message with its aggregated reactions; None: unknown or deleted
    changed: bool  # False: the reaction was there already (add) or was not (remove); no revision used


# messages.reactions: per emoji its count and who (in reaction order), emoji in order of their first reaction.
_AGGREGATE = (
    "SELECT jsonb_agg(jsonb_build_object('emoji', emoji, 'count', n, 'users', users) ORDER BY first, emoji)"
    " FROM (SELECT emoji, count(*) AS n, min(created_at) AS first, jsonb_agg(user_id ORDER BY created_at, user_id)"
    " AS users FROM message_reactions WHERE message_id = %s GROUP BY emoji) e"
)


@bounded
async def react(
    pool: Database, message_id: int, user_id: int, emoji: str, add: bool, per_message: int, per_user: int
) -> Reacted:
    """Add or remove one reaction; the message takes the room's next edit revision with its new aggregate.

    Race-free by the primary key: the same (message, user, emoji) is one row however many add it at once
    (ON CONFLICT DO NOTHING), so nobody counts twice and no concurrent add is lost.  The limits are checked
    after the insert, in the transaction that holds the room's row (every change of the room's messages
    takes it for the revision), so two adds racing for the last place cannot both get it; over a limit the
    transaction rolls back: nothing is stored, no revision is used.
    """
    over: errors.ChatdError | None = None
    unchanged: Row | None = None
    row = None
    async with transaction(pool) as conn:
        cur = await conn.execute(
            "UPDATE rooms SET edit_rev = rooms.edit_rev + 1 FROM messages m"
            " WHERE m.id = %s AND m.deleted_at IS NULL AND rooms.id = m.room_id RETURNING rooms.edit_rev",
            (message_id,),
        )
        rev = await cur.fetchone()
        if rev is None:
            return Reacted(None, False)  # unknown or deleted
        if add:
            cur = await conn.execute(
                "INSERT INTO message_reactions (message_id, user_id, emoji) VALUES (%s, %s, %s)"
                " ON CONFLICT DO NOTHING RETURNING 1",
                (message_id, user_id, emoji),
            )
        else:
            cur = await conn.execute(
                "DELETE FROM message_reactions WHERE message_id = %s AND user_id = %s AND emoji = %s RETURNING 1",
                (message_id, user_id, emoji),
            )
        if await cur.fetchone() is None:  # nothing to do: answered with the message as it is
            cur = await conn.execute(
                f"SELECT {MESSAGE_COLUMNS} FROM messages WHERE id = %s AND deleted_at IS NULL", (message_id,)
            )
            unchanged = await cur.fetchone()
            raise psycopg.Rollback()
        if add:
            cur = await conn.execute(
                "SELECT count(*) AS total, count(*) FILTER (WHERE user_id = %s) AS mine"
                " FROM message_reactions WHERE message_id = %s",
                (user_id, message_id),
            )
            counts = await cur.fetchone()
            assert counts is not None
            if counts["total"] > per_message:
                over = errors.Conflict(f"reaction limit: at most {per_message} reactions on a message")
            elif counts["mine"] > per_user:
                over = errors.Conflict(f"reaction limit: at most {per_user} reactions per user on a message")
            if over is not None:
                raise psycopg.Rollback()
        cur = await conn.execute(
            f"UPDATE messages SET reactions = ({_AGGREGATE}), edit_rev = %s WHERE id = %s AND deleted_at IS NULL"
            f" RETURNING {MESSAGE_COLUMNS}",
            (message_id, rev["edit_rev"], message_id),
        )
        row = await cur.fetchone()
        if row is None:
            raise psycopg.Rollback()  # deleted meanwhile (see _change_message)
    if over is not None:
        raise over
    if row is None:
        return Reacted(unchanged, False)
    return Reacted(row, True)


@bounded
async def room_last_seq(pool: Database, room_id: int) -> tuple[int, int]:
    """``(last_seq, edit_rev)`` of a room; (0, 0) for an unknown one."""
    row = await fetch_one(pool, "SELECT last_seq, edit_rev FROM rooms WHERE id = %s", (room_id,))
    return (int(row["last_seq"]), int(row["edit_rev"])) if row else (0, 0)


@bounded
async def probe_rooms(pool: Database, room_ids: Sequence[int]) -> list[tuple[int, int, int]]:
    """``(room id, last_seq, edit_rev)`` of many rooms in one query (the fan-out's repair probe)."""
    rows = await fetch_all(pool, "SELECT id, last_seq, edit_rev FROM rooms WHERE id = ANY(%s)", (list(room_ids),))
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
    owed_by: tuple[int, ...] = ()  # the assistants that owe it an answer (0: the server's default one; sql/0016)


_COMMIT_ERRORS: dict[str, type[errors.ChatdError]] = {"not_found": errors.NotFound, "archived": errors.Conflict}
_COMMIT_MESSAGES = {"not_found": "room not found", "archived": "room is archived"}


@bounded
async def commit_batch(pool: Database, batch: Sequence[PendingMessage]) -> list[Committed]:
    """Store a batch in ONE round trip (``chatd_commit_messages``, sql/0016); per-room seqs stay gap-free.

    Rooms are locked in id order (no deadlock between concurrent batches); with
    the room rows locked, duplicates of a client_msg_id are found before seqs
    are assigned, so a retry never burns a seq.  A prompt the assistant must
    answer gets an ``answers_owed`` row in the same transaction: an acked prompt
    is never forgotten, whatever happens between the commit and the enqueue.  A
    duplicate whose answer is still owed says so (its retry re-enqueues).
    """
    rows = await fetch_all(
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
        owed_by = tuple(int(a) for a in row.pop("owed_assistants") or ())
        row.pop("ord")
        room = {
            "kind": row.pop("room_kind"),
            "assistant": row.pop("room_assistant"),
            "owner_id": row.pop("room_owner_id"),
        }
        if outcome in _COMMIT_ERRORS:
            results.append(Committed(None, error=_COMMIT_ERRORS[outcome](_COMMIT_MESSAGES[outcome])))
        else:
            results.append(Committed(row, duplicate=outcome != "stored", room=room, answer_owed=owed, owed_by=owed_by))
    return results
