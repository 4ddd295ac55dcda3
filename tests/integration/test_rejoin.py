"""A join of a room the socket already joined (both reference clients rejoin on every room open and every
resync): nothing of the room before its `joined`, and nothing twice after it.

The rejoin's read is held behind an outside lock on ``room_members`` while another member's typing and
messages flow, so live frames certainly arrive during it.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import psycopg
import pytest

from tests.chat import connect, join, make_room, send
from tests.conftest import Services
from tests.faults import lock_waiters
from tests.support import WS, Chatd
from tests.users import make_users

pytestmark = pytest.mark.slow

TYPING = {"CHATD_WS_TYPING_INTERVAL_S": "0", "CHATD_WS_TYPING_RATE_PER_S": "100", "CHATD_WS_TYPING_BURST": "100"}


async def _frames(ws: WS, room: int, window_s: float) -> list[dict[str, Any]]:
    out = []
    deadline = time.monotonic() + window_s
    while (left := deadline - time.monotonic()) > 0:
        try:
            frame = await ws.recv(timeout_s=left)
        except TimeoutError:
            break
        if frame is not None and frame.get("room_id") == room:
            out.append(frame)
    return out


async def test_a_rejoin_writes_nothing_before_joined_and_nothing_twice(chatd_factory: Any, services: Services) -> None:
    server: Chatd = chatd_factory(**TYPING)
    alice, bob = make_users(services.database_url, 2)
    room = await make_room(server, alice, [bob])
    a, b = await connect(server, alice), await connect(server, bob)
    await join(a, room)
    await join(b, room)
    first = await send(b, room, "before")
    await a.expect("message", room_id=room, seq=first["seq"])
    # What was written before the rejoin is read (bob's presence comes with a tick of its own, ws.presence_tick_ms):
    # only frames the server wrote while the rejoin waited may count below.
    await _frames(a, room, 0.5)

    with (
        psycopg.connect(services.database_url) as holder,
        psycopg.connect(services.database_url, autocommit=True) as probe,
    ):
        holder.execute("LOCK TABLE room_members IN ACCESS EXCLUSIVE MODE")
        await a.send({"type": "join", "room_id": room, "since_seq": first["seq"], "id": "rj"})
        await lock_waiters(probe, 1, "%room_members%")
        for i in range(8):  # typing needs no Postgres: relayed live while the rejoin waits
            await b.send({"type": "typing", "room_id": room, "is_typing": i % 2 == 0})
            await asyncio.sleep(0.03)
        await asyncio.sleep(0.2)
        holder.rollback()

    before: list[dict[str, Any]] = []
    while True:
        frame = await a.recv(timeout_s=10)
        assert frame is not None
        if frame.get("type") == "joined" and frame.get("reply_to") == "rj":
            break
        if frame.get("room_id") == room:
            before.append(frame)
    assert before == [], before  # the socket is joining: its room frames wait for `joined`

    sent = [await send(b, room, f"after {i}") for i in range(3)]
    after = await _frames(a, room, 1.5)
    typing = [f for f in after if f["type"] == "typing"]
    assert [f["is_typing"] for f in typing] == [i % 2 == 0 for i in range(8)], typing  # each once, in order
    seqs = [f["seq"] for f in after if f["type"] == "message"]
    assert seqs == [s["seq"] for s in sent], seqs  # each once
