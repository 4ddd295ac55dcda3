"""The admin's queries in Postgres: audit log, stats, users, rooms, usage.

What ``chatd.services.admin`` serves: the audit log, the dashboard's figures
in one round trip, the user list, role and unban, a room's full log with its
deleted messages, the ids behind announcements and broadcasts, and the daily
usage behind ``/me/usage``.  Apart because they read across every aggregate
for a few endpoints, and neither the send path nor the join path depends on
them.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from psycopg.types.json import Jsonb

from chatd.core import errors
from chatd.storage.db import Database, Row, bounded, fetch_all, fetch_one
from chatd.storage.messages import MESSAGE_COLUMNS
from chatd.storage.users import USER_COLUMNS, set_user_status


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
    await fetch_one(
        pool,
        "INSERT INTO audit_log (actor_id, action, target, details, ip, status) VALUES (%s, %s, %s, %s, %s, %s)"
        " RETURNING id",
        (actor_id, action, target, Jsonb(details) if details is not None else None, ip, status),
    )


@bounded
async def audit_page(pool: Database, before_id: int | None, limit: int) -> list[Row]:
    return await fetch_all(
        pool,
        "SELECT id, actor_id, action, target, details, ip, status, created_at FROM audit_log"
        " WHERE (%s::bigint IS NULL OR id < %s) ORDER BY id DESC LIMIT %s",
        (before_id, before_id, limit),
    )


@bounded
async def admin_stats(pool: Database, start: dt.datetime, end: dt.datetime) -> Row:
    """Totals and per-day figures over ``[start, end)`` in one round trip."""
    row = await fetch_one(
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
    return await fetch_all(
        pool,
        f"SELECT {USER_COLUMNS} FROM users WHERE (%s::text IS NULL OR lower(email) LIKE %s OR lower(name) LIKE %s)"
        " AND (%s::text IS NULL OR status = %s) AND (%s::bigint IS NULL OR id < %s) ORDER BY id DESC LIMIT %s",
        (pattern, pattern, pattern, status, status, before_id, before_id, limit),
    )


@bounded
async def set_user_role(pool: Database, user_id: int, role: str) -> Row | None:
    return await fetch_one(
        pool,
        f"UPDATE users SET role = %s, updated_at = now() WHERE id = %s RETURNING {USER_COLUMNS}",
        (role, user_id),
    )


@bounded
async def unban_user(pool: Database, user_id: int) -> Row | None:
    """banned -> active; None for an unknown user (a deleted account stays deleted: Conflict)."""
    row = await fetch_one(pool, f"SELECT {USER_COLUMNS} FROM users WHERE id = %s", (user_id,))
    if row is None:
        return None
    if row["status"] == "deleted":
        raise errors.Conflict("the account was deleted by its owner")
    return await set_user_status(pool, user_id, "active")


@bounded
async def admin_room_messages(pool: Database, room_id: int, before_seq: int | None, limit: int) -> list[Row]:
    """A room's log for admins: deleted messages too, with who deleted them (newest first)."""
    return await fetch_all(
        pool,
        f"SELECT {MESSAGE_COLUMNS}, deleted_by FROM messages WHERE room_id = %s"
        " AND (%s::bigint IS NULL OR seq < %s) ORDER BY seq DESC LIMIT %s",
        (room_id, before_seq, before_seq, limit),
    )


@bounded
async def active_room_ids(pool: Database) -> list[int]:
    rows = await fetch_all(pool, "SELECT id FROM rooms WHERE status = 'active' ORDER BY id")
    return [int(r["id"]) for r in rows]


@bounded
async def active_user_ids(pool: Database) -> list[int]:
    rows = await fetch_all(pool, "SELECT id FROM users WHERE status = 'active' ORDER BY id")
    return [int(r["id"]) for r in rows]


@bounded
async def usage_of(pool: Database, user_id: int, days: int) -> list[Row]:
    return await fetch_all(
        pool,
        "SELECT to_char(day, 'YYYY-MM-DD') AS day, sum(answers)::int AS answers,"
        " sum(input_tokens)::bigint AS input_tokens, sum(output_tokens)::bigint AS output_tokens FROM usage_daily"
        " WHERE user_id = %s AND day > (now() AT TIME ZONE 'UTC')::date - %s GROUP BY day ORDER BY day DESC",
        (user_id, days),
    )
