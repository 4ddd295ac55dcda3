"""The user channel at connect: after ``hello`` a socket receives every event of its user.

A socket's worker subscribes to the user's channel (room events, read sync, forced closes) when
the socket connects.  These tests hold that SUBSCRIBE back in a proxy in front of Valkey
(``tests.faults.SubscribeGate``), so Redis confirms it late, and publish in that window from
another instance: a forced close must still close the new socket, and an event published
after ``hello`` must still reach it.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from typing import Any

import pytest

from tests.chat import API, make_room
from tests.conftest import Services
from tests.faults import SubscribeGate
from tests.support import WS, request
from tests.users import PASSWORD, make_users

HOLD_S = 1.0  # how late Redis confirms the held SUBSCRIBE (well within the Redis timeout below)


@pytest.fixture
def gate(services: Services) -> Iterator[SubscribeGate]:
    proxy = SubscribeGate(services.redis_url)
    proxy.start()
    try:
        yield proxy
    finally:
        proxy.stop()


def gated_instance(chatd_factory: Any, gate: SubscribeGate) -> Any:
    # A generous Redis timeout: the held SUBSCRIBE is confirmed late, not given up on.
    return chatd_factory(REDIS_URL=gate.url, CHATD_STORAGE_REDIS_TIMEOUT_S="10")


async def frames_until_closed(sock: WS, timeout_s: float) -> list[str]:
    """The types of the frames received until the server closed the socket (or ``timeout_s`` passed)."""
    frames: list[str] = []
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(timeout_s):
            while (frame := await sock.recv()) is not None:
                frames.append(frame["type"])
    return frames


async def test_password_change_during_connect_closes_the_new_socket(
    gate: SubscribeGate, chatd_factory: Any, services: Services, redis_prefix: str
) -> None:
    a_srv = chatd_factory()
    b_srv = gated_instance(chatd_factory, gate)
    [user] = make_users(services.database_url, 1)
    creds = {"email": user.email, "password": PASSWORD}
    first = (await request("POST", a_srv.http + f"{API}/auth/login", creds)).body
    second = (await request("POST", a_srv.http + f"{API}/auth/login", creds)).body

    gate.hold(f"{redis_prefix}user:{user.id}")
    sock = await WS.connect(b_srv.ws, second["access_token"])  # upgraded: the session check passed
    await gate.wait_held()  # instance b's SUBSCRIBE to the user channel is not confirmed yet
    ok = {"old_password": PASSWORD, "new_password": "brand-new-pass"}
    r = await request("POST", a_srv.http + f"{API}/me/password", ok, first["access_token"])
    assert r.status == 204  # `second` revoked in Postgres, the close published (b does not listen yet)
    await asyncio.sleep(0.2)
    gate.release()

    # Until closed: the release is followed by a session check in Postgres, then the close. 15 s, not 5, for a
    # loaded machine: only the wait of a passing run is bounded by it; a socket wrongly left open is greeted
    # (`hello`) and fails the assertion below all the same.
    frames = await frames_until_closed(sock, timeout_s=15)
    assert (sock.conn.close_code, frames) == (4001, [])  # closed as revoked, never greeted
    assert gate.held == 1


async def test_event_published_right_after_hello_reaches_the_socket(
    gate: SubscribeGate, chatd_factory: Any, services: Services, redis_prefix: str
) -> None:
    a_srv = chatd_factory()
    b_srv = gated_instance(chatd_factory, gate)
    owner, bob = make_users(services.database_url, 2)
    room = await make_room(a_srv, owner, [])

    gate.hold(f"{redis_prefix}user:{bob.id}")
    sock = await WS.connect(b_srv.ws, bob.token)
    await gate.wait_held()
    asyncio.get_running_loop().call_later(HOLD_S, gate.release)  # Redis confirms a second late
    await sock.expect("hello")
    # The client is greeted: from here on, every event of its user reaches it.
    r = await request("POST", a_srv.http + f"{API}/rooms/{room}/members", {"user_id": bob.id}, owner.token)
    assert r.status == 201
    added = await sock.expect("room_added", timeout_s=HOLD_S + 5)
    assert added["room"]["id"] == room
    assert gate.held == 1
