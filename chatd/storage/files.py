"""Attachments' rows in Postgres (``files``); the blobs are ``chatd.services.files``'s.

An upload recorded before its message commits (and forgotten when the message
is refused), the member-checked read of a live attachment, and the sweeper's
side: blobs of deleted messages or orphaned uploads to remove, marked purged
once gone.
"""

from __future__ import annotations

from collections.abc import Sequence

from chatd.storage.db import Database, Row, bounded, fetch_all, fetch_one

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
    row = await fetch_one(
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
    return await fetch_one(
        pool,
        f"SELECT {', '.join('f.' + c.strip() for c in FILE_COLUMNS.split(','))} FROM files f"
        " JOIN room_members m ON m.room_id = f.room_id AND m.user_id = %s"
        " WHERE f.id = %s AND f.message_id IS NOT NULL AND f.deleted_at IS NULL AND f.purged_at IS NULL",
        (user_id, file_id),
    )


@bounded
async def files_to_sweep(pool: Database, orphan_after_s: float, limit: int) -> list[Row]:
    """Blobs to remove: of deleted messages, or uploads never attached to a message within ``orphan_after_s``."""
    return await fetch_all(
        pool,
        f"SELECT {FILE_COLUMNS} FROM files WHERE purged_at IS NULL"
        " AND (deleted_at IS NOT NULL OR (message_id IS NULL AND created_at < now() - make_interval(secs => %s)))"
        " ORDER BY id LIMIT %s",
        (orphan_after_s, limit),
    )


@bounded
async def mark_files_purged(pool: Database, file_ids: Sequence[int]) -> None:
    await fetch_one(
        pool,
        "WITH p AS (UPDATE files SET purged_at = now(), deleted_at = coalesce(deleted_at, now())"
        " WHERE id = ANY(%s) RETURNING 1) SELECT count(*) AS n FROM p",
        (list(file_ids),),
    )


@bounded
async def forget_file(pool: Database, file_id: int) -> None:
    """An upload whose message was refused: its row goes (the caller removes the blob)."""
    await fetch_one(pool, "DELETE FROM files WHERE id = %s AND message_id IS NULL RETURNING id", (file_id,))
