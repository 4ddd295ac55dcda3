"""Envelopes between instances, from outside: two real chatd instances, Valkey PUBLISHes by the test.

What one instance publishes, the others decode (``chatd/core/envelope.py``).  A publish that is not a
valid envelope (garbage, a bad header, an unknown op or version) is dropped and counted by reason; it
must never tear down the worker's pub/sub connection, which would resubscribe every channel and lose
whatever was published meanwhile.  Envelopes of the format before versions (no ``v``) and of v1 are both
read: a rolling upgrade mixes them.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
import redis.asyncio
from prometheus_client.parser import text_string_to_metric_families

from tests.chat import connect, join, make_room, send
from tests.conftest import Services
from tests.support import WS, Chatd, request
from tests.users import make_users

pytestmark = [pytest.mark.slow, pytest.mark.reliability]

ORIGIN = b"feedfacecafe"  # no chatd worker's (they are random hex), so nobody drops these as its own
FAST_TYPING = {
    "CHATD_WS_TYPING_INTERVAL_S": "0.05",  # typing relayed at most once per user per room per interval
    "CHATD_WS_TYPING_RATE_PER_S": "100",
    "CHATD_WS_TYPING_BURST": "100",
}


def _bad_room_envelopes(room: int) -> list[tuple[str, bytes]]:
    """(the reason chatd counts, the publish) on a room channel."""
    typing = json.dumps({"type": "typing", "room_id": room, "user_id": 999_999, "is_typing": True}).encode()
    return [
        ("framing", b""),
        ("framing", b"\xff\xfe not an envelope at all"),
        ("json", ORIGIN + b" {not json"),
        ("json", ORIGIN + b' ["o", "m"]'),
        ("op", ORIGIN + b' {"o":"zz"}\n{}'),
        ("op", ORIGIN + b' {"s":[1]}\n{}'),
        ("header", ORIGIN + b' {"o":"m"}\n{}'),
        ("header", ORIGIN + b' {"o":"m","s":["1"]}\n{}'),
        ("header", ORIGIN + b' {"o":"m","s":[true]}\n{}'),
        ("header", ORIGIN + b' {"o":"u","r":"abc"}\n{}'),
        ("header", ORIGIN + b' {"o":"p","on":5,"off":[]}\n{}'),
        ("header", ORIGIN + b' {"o":"f","m":7}\n' + typing),  # a stream chunk without its index
        ("payloads", ORIGIN + b' {"o":"m","s":[1,1]}\n{"type":"message"}'),  # 2 seqs, 1 payload
        ("payloads", ORIGIN + b' {"o":"f"}'),
        ("version", ORIGIN + b' {"v":99,"o":"f"}\n' + typing),  # a future format: never delivered
    ]


def _bad_user_envelopes() -> list[tuple[str, bytes]]:
    return [
        ("framing", b"x"),
        ("header", ORIGIN + b' {"o":"close"}'),  # no code
        ("header", ORIGIN + b' {"o":"kick","room":"x"}'),
        ("payloads", ORIGIN + b' {"o":"f"}'),
        ("op", ORIGIN + b' {"o":"m","s":[1]}\n{}'),  # messages belong on room channels
        ("version", ORIGIN + b' {"v":"1","o":"f"}\n{}'),
    ]


def _bad_control_envelopes() -> list[tuple[str, bytes]]:
    return [
        ("header", ORIGIN + b' {"o":"cancel"}'),  # no message id
        ("header", ORIGIN + b' {"o":"cancel","message_id":"abc"}'),
        ("op", ORIGIN + b' {"o":"no-such-control-op"}'),
    ]


async def _metrics(server: Chatd) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = (await request("GET", server.http + "/metrics")).body.decode()
    out: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            key = (sample.name, tuple(sorted(sample.labels.items())))
            out[key] = out.get(key, 0.0) + sample.value
    return out


def _value(metrics: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
    want = set(labels.items())
    return sum(v for (n, labs), v in metrics.items() if n == name and want <= set(labs))


async def _typing_crosses(sender: WS, receiver: WS, room: int, user_id: int) -> None:
    """A typing frame (seq-less, pub/sub only: never repaired) from one instance reaches the other."""
    for state in (True, False):
        await sender.send({"type": "typing", "room_id": room, "is_typing": state})
        got = await receiver.expect("typing", timeout_s=5, room_id=room, user_id=user_id)
        assert got["is_typing"] is state
    await asyncio.sleep(0.06)  # past ws.typing_interval_s: the next `true` is relayed again


async def test_bad_envelopes_are_dropped_and_counted_without_a_reconnect(
    chatd_factory: Any, services: Services, redis_prefix: str
) -> None:
    a_srv: Chatd = chatd_factory(**FAST_TYPING)
    b_srv: Chatd = chatd_factory(**FAST_TYPING)
    alice, bob = make_users(services.database_url, 2)
    room = await make_room(a_srv, alice, [bob])
    a, b = await connect(a_srv, alice), await connect(b_srv, bob)
    await join(a, room)
    await join(b, room)
    first = await send(a, room, "before")  # seq 1 exists: the count-mismatch envelope's seqs are stale copies
    assert (await b.expect("message", room_id=room))["seq"] == first["seq"]
    await _typing_crosses(a, b, room, alice.id)
    before = {srv.port: await _metrics(srv) for srv in (a_srv, b_srv)}

    channels = {
        f"{redis_prefix}room:{room}": _bad_room_envelopes(room),
        f"{redis_prefix}user:{bob.id}": _bad_user_envelopes(),
        f"{redis_prefix}control": _bad_control_envelopes(),
    }
    client = redis.asyncio.Redis.from_url(services.redis_url)
    try:
        for channel, bad in channels.items():
            for _, data in bad:
                assert await client.publish(channel, data) >= 1  # somebody listens: it was delivered
                # Pub/sub keeps the order of one connection's publishes: once this crosses, B has read
                # the bad envelope before it; A's own publish reaches B after ours.
                await _typing_crosses(a, b, room, alice.id)
                await _typing_crosses(b, a, room, bob.id)
        for _ in range(50):  # a flood of one kind: counted each, logged once
            await client.publish(f"{redis_prefix}room:{room}", b"garbage")
    finally:
        await client.aclose()
    await _typing_crosses(a, b, room, alice.id)

    # Messages still cross live, in order, once.
    second = await send(a, room, "after")
    assert (await b.expect("message", room_id=room, timeout_s=5))["seq"] == second["seq"] == first["seq"] + 1
    with pytest.raises(TimeoutError):
        await b.expect("typing", timeout_s=0.5, user_id=999_999)  # the unknown version's frame was not delivered

    expected_b: dict[str, int] = {}
    expected_a: dict[str, int] = {}
    for channel, bad in channels.items():
        for reason, _ in bad:
            expected_b[reason] = expected_b.get(reason, 0) + 1
            if "user:" not in channel:  # A does not listen on bob's channel
                expected_a[reason] = expected_a.get(reason, 0) + 1
    for expected in (expected_a, expected_b):
        expected["framing"] += 50
    for srv, expected in ((a_srv, expected_a), (b_srv, expected_b)):
        after = await _metrics(srv)
        assert _value(after, "chatd_pubsub_reconnects_total") == _value(
            before[srv.port], "chatd_pubsub_reconnects_total"
        ), "a bad envelope tore the pub/sub connection down"
        assert not srv.events("fanout_redis_lost")
        counted = {
            reason: int(
                _value(after, "chatd_pubsub_bad_envelopes_total", reason=reason)
                - _value(before[srv.port], "chatd_pubsub_bad_envelopes_total", reason=reason)
            )
            for reason in expected
        }
        assert counted == expected
        logged = srv.events("fanout_bad_envelope")
        assert {e["reason"] for e in logged} == set(expected)
        assert len(logged) == len(expected)  # rate-limited: one line per reason within the minute
        assert "Traceback" not in srv.log()


async def test_old_and_v1_envelopes_are_both_read(chatd_factory: Any, services: Services, redis_prefix: str) -> None:
    """A rolling upgrade: instances of the old main (no ``v``) and of v1 publish to each other."""
    a_srv: Chatd = chatd_factory()
    alice, bob = make_users(services.database_url, 2)
    room = await make_room(a_srv, alice, [bob])
    a = await connect(a_srv, alice)
    await join(a, room)
    client = redis.asyncio.Redis.from_url(services.redis_url)
    try:
        for version, head in ((None, {"o": "f"}), (1, {"v": 1, "o": "f"})):
            frame = {"type": "typing", "room_id": room, "user_id": bob.id, "is_typing": version is None}
            data = ORIGIN + b" " + json.dumps(head, separators=(",", ":")).encode() + b"\n" + json.dumps(frame).encode()
            assert await client.publish(f"{redis_prefix}room:{room}", data) == 1
            got = await a.expect("typing", timeout_s=5, user_id=bob.id)
            assert got["is_typing"] is (version is None), version
        # An old main's user-channel close, as it publishes it today (no v).
        old_close = ORIGIN + b' {"o":"close","code":4001,"reason":"logged out","fam":null}'
        assert await client.publish(f"{redis_prefix}user:{alice.id}", old_close) == 1
        assert (await a.closed()) == (4001, "logged out")
    finally:
        await client.aclose()
    assert not a_srv.events("fanout_bad_envelope")
