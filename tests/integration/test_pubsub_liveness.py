"""A half-open pub/sub connection: the worker notices, reconnects, and says so meanwhile.

Instance A reaches Valkey through a proxy (``tests.faults.Blackhole``), instance B directly.  The
proxy blackholes every connection open at one moment: nothing is forwarded either way and neither
socket is closed (a NAT or firewall that forgot the connection, a host that vanished: no RST).
Connections opened later go through (the old connection is dead, a new one works).  From B, bob
sends typing frames (seq-less, best effort: they reach A only through pub/sub) and messages.
A's socket must get bob's typing again within the liveness deadline plus a reconnect, A's
``/health/ready`` must say 503 with ``pubsub`` not ok meanwhile and 200 after, and every message
acked to bob must reach alice on A once, in order (through the repair while A is deaf).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from typing import Any

import pytest

from chatd.process.config import StorageSettings
from tests.chat import connect, join, make_room, send
from tests.conftest import Services
from tests.faults import Blackhole
from tests.support import WS, Chatd, request
from tests.users import make_users

pytestmark = [pytest.mark.slow, pytest.mark.reliability]

LIVENESS_S = StorageSettings().pubsub_liveness_s  # the default: what production gets
HEAL_BOUND_S = 10.0  # blackhole -> bob's typing on A again: the deadline (5 s) + a reconnect, with slack
TYPING_EVERY_S = 0.2
SEND_EVERY = 5  # a message every 5th typing frame (1 s)


async def test_half_open_pubsub_connection_is_noticed_and_replaced(chatd_factory: Any, services: Services) -> None:
    with Blackhole(services.redis_url) as proxy:
        a_srv: Chatd = chatd_factory(REDIS_URL=proxy.url)
        try:
            await _scenario(a_srv, chatd_factory(CHATD_WS_TYPING_INTERVAL_S="0.1"), proxy, services)
        finally:
            a_srv.stop()  # before the proxy closes its connections: a quick, quiet shutdown


async def _scenario(a_srv: Chatd, b_srv: Chatd, proxy: Blackhole, services: Services) -> None:
    alice, bob = make_users(services.database_url, 2)
    room = await make_room(b_srv, bob, [alice])
    a = await connect(a_srv, alice)
    await join(a, room)
    b = await connect(b_srv, bob)
    await join(b, room)

    # Through the proxy, before the fault: bob's typing and messages reach alice.
    await b.send({"type": "typing", "room_id": room, "is_typing": True})
    await a.expect("typing", user_id=bob.id)
    first = await send(b, room, "before")
    assert (await a.expect("message", room_id=room))["seq"] == first["seq"]
    await _drain(a)

    started = time.monotonic()
    assert proxy.blackhole() >= 1  # A's pub/sub connection (and its idle command connections)
    stop = asyncio.Event()
    acked: list[int] = [first["seq"]]
    polls: list[tuple[float, int, dict[str, Any]]] = []  # (seconds after the blackhole, status, checks)
    received: list[tuple[float, dict[str, Any]]] = []

    async def bob_talks() -> None:
        n = 0
        while not stop.is_set():
            await b.send({"type": "typing", "room_id": room, "is_typing": True})
            n += 1
            if n % SEND_EVERY == 0:
                ack = await send(b, room, uuid.uuid4().hex)
                assert ack["type"] == "ack", ack
                acked.append(ack["seq"])
            b.backlog.clear()  # his own echoes
            await asyncio.sleep(TYPING_EVERY_S)

    async def poll_ready() -> None:
        while not stop.is_set():
            r = await request("GET", a_srv.http + "/health/ready")
            checks = r.body.get("checks", {}) if isinstance(r.body, dict) else {}
            polls.append((time.monotonic() - started, r.status, checks))
            await asyncio.sleep(0.1)

    async def alice_reads() -> None:
        while (frame := await a.recv(timeout_s=30)) is not None:
            received.append((time.monotonic() - started, frame))

    def healed_at() -> float | None:
        return next((t for t, f in received if f["type"] == "typing" and f["user_id"] == bob.id), None)

    def last_seq() -> int:
        return max((f["seq"] for _, f in received if f["type"] == "message"), default=0)

    def pubsub_down(status: int, checks: dict[str, Any]) -> bool:
        return status == 503 and not checks.get("pubsub", {}).get("ok", True)

    def ready_again() -> bool:
        return any(pubsub_down(s, c) for _, s, c in polls) and polls[-1][1] == 200

    tasks = [asyncio.ensure_future(c) for c in (bob_talks(), poll_ready(), alice_reads())]
    try:
        deadline = started + HEAL_BOUND_S
        while time.monotonic() < deadline and healed_at() is None:
            await asyncio.sleep(0.05)
        if healed_at() is not None:  # then: readiness back, and a few more messages over the new connection
            until = time.monotonic() + 5
            while time.monotonic() < until and not ready_again():
                await asyncio.sleep(0.05)
            await asyncio.sleep(1.5)
        stop.set()
        await asyncio.wait_for(asyncio.gather(tasks[0], tasks[1]), 10)
        # Every acked message reaches alice (the last ones may still be on their way).
        until = time.monotonic() + 5
        while time.monotonic() < until and last_seq() < max(acked):
            await asyncio.sleep(0.05)
    finally:
        stop.set()
        for task in tasks:
            task.cancel()
        with contextlib.suppress(BaseException):
            await asyncio.gather(*tasks, return_exceptions=True)

    healed = healed_at()
    not_live = [t for t, status, checks in polls if pubsub_down(status, checks)]
    back = [t for t, status, _ in polls if not_live and t > not_live[-1] and status == 200]
    redis_down = sum(1 for _, _, checks in polls if not checks.get("redis", {}).get("ok", True))
    seqs = [f["seq"] for _, f in received if f["type"] == "message"]
    print(
        f"\nliveness {LIVENESS_S} s: bob's typing on A again {_s(healed)} s after the blackhole;"
        f" /health/ready 200 in {sum(1 for _, status, _ in polls if status == 200)} of {len(polls)} polls,"
        f" 503 with pubsub not ok from {_s(not_live[0] if not_live else None)} to"
        f" {_s(not_live[-1] if not_live else None)} s ({len(not_live)} of {len(polls)} polls),"
        f" 200 again at {_s(back[0] if back else None)} s ({redis_down} polls with redis not ok: a blackholed pooled"
        f" connection); {len(acked)} acked, {len(seqs)} received;"
        f" {proxy.dropped_bytes} bytes dropped; proxy connections (forwarded, blackholed) {proxy.open_connections()}"
    )

    assert healed is not None, f"A's socket got no typing from bob within {HEAL_BOUND_S} s: pub/sub on A is deaf"
    assert healed < HEAL_BOUND_S
    assert healed > LIVENESS_S / 3, "typing arrived too soon: the old connection was not blackholed"
    assert not_live, f"/health/ready never said pubsub not ok: {[(round(t, 1), s) for t, s, _ in polls]}"
    assert back, "/health/ready not 200 again after the reconnect"
    assert polls[-1][2]["pubsub"]["ok"] is True
    # Nothing acked is lost, nothing twice, in order.
    assert seqs == list(range(first["seq"] + 1, max(acked) + 1)), f"acked {acked}, received {seqs}"
    assert a_srv.events("pubsub_liveness_timeout"), "A's log names the deadline as the reason it reconnected"


async def _drain(ws: WS, quiet_s: float = 0.3) -> None:
    """Read and drop frames until none came for ``quiet_s``."""
    ws.backlog.clear()
    with contextlib.suppress(TimeoutError):
        while True:
            await ws.recv(timeout_s=quiet_s)


def _s(t: float | None) -> str:
    return "never" if t is None else f"{t:.2f}"
