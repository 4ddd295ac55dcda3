"""Removals, bans and logouts hold across instances even when every PUBLISH is lost.

The kick and the close ride pub/sub, which is best effort: Valkey can refuse or drop them.  The promise:
a removed, banned or logged-out user receives nothing of the room after at most 2 s, whatever happened
to any PUBLISH, because every worker reads the revocations back from Postgres (``revocations`` table,
written by triggers in the same transaction as the removal, the ban or the revoked session).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from tests.chat import API, connect, join, make_room, send
from tests.conftest import Services
from tests.faults import publish_refused
from tests.support import WS, Chatd, request
from tests.users import PASSWORD, make_users

pytestmark = [pytest.mark.slow, pytest.mark.reliability]

PROMISE_S = 2.0
SLACK_S = 0.5  # a loaded 2-core test machine


async def _room_frames_until(ws: WS, room_id: int, deadline: float) -> list[tuple[float, dict[str, Any]]]:
    """Every frame of ``room_id`` the socket gets until ``deadline`` (monotonic), with when it came."""
    got: list[tuple[float, dict[str, Any]]] = []
    while (left := deadline - time.monotonic()) > 0:
        try:
            frame = await ws.recv(timeout_s=left)
        except TimeoutError:
            break
        if frame is None:
            break
        if frame.get("room_id") == room_id:
            got.append((time.monotonic(), frame))
    return got


async def _keep_sending(ws: WS, room_id: int, stop: asyncio.Event, acked: list[int]) -> None:
    n = 0
    while not stop.is_set():
        n += 1
        reply = await send(ws, room_id, f"after {n}")
        assert reply["type"] == "ack", reply
        acked.append(int(reply["seq"]))
        await asyncio.sleep(0.1)


async def test_a_removed_member_reads_nothing_of_the_room_when_the_kick_is_lost(
    chatd_factory: Any, services: Services
) -> None:
    a_srv: Chatd = chatd_factory(CHATD_WS_SEND_RATE_COUNT="1000000")
    b_srv: Chatd = chatd_factory()
    owner, member = make_users(services.database_url, 2)
    room = await make_room(a_srv, owner, [member])
    a, m = await connect(a_srv, owner), await connect(b_srv, member)
    await join(a, room)
    await join(m, room)
    first = await send(a, room, "before")
    assert (await m.expect("message", room_id=room))["seq"] == first["seq"]

    stop = asyncio.Event()
    acked: list[int] = []
    with publish_refused(services.redis_url):
        r = await request("DELETE", f"{a_srv.http}{API}/rooms/{room}/members/{member.id}", None, owner.token)
        assert r.status == 204, r.body
        removed_at = time.monotonic()
        sender = asyncio.create_task(_keep_sending(a, room, stop, acked))
        frames = await _room_frames_until(m, room, removed_at + PROMISE_S + SLACK_S + 1.5)
        stop.set()
        await sender
    assert acked, "the owner's sends were acked meanwhile"
    late = [
        (round(at - removed_at, 2), f) for at, f in frames if f["type"] == "message" and at > removed_at + PROMISE_S
    ]
    assert not late, late
    assert any(f["type"] == "left" for _, f in frames), frames  # told, not silently cut off

    # Publishing works again: still nothing of the room.
    await send(a, room, "after the fault")
    later = await _room_frames_until(m, room, time.monotonic() + 1.5)
    assert not [f for _, f in later if f["type"] == "message"], later


async def _banned_or_logged_out_socket_closes(
    a_srv: Chatd, victim_ws: WS, act: Any, redis_url: str
) -> tuple[int | None, str | None, float]:
    with publish_refused(redis_url):
        started = time.monotonic()
        await act()
        code, reason = await victim_ws.closed(timeout_s=PROMISE_S + SLACK_S + 3)
        return code, reason, time.monotonic() - started


async def test_a_ban_closes_the_other_instances_sockets_when_the_close_is_lost(
    chatd_factory: Any, services: Services
) -> None:
    a_srv: Chatd = chatd_factory()
    b_srv: Chatd = chatd_factory()
    (admin,) = make_users(services.database_url, 1, role="admin")
    (victim,) = make_users(services.database_url, 1)
    room = await make_room(a_srv, admin, [victim])
    v = await connect(b_srv, victim)
    await join(v, room)

    async def ban() -> None:
        r = await request("POST", f"{a_srv.http}{API}/admin/users/{victim.id}/ban", {}, admin.token)
        assert r.status == 200, r.body

    code, reason, took_s = await _banned_or_logged_out_socket_closes(a_srv, v, ban, services.redis_url)
    assert (code, reason) == (1008, "account banned")
    assert took_s < PROMISE_S + SLACK_S, took_s


async def test_a_logout_closes_the_sessions_sockets_on_other_instances_when_the_close_is_lost(
    chatd_factory: Any, services: Services
) -> None:
    a_srv: Chatd = chatd_factory()
    b_srv: Chatd = chatd_factory()
    (user,) = make_users(services.database_url, 1)
    login = await request("POST", f"{a_srv.http}{API}/auth/login", {"email": user.email, "password": PASSWORD})
    assert login.status == 200, login.body
    token = login.body["access_token"]
    ws = await WS.connect(b_srv.ws, token)
    await ws.expect("hello")
    other = await connect(b_srv, user)  # another session of the same user (its own family): stays open

    async def logout() -> None:
        r = await request("POST", f"{a_srv.http}{API}/auth/logout", None, token)
        assert r.status == 204, r.body

    code, reason, took_s = await _banned_or_logged_out_socket_closes(a_srv, ws, logout, services.redis_url)
    assert code == 4001, (code, reason)
    assert took_s < PROMISE_S + SLACK_S, took_s
    await other.send({"type": "ping", "id": "p"})
    assert (await other.expect("pong", reply_to="p"))["type"] == "pong"
