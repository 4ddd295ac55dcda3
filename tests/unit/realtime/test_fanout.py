"""The hub's receiving side: whatever arrives on pub/sub, ``_on_message`` never raises (a fake subscriber, no I/ORG).

A raise would reach the subscriber, which then reconnects and resubscribes every channel, losing what
is published meanwhile.  A bad envelope is dropped, counted by reason and logged at most once a minute
per reason.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from typing import Any

import pytest
from prometheus_client import REGISTRY

from chatd.core import envelope, wsframe
from chatd.core.keys import Keys
from chatd.core.presence_view import PresenceView
from chatd.core.roomlog import RoomLog
from chatd.process.config import WebSocketSettings
from chatd.realtime.fanout import Hub
from tests.unit.core.test_envelope import BAD

ORG = b"abcdefabcdef"
ROOM, USER, CONTROL = b"chatd:room:7", b"chatd:user:3", b"chatd:control"


class FakeSubscriber:
    def __init__(self) -> None:
        self.wanted: list[str] = []
        self.timeout_s = 1.0

    def want(self, channel: str) -> asyncio.Future[None]:
        self.wanted.append(channel)
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        fut.set_result(None)
        return fut


class FakeConn:
    def __init__(self, user_id: int) -> None:
        self.connection_id = f"c{user_id}"
        self.user_id = user_id
        self.family: str | None = None
        self.frames: list[bytes] = []
        self.closed: tuple[int, str] | None = None
        self.kicks: list[int] = []

    def write_frame(self, frame: bytes) -> None:
        self.frames.append(frame)

    def force_close(self, code: int, reason: str) -> None:
        self.closed = (code, reason)

    def kicked(self, room_id: int) -> None:
        self.kicks.append(room_id)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def hub() -> Hub:
    sub = FakeSubscriber()
    factory: Callable[..., Any] = lambda on_message, on_resubscribed: sub  # noqa: E731
    return Hub(kv=None, db=None, keys=Keys(), settings=WebSocketSettings(), subscriber_factory=factory, clock=Clock())  # type: ignore[arg-type]


def dropped(reason: str) -> float:
    return REGISTRY.get_sample_value("chatd_pubsub_bad_envelopes_total", {"reason": reason}) or 0.0


async def test_every_worker_listens_on_the_control_channel(hub: Hub) -> None:
    assert hub.subscriber.wanted == ["chatd:control"]  # type: ignore[attr-defined]


@pytest.mark.parametrize(("scope", "data", "reason"), BAD)
async def test_a_bad_envelope_is_dropped_and_counted_on_any_channel(
    hub: Hub, scope: envelope.Scope, data: bytes, reason: str
) -> None:
    channel = {"room": ROOM, "user": USER, "control": CONTROL}[scope]
    before = dropped(reason)
    hub._on_message(channel, data)  # no raise
    assert dropped(reason) == before + 1


@pytest.mark.parametrize("channel", [b"chatd:room:x", b"chatd:room:", b"chatd:user:1.5", b"other:channel"])
async def test_a_channel_without_an_id_is_dropped(hub: Hub, channel: bytes) -> None:
    before = dropped("channel")
    hub._on_message(channel, envelope.encode(ORG, {"o": "f"}, [b"{}"]))
    assert dropped("channel") == before + 1


async def test_a_control_handler_that_trips_over_its_fields_is_a_bad_header(hub: Hub) -> None:
    seen: list[int] = []
    hub.control_handlers["cancel"] = lambda head: seen.append(int(head["message_id"]))
    before = dropped("header"), dropped("op")
    hub._on_message(CONTROL, envelope.encode(ORG, {"o": "cancel"}))
    hub._on_message(CONTROL, envelope.encode(ORG, {"o": "cancel", "message_id": "x"}))
    hub._on_message(CONTROL, envelope.encode(ORG, {"o": "no-handler"}))
    hub._on_message(CONTROL, envelope.encode(ORG, {"o": "cancel", "message_id": 5}))
    assert seen == [5]
    assert (dropped("header"), dropped("op")) == (before[0] + 2, before[1] + 1)


async def test_a_delivery_that_raises_is_dropped_and_logged_with_its_traceback(
    hub: Hub, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(head: dict[str, Any]) -> None:
        raise RuntimeError("a bug")

    hub.control_handlers["cancel"] = broken
    before = dropped("delivery")
    with caplog.at_level(logging.WARNING, "chatd.app"):
        hub._on_message(CONTROL, envelope.encode(ORG, {"o": "cancel", "message_id": 1}))
    assert dropped("delivery") == before + 1
    [record] = [r for r in caplog.records if r.getMessage() == "fanout_bad_envelope"]
    assert record.levelno == logging.ERROR and record.exc_info is not None


async def test_log_lines_are_limited_to_one_a_minute_per_reason(hub: Hub, caplog: pytest.LogCaptureFixture) -> None:
    clock: Clock = hub.clock  # type: ignore[assignment]

    def lines() -> list[dict[str, Any]]:
        return [r.fields for r in caplog.records if r.getMessage() == "fanout_bad_envelope"]  # type: ignore[attr-defined]

    with caplog.at_level(logging.WARNING, "chatd.app"):
        for _ in range(100):
            hub._on_message(ROOM, b"garbage")
        hub._on_message(ROOM, ORG + b' {"v":9,"o":"f"}\n{}')  # another reason: its own first line
        assert [(f["reason"], f["unlogged"]) for f in lines()] == [("framing", 0), ("version", 0)]
        clock.now += 59
        hub._on_message(ROOM, b"garbage")
        assert len(lines()) == 2
        clock.now += 1
        hub._on_message(ROOM, b"garbage")
        assert [(f["reason"], f["unlogged"]) for f in lines()][2:] == [("framing", 100)]


async def test_valid_envelopes_of_both_versions_are_delivered(hub: Hub) -> None:
    conn = FakeConn(3)
    hub.users[3] = {conn}
    hub._on_message(USER, envelope.encode(ORG, {"o": "f"}, [b'{"type":"read"}']))
    hub._on_message(USER, ORG + b' {"o":"f","x":"c9"}\n{"type":"read"}')  # no "v": an instance not yet upgraded
    hub._on_message(USER, envelope.encode(ORG, {"o": "f", "x": "c3"}, [b'{"type":"read"}']))  # its own echo: skipped
    assert len(conn.frames) == 2
    hub._on_message(USER, ORG + b' {"o":"close","code":4001,"reason":"logged out","fam":null}')
    assert conn.closed == (4001, "logged out")
    hub._on_message(USER, hub.origin + b" garbage that is ours")  # our own publishes are not even parsed


def _opened_room(hub: Hub, *conns: FakeConn, last_seq: int = 0) -> None:
    room = hub.rooms[7] = RoomLog(7)
    room.open(last_seq, 0, PresenceView(), now=0.0)
    for conn in conns:
        room.join(conn, conn.user_id, conn.connection_id)  # type: ignore[arg-type]
        hub.finish_join(conn, 7, [], last_seq)  # type: ignore[arg-type]


def _message(seq: int, data: dict[str, Any] | None = None) -> bytes:
    frame = {"type": "message", "room_id": 7, "seq": seq, "kind": "system" if data else "text", "data": data}
    return envelope.encode(ORG, {"o": "m", "s": [seq]}, [json.dumps(frame).encode()])


async def test_a_delivered_member_left_kicks_the_members_sockets_before_it_is_written(hub: Hub) -> None:
    owner, member = FakeConn(1), FakeConn(2)
    _opened_room(hub, owner, member)
    hub._on_message(ROOM, _message(1))
    hub._on_message(ROOM, _message(2, {"event": "member_left", "user_id": 2}))  # its kick's PUBLISH was lost
    hub._on_message(ROOM, _message(3))
    assert member.kicks == [7] and len(member.frames) == 1  # seq 1 only
    assert owner.kicks == [] and len(owner.frames) == 3
    assert hub.delivered_seq(member, 7) is None and hub.delivered_seq(owner, 7) == 3  # type: ignore[arg-type]


async def test_another_epoch_read_by_a_join_resyncs_the_rooms_sockets(hub: Hub) -> None:
    conn = FakeConn(1)
    probes: list[int] = []
    hub.probe_hooks.append(lambda: probes.append(1))
    _opened_room(hub, conn, last_seq=500)
    hub.set_epoch(7, "e1", 500)
    hub.set_epoch(7, "e2", 300)
    [frame] = [json.loads(p) for f in conn.frames for p in wsframe.ws_frame_payloads(f)]
    assert frame == {"type": "resync_required", "room_id": 7, "last_seq": 300, "epoch": "e2"}
    assert probes == [1]
