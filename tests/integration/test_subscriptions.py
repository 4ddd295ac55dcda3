"""Subscription churn: a flapping client does not cost a SUBSCRIBE, a read and a new sequencer per reconnect.

The room's subscription outlives its last local socket by ``ws.room_linger_s``; a socket joining within it
finds the room live (the SUBSCRIBE count in Valkey's INFO does not move), and only after it does the
worker unsubscribe.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
import redis.asyncio

from tests.chat import connect, join, make_room, send
from tests.conftest import Services
from tests.support import Chatd
from tests.users import make_users

pytestmark = pytest.mark.slow


async def _subscribers(client: redis.asyncio.Redis, channel: str) -> int:
    [(_, count)] = await client.pubsub_numsub(channel)
    return int(count)


async def test_a_flapping_client_reuses_the_rooms_subscription_then_it_lapses(
    chatd_factory: Any, services: Services, redis_prefix: str
) -> None:
    server: Chatd = chatd_factory(CHATD_WS_ROOM_LINGER_S="3")
    alice, bob = make_users(services.database_url, 2)
    room = await make_room(server, alice, [bob])
    channel = f"{redis_prefix}room:{room}"
    client = redis.asyncio.Redis.from_url(services.redis_url)
    try:
        b = await connect(server, bob)  # on the other side of the room, not on this worker's room list
        for i in range(3):  # connect, join, drop: three times within the linger
            a = await connect(server, alice)
            await join(a, room)
            assert await _subscribers(client, channel) == 1
            sent = await send(b, room, f"while flapping {i}")
            assert (await a.expect("message", room_id=room))["seq"] == sent["seq"]
            a.close()
            await asyncio.sleep(0.3)
            assert await _subscribers(client, channel) == 1, "still subscribed within the linger"
        deadline = time.monotonic() + 10
        while await _subscribers(client, channel) and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        assert await _subscribers(client, channel) == 0, "unsubscribed once the linger passed"
        # A join after the linger subscribes again and misses nothing.
        a = await connect(server, alice)
        await join(a, room)
        sent = await send(b, room, "after")
        assert (await a.expect("message", room_id=room))["seq"] == sent["seq"]
    finally:
        await client.aclose()
