"""The revocation log (``sql/0013_revocations.sql``): removals, bans and revoked sessions, read back.

Triggers write it in the transaction of the change itself, so it holds whatever path made the change and
whatever happened to the PUBLISH that announced it.  Workers read the last minute of it every probe.
"""

from __future__ import annotations

from dataclasses import dataclass

from chatd.storage.db import Database, bounded, connection


@dataclass(frozen=True, slots=True)
class Revocation:
    id: int
    user_id: int
    room_id: int | None  # removed from this room (and not a member again since)
    family: str | None  # this session revoked; both None: the user's status left 'active'


@bounded
async def recent(pool: Database, window_s: float) -> list[Revocation]:
    """The revocations of the last ``window_s`` that still hold (a member added back is left out)."""
    async with connection(pool) as conn:
        cur = await conn.execute(
            "SELECT r.id, r.user_id, r.room_id, r.family FROM revocations r"
            " WHERE r.at > now() - make_interval(secs => %s) AND (r.room_id IS NULL OR NOT EXISTS"
            " (SELECT 1 FROM room_members m WHERE m.room_id = r.room_id AND m.user_id = r.user_id))"
            " ORDER BY r.id",
            (window_s,),
        )
        return [Revocation(r["id"], r["user_id"], r["room_id"], r["family"]) for r in await cur.fetchall()]


@bounded
async def forget_older(pool: Database, age_s: float) -> None:
    async with connection(pool) as conn:
        await conn.execute("DELETE FROM revocations WHERE at < now() - make_interval(secs => %s)", (age_s,))
