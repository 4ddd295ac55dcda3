"""Deadlines hold from the client's side: a send is answered within ``storage.pg_query_timeout_s`` of being
read, and ``/health/ready`` within ``storage.health_timeout_s``, however Postgres misbehaves."""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from typing import Any

import psycopg
import pytest

from chatd.process.embedded import EmbeddedPostgres
from tests.chat import connect, join, make_room, send
from tests.conftest import Services
from tests.faults import paused
from tests.support import Chatd, http_get
from tests.users import make_users

pytestmark = [pytest.mark.slow, pytest.mark.reliability]

QUERY_TIMEOUT_S = 2.0
SLACK_S = 0.6


async def test_a_send_queued_behind_a_slow_commit_is_answered_within_its_deadline(
    chatd_factory: Any, services: Services
) -> None:
    """The first send's transaction waits 1.5 s for the room's row; the second send, read meanwhile, commits
    next and waits again (a second outside holder queued for the row).  Its deadline counts from when it was
    read, not from when its own transaction started: answered (`unavailable`) by then, not ~2x later."""
    server: Chatd = chatd_factory(CHATD_STORAGE_PG_QUERY_TIMEOUT_S=str(QUERY_TIMEOUT_S))
    (alice,) = make_users(services.database_url, 1)
    room = await make_room(server, alice, [])
    ws = await connect(server, alice)
    await join(ws, room)
    assert (await send(ws, room, "before"))["type"] == "ack"

    second_holder_locked = threading.Event()
    release_second = threading.Event()

    def hold_again() -> None:  # queued for the row behind the first commit; then holds it past the deadline
        with psycopg.connect(services.database_url) as conn:
            conn.execute("SELECT 1 FROM rooms WHERE id = %s FOR UPDATE", (room,))
            second_holder_locked.set()
            release_second.wait(10)
            conn.rollback()

    with psycopg.connect(services.database_url) as first_holder:
        first_holder.execute("SELECT 1 FROM rooms WHERE id = %s FOR UPDATE", (room,))
        first, second = uuid.uuid4().hex, uuid.uuid4().hex
        await ws.send({"type": "send", "room_id": room, "content": "1", "client_msg_id": first, "id": first})
        await asyncio.sleep(0.2)  # the first commit waits for the row
        second_sent_at = time.monotonic()
        await ws.send({"type": "send", "room_id": room, "content": "2", "client_msg_id": second, "id": second})
        holder = threading.Thread(target=hold_again)
        holder.start()
        await asyncio.sleep(1.3)
        first_holder.rollback()  # the first commit goes through; the second holder takes the row next
        try:
            reply = await ws.expect_any(("ack", "error"), timeout_s=10, reply_to=second)
            took_s = time.monotonic() - second_sent_at
        finally:
            release_second.set()
            await asyncio.to_thread(holder.join, 10)
    assert second_holder_locked.is_set()
    assert (await ws.expect_any(("ack", "error"), reply_to=first))["type"] == "ack"
    assert reply["type"] == "error" and reply["code"] == "unavailable", reply
    assert took_s < QUERY_TIMEOUT_S + SLACK_S, took_s
    # The client's retry with the same client_msg_id is safe: one message, whatever landed.
    retry = await send(ws, room, "2", cmid=second)
    assert retry["type"] == "ack", retry
    with psycopg.connect(services.database_url) as conn:
        row = conn.execute("SELECT count(*) FROM messages WHERE client_msg_id = %s", (second,)).fetchone()
    assert row is not None and row[0] == 1


async def test_readiness_answers_within_its_timeout_while_postgres_is_paused(
    chatd_factory: Any, own_postgres: tuple[EmbeddedPostgres, str]
) -> None:
    pg, url = own_postgres
    server: Chatd = chatd_factory(database_url=url, CHATD_STORAGE_HEALTH_TIMEOUT_S="1.0")
    status, _ = http_get(server.http + "/health/ready", timeout_s=5)
    assert status == 200
    with paused(pg):
        took = []
        for _ in range(3):
            started = time.monotonic()
            status, body = await asyncio.to_thread(http_get, server.http + "/health/ready", 10)
            took.append(time.monotonic() - started)
            assert status == 503, body
            assert body["checks"]["postgres"]["ok"] is False
    assert max(took) < 1.0 + SLACK_S, took
