"""A frozen Valkey does not stall commits, acks or same-worker delivery.

Valkey is SIGSTOPped (its connections stay open, nothing answers) for 10 s while two users of one worker
chat.  Postgres is healthy, so every send is acked at commit speed and the other socket of the same
worker gets it at once: the PUBLISH for the other workers goes through a bounded queue off the commit
path, and what it cannot publish in time the other workers' repair probes read back from Postgres.
"""

from __future__ import annotations

import asyncio
import statistics
import time
import uuid
from typing import Any

import pytest

from chatd.process.embedded import EmbeddedValkey
from tests.chat import connect, join, make_room
from tests.conftest import Services
from tests.faults import stopped, valkey_pid
from tests.support import Chatd
from tests.users import make_users

pytestmark = [pytest.mark.slow, pytest.mark.reliability]

FREEZE_S = 10.0
RATE_PER_S = 20


def p99(values: list[float]) -> float:
    return statistics.quantiles(values, n=100)[98]


async def test_a_frozen_valkey_does_not_stall_acks_or_local_delivery(
    chatd_factory: Any, services: Services, own_valkey: EmbeddedValkey
) -> None:
    env = {"REDIS_URL": own_valkey.url, "CHATD_WS_SEND_RATE_COUNT": "1000000"}
    server: Chatd = chatd_factory(**env)
    other: Chatd = chatd_factory(**env)  # another instance: what it missed arrives by repair
    alice, bob, carol = make_users(services.database_url, 3)
    room = await make_room(server, alice, [bob, carol])
    a, b, c = await connect(server, alice), await connect(server, bob), await connect(other, carol)
    for ws in (a, b, c):
        await join(ws, room)

    sent_at: dict[str, float] = {}
    ack_ms: list[float] = []
    delivery_ms: list[float] = []
    acked: list[int] = []

    count = int(FREEZE_S * RATE_PER_S)

    async def sender() -> None:
        for _ in range(count):
            cmid = uuid.uuid4().hex
            sent_at[cmid] = time.monotonic()
            await a.send({"type": "send", "room_id": room, "content": cmid, "client_msg_id": cmid, "id": cmid})
            await asyncio.sleep(1 / RATE_PER_S)

    async def acks() -> None:
        for _ in range(count):
            frame = await a.expect_any(("ack", "error"), timeout_s=FREEZE_S + 10)
            assert frame["type"] == "ack", frame
            ack_ms.append((time.monotonic() - sent_at[frame["reply_to"]]) * 1000)
            acked.append(int(frame["seq"]))

    async def deliveries() -> None:
        for _ in range(count):
            frame = await b.expect("message", timeout_s=FREEZE_S + 10, room_id=room)
            delivery_ms.append((time.monotonic() - sent_at[frame["content"]]) * 1000)

    with stopped([valkey_pid(own_valkey)]):
        await asyncio.gather(sender(), acks(), deliveries())
    print(
        f"acks p50 {statistics.median(ack_ms):.1f} ms p99 {p99(ack_ms):.1f} ms; "
        f"same-worker delivery p50 {statistics.median(delivery_ms):.1f} ms p99 {p99(delivery_ms):.1f} ms"
    )
    # Bound: 100 ms (issue 17); the test allows a loaded CI machine 2.5x that.
    assert p99(ack_ms) < 250, sorted(ack_ms)[-5:]
    assert p99(delivery_ms) < 250, sorted(delivery_ms)[-5:]
    # The other instance got every message anyway (pub/sub or repair), in order, once.
    got = [(await c.expect("message", timeout_s=20, room_id=room))["seq"] for _ in acked]
    assert got == sorted(acked)
