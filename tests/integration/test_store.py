"""storage.messages.commit_batch against the real Postgres: outcomes, gap-free seqs, idempotency under concurrency."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import psycopg
import pytest

from chatd.core import errors
from chatd.process import config
from chatd.storage import messages as messages_db
from chatd.storage import migrations
from chatd.storage.db import Database, open_database
from chatd.storage.messages import PendingMessage
from tests.conftest import Services
from tests.support import create_database
from tests.users import make_users


@pytest.fixture
async def db(services: Services) -> AsyncIterator[tuple[Database, str]]:
    url = create_database(services.admin_url, "store")
    migrations.apply(url)
    settings = config.replace(config.Settings(), "storage", database_url=url, pg_pool_max=8)
    database = await open_database(settings.storage, "test")
    try:
        yield database, url
    finally:
        await database.close()


def _room(url: str, owner: int, members: list[int], status: str = "active") -> int:
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute(
            "INSERT INTO rooms (name, kind, owner_id, status) VALUES ('r', 'group', %s, %s) RETURNING id",
            (owner, status),
        ).fetchone()
        assert row is not None
        for user in [owner, *members]:
            conn.execute("INSERT INTO room_members (room_id, user_id) VALUES (%s, %s)", (row[0], user))
        return int(row[0])


def _msg(room: int, sender: int | None, cmid: str | None, content: str = "x") -> PendingMessage:
    return PendingMessage(room, sender, "user" if sender else "system", "text", content, cmid)


async def test_every_outcome_of_one_batch(db: tuple[Database, str]) -> None:
    database, url = db
    alice, bob, eve = (u.id for u in make_users(url, 3))
    room = _room(url, alice, [bob])
    other = _room(url, bob, [alice])
    archived = _room(url, alice, [], status="archived")
    [first] = await messages_db.commit_batch(database, [_msg(room, alice, "a1", "first")])
    assert first.row is not None and first.row["seq"] == 1 and not first.duplicate

    results = await messages_db.commit_batch(
        database,
        [
            _msg(room, bob, "b1"),  # stored: seq 2
            _msg(room, alice, "a1", "retry"),  # duplicate of an earlier batch: no seq burned
            _msg(room, eve, "e1"),  # not a member
            _msg(999_999_999, alice, "zz"),  # no such room
            _msg(archived, alice, "ar"),  # archived
            _msg(other, alice, "o1"),  # another room: its own seq 1
            _msg(room, bob, "b1", "copy"),  # a second copy within the batch
            _msg(room, None, None, "system"),  # no sender, no key: stored, seq 3
        ],
    )
    stored, dup, not_member, no_room, arch, other_room, copy, system = results
    assert stored.row is not None and stored.row["seq"] == 2 and not stored.duplicate
    assert dup.duplicate and dup.row is not None and dup.row["id"] == first.row["id"] and dup.row["content"] == "first"
    assert isinstance(not_member.error, errors.NotFound) and isinstance(no_room.error, errors.NotFound)
    assert isinstance(arch.error, errors.Conflict)
    assert other_room.row is not None and other_room.row["seq"] == 1
    assert copy.duplicate and copy.row is not None and copy.row["id"] == stored.row["id"]
    assert system.row is not None and system.row["seq"] == 3 and system.row["sender_id"] is None
    assert stored.room == {"kind": "group", "assistant": None, "owner_id": alice}
    with psycopg.connect(url) as conn:
        last = conn.execute("SELECT last_seq FROM rooms WHERE id = %s", (room,)).fetchone()
        seqs = [r[0] for r in conn.execute("SELECT seq FROM messages WHERE room_id = %s ORDER BY seq", (room,))]
    assert last == (3,) and seqs == [1, 2, 3]


async def test_concurrent_batches_keep_seqs_gap_free_and_store_each_key_once(db: tuple[Database, str]) -> None:
    database, url = db
    users = [u.id for u in make_users(url, 4)]
    rooms = [_room(url, users[0], users[1:]) for _ in range(3)]

    async def batch(n: int) -> list[messages_db.Committed]:
        # Every batch writes to every room, in a different room order, and repeats keys of other batches.
        msgs = [_msg(rooms[(n + i) % 3], users[i % 4], f"k{(n + i) % 20}-{i % 4}") for i in range(12)]
        return await messages_db.commit_batch(database, msgs)

    results = [r for batch_results in await asyncio.gather(*(batch(n) for n in range(30))) for r in batch_results]
    assert all(r.error is None and r.row is not None for r in results)
    with psycopg.connect(url) as conn:
        for room in rooms:
            seqs = [r[0] for r in conn.execute("SELECT seq FROM messages WHERE room_id = %s ORDER BY seq", (room,))]
            last = conn.execute("SELECT last_seq FROM rooms WHERE id = %s", (room,)).fetchone()
            assert seqs == list(range(1, len(seqs) + 1)) and last == (len(seqs),)
        keys = conn.execute(
            "SELECT count(*), count(DISTINCT (room_id, sender_id, client_msg_id)) FROM messages"
            " WHERE room_id = ANY(%s)",
            (rooms,),
        ).fetchone()
    assert keys is not None and keys[0] == keys[1]
    stored = [r for r in results if not r.duplicate]
    assert len(stored) == keys[0]  # every stored row was reported stored exactly once
