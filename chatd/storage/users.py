"""Accounts in Postgres: users and the refresh-token families of their sessions.

Sign-up, sign-in, token refresh, the account settings and the user directory
read and write these rows (create, look up by id or email, status, password,
display name; refresh tokens used once, a family revoked as one), so
everything a session's validity depends on is in one place.  The admin's own
queries over users (list, role, unban) are in ``admin``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import psycopg
from psycopg.rows import dict_row

from chatd.core import errors
from chatd.storage.db import Database, Row, bounded, fetch_all, fetch_one, transaction

USER_COLUMNS = "id, email, name, role, status, created_at"


@bounded
async def create_user(pool: Database, email: str, name: str, password_hash: str | None, role: str) -> Row:
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


@bounded
async def create_users(
    pool: Database, emails: Sequence[str], names: Sequence[str], password_hash: str | None
) -> list[Row]:
    """Many users (role ``user``) in one INSERT, in the order of ``emails`` (``Accounts.load_test_users``)."""
    rows = await fetch_all(
        pool,
        "INSERT INTO users (email, name, password_hash)"
        " SELECT e, n, %s FROM unnest(%s::text[], %s::text[]) AS t (e, n)"
        f" RETURNING {USER_COLUMNS}",
        (password_hash, list(emails), list(names)),
    )
    by_email = {r["email"]: r for r in rows}
    return [by_email[e] for e in emails]


@bounded
async def auth_statuses(pool: Database, holders: Sequence[tuple[int, str | None]]) -> list[Row | None]:
    """For each token holder ``(user id, session family)``: ``status``, ``role`` and whether the session
    was revoked; None for an unknown user.  One query for many (connect storms go through ``Batched``)."""
    rows = await fetch_all(
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
    return await fetch_one(
        pool, f"SELECT {USER_COLUMNS}, password_hash FROM users WHERE lower(email) = lower(%s)", (email,)
    )


@bounded
async def user_by_id(pool: Database, user_id: int) -> Row | None:
    return await fetch_one(pool, f"SELECT {USER_COLUMNS} FROM users WHERE id = %s", (user_id,))


@bounded
async def set_user_status(pool: Database, user_id: int, status: str) -> Row | None:
    return await fetch_one(
        pool,
        f"UPDATE users SET status = %s, updated_at = now() WHERE id = %s RETURNING {USER_COLUMNS}",
        (status, user_id),
    )


@bounded
async def set_password_hash(pool: Database, user_id: int, password_hash: str) -> None:
    await fetch_one(pool, "UPDATE users SET password_hash = %s WHERE id = %s RETURNING id", (password_hash, user_id))


@bounded
async def store_refresh(pool: Database, jti: str, family: str, user_id: int, expires_at: int) -> None:
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
    await fetch_one(
        pool,
        "WITH r AS (UPDATE refresh_tokens SET revoked_at = now() WHERE family = %s AND revoked_at IS NULL RETURNING 1)"
        " SELECT count(*) AS n FROM r",
        (family,),
    )


@bounded
async def user_families(pool: Database, user_id: int) -> list[str]:
    rows = await fetch_all(
        pool,
        "SELECT DISTINCT family FROM refresh_tokens WHERE user_id = %s AND revoked_at IS NULL AND expires_at > now()",
        (user_id,),
    )
    return [r["family"] for r in rows]


@bounded
async def update_user_name(pool: Database, user_id: int, name: str) -> Row | None:
    return await fetch_one(
        pool,
        f"UPDATE users SET name = %s, updated_at = now() WHERE id = %s AND status = 'active' RETURNING {USER_COLUMNS}",
        (name, user_id),
    )


@bounded
async def password_hash_of(pool: Database, user_id: int) -> str | None:
    row = await fetch_one(pool, "SELECT password_hash FROM users WHERE id = %s AND status = 'active'", (user_id,))
    return None if row is None else row["password_hash"]


@bounded
async def revoke_families_except(pool: Database, user_id: int, keep: str | None) -> list[str]:
    """Revoke every live session of a user but ``keep``; the revoked families."""
    rows = await fetch_all(
        pool,
        "WITH r AS (UPDATE refresh_tokens SET revoked_at = now() WHERE user_id = %s AND revoked_at IS NULL"
        " AND (%s::text IS NULL OR family <> %s) RETURNING family) SELECT DISTINCT family FROM r",
        (user_id, keep, keep),
    )
    return sorted({r["family"] for r in rows})


@bounded
async def lookup_users(pool: Database, query: str, limit: int) -> list[Row]:
    """Active users by exact email (case-insensitive), else by name prefix: id and name only."""
    rows = await fetch_all(
        pool, "SELECT id, name FROM users WHERE lower(email) = lower(%s) AND status = 'active'", (query,)
    )
    if rows or "@" in query:
        return rows
    pattern = query.lower().replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
    return await fetch_all(
        pool,
        "SELECT id, name FROM users WHERE lower(name) LIKE %s AND status = 'active' ORDER BY lower(name), id LIMIT %s",
        (pattern, limit),
    )


@bounded
async def user_names(pool: Database, user_ids: Sequence[int]) -> dict[int, str]:
    rows = await fetch_all(pool, "SELECT id, name FROM users WHERE id = ANY(%s)", (list(user_ids),))
    return {int(r["id"]): r["name"] for r in rows}
