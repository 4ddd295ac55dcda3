"""Edits and deletes of one message racing each other, forced from outside with a row lock.

An outside transaction holds the room's row (where every change takes its revision), so the changes sent
meanwhile queue behind it in a known order; then the lock goes and they run one after the other.  A
tombstone stays a tombstone, and each change is announced at most once.
"""

from __future__ import annotations

import time
from typing import Any

import psycopg
import pytest

from tests.chat import API, connect, join, make_room, send
from tests.conftest import Services
from tests.faults import lock_waiters
from tests.support import WS, Chatd, request
from tests.users import make_users

pytestmark = pytest.mark.slow


async def _behind_a_lock(services: Services, room: int, changes: list[tuple[WS, dict[str, Any]]]) -> None:
    """Send ``changes`` one by one, each queued behind the previous on the room's row lock, then release."""
    with (
        psycopg.connect(services.database_url) as holder,
        psycopg.connect(services.database_url, autocommit=True) as probe,
    ):
        holder.execute("SELECT 1 FROM rooms WHERE id = %s FOR UPDATE", (room,))
        for n, (ws, frame) in enumerate(changes, 1):
            await ws.send(frame)
            await lock_waiters(probe, n, "%edit_rev%")
        holder.rollback()


async def _history_row(server: Chatd, token: str, room: int, message_id: int) -> dict[str, Any]:
    r = await request("GET", f"{server.http}{API}/rooms/{room}/messages?limit=50", None, token)
    assert r.status == 200, r.body
    (row,) = [m for m in r.body["messages"] if m["message_id"] == message_id]
    return dict(row)


async def _setup(chatd: Chatd, services: Services) -> tuple[Any, int, WS, WS, WS, int]:
    author, watcher = make_users(services.database_url, 2)
    room = await make_room(chatd, author, [watcher])
    a1, a2, w = await connect(chatd, author), await connect(chatd, author), await connect(chatd, watcher)
    for ws in (a1, a2, w):
        await join(ws, room)
    sent = await send(a1, room, "original")
    assert sent["type"] == "ack", sent
    return author, room, a1, a2, w, int(sent["message_id"])


async def test_an_edit_queued_behind_a_delete_leaves_the_tombstone_empty(chatd: Chatd, services: Services) -> None:
    author, room, a1, a2, w, mid = await _setup(chatd, services)
    await _behind_a_lock(
        services,
        room,
        [
            (a1, {"type": "delete", "id": "d", "message_id": mid}),
            (a2, {"type": "edit", "id": "e", "message_id": mid, "content": "written onto the tombstone"}),
        ],
    )
    refused = await a2.expect("error", reply_to="e")
    assert refused["code"] == "conflict", refused
    assert (await w.expect("message_deleted", message_id=mid))["seq"] == 1
    with pytest.raises(TimeoutError):
        await w.expect("message_updated", timeout_s=1)
    row = await _history_row(chatd, author.token, room, mid)
    assert row["deleted"] is True and row["content"] == "", row


async def test_two_deletes_at_once_announce_one_message_deleted(chatd: Chatd, services: Services) -> None:
    _author, room, a1, a2, w, mid = await _setup(chatd, services)
    await _behind_a_lock(
        services,
        room,
        [
            (a1, {"type": "delete", "id": "d1", "message_id": mid}),
            (a2, {"type": "delete", "id": "d2", "message_id": mid}),
        ],
    )
    refused = await a2.expect("error", reply_to="d2")
    assert refused["code"] == "conflict", refused
    await w.expect("message_deleted", message_id=mid)
    with pytest.raises(TimeoutError):
        await w.expect("message_deleted", message_id=mid, timeout_s=1)
    # The room's revisions stay gap-free: a later edit of another message arrives at once, not after repair.
    other = await send(a1, room, "another")
    await a1.send({"type": "edit", "id": "e2", "message_id": other["message_id"], "content": "edited"})
    started = time.monotonic()
    await w.expect("message_updated", message_id=other["message_id"], timeout_s=5)
    assert time.monotonic() - started < 1.0
