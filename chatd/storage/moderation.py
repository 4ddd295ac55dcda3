"""Moderation in Postgres: reports of messages and their queue, the content rules, bulk redaction.

Reports are one row per (message, reporter): a repeated report finds the first one (the unique index, not
a read-then-write, so two at once are still one).  Content rules change together with
``content_rules_version`` (one transaction), which workers compare with the version they compiled.  A bulk
redaction tombstones one user's messages a batch at a time; each batch is one short transaction holding
the room's row, and each message takes its own edit revision, exactly as ``messages.delete_message``
does for one: live frames, ``changes_after`` and join's ``since_rev`` treat them alike.
"""

from __future__ import annotations

from dataclasses import dataclass

from chatd.core import errors
from chatd.storage.db import Database, Row, bounded, fetch_all, fetch_one, transaction
from chatd.storage.messages import MESSAGE_COLUMNS

REPORT_COLUMNS = (
    "r.id, r.message_id, r.room_id, r.sender_id, r.reporter_id, r.reason, r.status, r.handled_by, r.handled_at,"
    " r.created_at"
)
# What a moderator reads in the queue: the report and the message as it is now.
_QUEUE = (
    f"SELECT {REPORT_COLUMNS}, m.seq AS message_seq, m.content AS message_content, m.deleted_at AS message_deleted_at,"
    " rm.owner_id AS room_owner_id FROM message_reports r JOIN messages m ON m.id = r.message_id"
    " JOIN rooms rm ON rm.id = r.room_id"
)


@dataclass(frozen=True, slots=True)
class Filed:
    report: Row
    created: bool  # False: this user had reported this message already (the first report is returned)


@bounded
async def file_report(pool: Database, message_id: int, reporter_id: int | None, reason: str) -> Filed | None:
    """A report of a live message; None when the message is unknown or deleted.  ``reporter_id`` None: a flag
    raised by a content rule (one per message)."""
    conflict = (
        "(message_id) WHERE reporter_id IS NULL"
        if reporter_id is None
        else ("(message_id, reporter_id) WHERE reporter_id IS NOT NULL")
    )
    async with transaction(pool) as conn:
        cur = await conn.execute(
            "INSERT INTO message_reports AS r (message_id, room_id, sender_id, reporter_id, reason)"
            " SELECT m.id, m.room_id, m.sender_id, %s, %s FROM messages m WHERE m.id = %s AND m.deleted_at IS NULL"
            f" ON CONFLICT {conflict} DO NOTHING RETURNING {REPORT_COLUMNS}",
            (reporter_id, reason, message_id),
        )
        row = await cur.fetchone()
        if row is not None:
            return Filed(row, True)
        cur = await conn.execute(
            f"SELECT {REPORT_COLUMNS} FROM message_reports r WHERE r.message_id = %s"
            " AND r.reporter_id IS NOT DISTINCT FROM %s",
            (message_id, reporter_id),
        )
        row = await cur.fetchone()
    return None if row is None else Filed(row, False)


@bounded
async def report_by_id(pool: Database, report_id: int) -> Row | None:
    return await fetch_one(pool, f"{_QUEUE} WHERE r.id = %s", (report_id,))


@bounded
async def reports_page(
    pool: Database, status: str | None, owner_id: int | None, room_id: int | None, before_id: int | None, limit: int
) -> list[Row]:
    """Newest first.  ``owner_id``: only reports in rooms that user owns (a room owner's queue)."""
    return await fetch_all(
        pool,
        f"{_QUEUE} WHERE (%s::text IS NULL OR r.status = %s) AND (%s::bigint IS NULL OR rm.owner_id = %s)"
        " AND (%s::bigint IS NULL OR r.room_id = %s) AND (%s::bigint IS NULL OR r.id < %s) ORDER BY r.id DESC LIMIT %s",
        (status, status, owner_id, owner_id, room_id, room_id, before_id, before_id, limit),
    )


@bounded
async def settle(pool: Database, report_id: int, status: str, handled_by: int, whole_message: bool) -> list[Row]:
    """Close a report (``whole_message``: and every other open report of its message: the message was
    deleted or its author banned, which answers them all).  Only open reports change: a report closed
    meanwhile by another moderator stays as they left it (an empty answer says so)."""
    return await fetch_all(
        pool,
        "UPDATE message_reports r SET status = %s, handled_by = %s, handled_at = now()"
        " WHERE r.status = 'open' AND (r.id = %s OR (%s AND r.message_id = (SELECT message_id FROM message_reports"
        f" WHERE id = %s))) RETURNING {REPORT_COLUMNS}",
        (status, handled_by, report_id, whole_message, report_id),
    )


# -- content rules -------------------------------------------------------------------------------


@bounded
async def rules(pool: Database) -> tuple[int, list[Row]]:
    """``(version, rules)`` read in one snapshot (a rule added meanwhile is in the next version)."""
    async with transaction(pool) as conn:
        await conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        cur = await conn.execute("SELECT version FROM content_rules_version")
        version = await cur.fetchone()
        cur = await conn.execute(
            "SELECT id, kind, pattern, action, created_by, created_at FROM content_rules ORDER BY id"
        )
        rows = await cur.fetchall()
    return (int(version["version"]) if version else 0), rows


@bounded
async def rules_version(pool: Database) -> int:
    row = await fetch_one(pool, "SELECT version FROM content_rules_version")
    return int(row["version"]) if row else 0


@bounded
async def add_rule(pool: Database, kind: str, pattern: str, action: str, created_by: int, max_rules: int) -> Row:
    async with transaction(pool) as conn:
        # The version row, locked first, serializes changes: the count below cannot race past max_rules.
        cur = await conn.execute("UPDATE content_rules_version SET version = version + 1 RETURNING version")
        version = await cur.fetchone()
        assert version is not None
        cur = await conn.execute("SELECT count(*) AS n FROM content_rules")
        count = await cur.fetchone()
        if count is not None and count["n"] >= max_rules:
            raise errors.Conflict(f"at most {max_rules} content rules")
        cur = await conn.execute(
            "INSERT INTO content_rules (kind, pattern, action, created_by) VALUES (%s, %s, %s, %s)"
            " RETURNING id, kind, pattern, action, created_by, created_at",
            (kind, pattern, action, created_by),
        )
        row = await cur.fetchone()
        assert row is not None
    return row | {"version": int(version["version"])}


@bounded
async def delete_rule(pool: Database, rule_id: int) -> int | None:
    """The new version, or None for an unknown rule (then nothing changes)."""
    async with transaction(pool) as conn:
        cur = await conn.execute("DELETE FROM content_rules WHERE id = %s RETURNING id", (rule_id,))
        if await cur.fetchone() is None:
            return None
        cur = await conn.execute("UPDATE content_rules_version SET version = version + 1 RETURNING version")
        version = await cur.fetchone()
        assert version is not None
    return int(version["version"])


# -- bulk redaction ------------------------------------------------------------------------------


@bounded
async def rooms_with_messages_of(pool: Database, user_id: int) -> list[int]:
    rows = await fetch_all(
        pool,
        "SELECT DISTINCT room_id FROM messages WHERE sender_id = %s AND deleted_at IS NULL ORDER BY room_id",
        (user_id,),
    )
    return [int(r["room_id"]) for r in rows]


@bounded
async def redact_batch(
    pool: Database, room_id: int, user_id: int, after_seq: int, limit: int, deleted_by: int
) -> list[Row]:
    """Tombstone the user's next ``limit`` live messages in the room after ``after_seq`` (seq order), in one
    transaction: the room's row is locked first (as every change does), its ``edit_rev`` moves by the
    number of messages and each message takes one revision of that range, in seq order.  Attachments are
    marked for the sweeper and reactions go, as for a single delete.  The rows, oldest first."""
    async with transaction(pool) as conn:
        cur = await conn.execute("SELECT edit_rev FROM rooms WHERE id = %s FOR UPDATE", (room_id,))
        room = await cur.fetchone()
        if room is None:
            return []
        cur = await conn.execute(
            "UPDATE messages m SET content = '', data = NULL, reactions = NULL, deleted_at = now(), deleted_by = %s,"
            " edit_rev = %s + t.n FROM (SELECT id, row_number() OVER (ORDER BY seq) AS n FROM messages"
            "   WHERE sender_id = %s AND room_id = %s AND seq > %s AND deleted_at IS NULL ORDER BY seq LIMIT %s) t"
            f" WHERE m.id = t.id RETURNING {', '.join('m.' + c.strip() for c in MESSAGE_COLUMNS.split(','))}",
            (deleted_by, room["edit_rev"], user_id, room_id, after_seq, limit),
        )
        rows = sorted(await cur.fetchall(), key=lambda r: int(r["seq"]))
        if not rows:
            return []
        ids = [r["id"] for r in rows]
        await conn.execute("UPDATE rooms SET edit_rev = edit_rev + %s WHERE id = %s", (len(rows), room_id))
        await conn.execute(
            "UPDATE files SET deleted_at = now() WHERE message_id = ANY(%s) AND deleted_at IS NULL", (ids,)
        )
        await conn.execute("DELETE FROM message_reactions WHERE message_id = ANY(%s)", (ids,))
    return rows
