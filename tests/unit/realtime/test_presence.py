"""Presence on one worker with a fake Redis: announcements by revision, heal rounds, the heartbeat rule, retire."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from typing import Any, cast

import pytest

from chatd.core import envelope, errors, server_frames
from chatd.core.keys import Keys
from chatd.core.presence_view import UNKNOWN, PresenceView
from chatd.core.roomlog import RoomLog
from chatd.process import metrics
from chatd.process.config import WebSocketSettings
from chatd.realtime.fanout import Hub
from chatd.realtime.presence import Presence
from chatd.realtime.pubsub import Subscriber

ROOM = 7
OTHER = b"0123456789ab"  # another worker's origin


class FakeKV:
    def __init__(self) -> None:
        self.views: dict[int, tuple[int, list[int]]] = {}  # what Redis holds: room -> (revision, online)
        self.asked: list[list[tuple[int, int]]] = []
        self.registered = True
        self.applied: list[tuple[int, list[tuple[int, int]]]] = []
        self.down = False

    async def presence_views(self, rooms: Sequence[tuple[int, int]]) -> dict[int, tuple[int, list[int]]]:
        if self.down:
            raise errors.Unavailable("down")
        self.asked.append(list(rooms))
        return {r: self.views.get(r, (0, [])) for r, known in rooms if self.views.get(r, (0, []))[0] != known}

    async def presence_apply(
        self, origin: str, room_id: int, changes: Sequence[tuple[int, int]], grace_s: float
    ) -> tuple[int, list[int]] | None:
        if not self.registered:
            return None
        self.applied.append((room_id, list(changes)))
        return 0, []

    async def presence_retire(self, origin: str, grace_s: float) -> None:
        if self.down:
            raise errors.Unavailable("down")

    async def publish_many(self, items: Sequence[tuple[str, bytes]]) -> None:
        pass


class FakeSubscriber:
    def __init__(self, on_resubscribed: Any) -> None:
        self.on_resubscribed = on_resubscribed

    async def subscribe(self, channel: str) -> None:
        pass

    async def unsubscribe(self, channel: str) -> None:
        pass

    def want(self, channel: str) -> asyncio.Future[None]:  # the control channel, at start
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        fut.set_result(None)
        return fut


class Conn:
    def __init__(self) -> None:
        self.frames: list[dict[str, Any]] = []
        self.user_id, self.connection_id = 1, "c1"

    def write_frame(self, frame: bytes) -> None:
        self.frames.append(json.loads(frame[2:]))  # a short unmasked text frame: 2 header bytes


@pytest.fixture
async def world() -> Any:
    kv = FakeKV()
    settings = WebSocketSettings(probe_interval_s=1.0)
    hub = Hub(kv, None, Keys(), settings, lambda on_message, resub: cast(Subscriber, FakeSubscriber(resub)))  # type: ignore[arg-type]
    presence = Presence(kv, hub, settings, clock=lambda: 0.0)  # type: ignore[arg-type]
    conn = Conn()
    hub.rooms[ROOM] = RoomLog(ROOM)
    hub.rooms[ROOM].join(conn, 1, "c1")  # type: ignore[arg-type]
    hub.rooms[ROOM].open(0, 0, PresenceView([1], rev=1), now=0.0)
    hub.finish_join(conn, ROOM, [], 0)  # type: ignore[arg-type]
    return kv, hub, presence, conn


def announce(hub: Hub, rev: int | None, online: list[int], offline: list[int]) -> None:
    head: dict[str, Any] = {"o": "p", "on": online, "off": offline}
    if rev is not None:
        head["r"] = rev
    payload = server_frames.encode_bytes(server_frames.presence(room_id=ROOM, online=online, offline=offline))
    hub._on_message(Keys().room_channel(ROOM).encode(), envelope.encode(OTHER, head, [payload]))


def healed(trigger: str) -> float:
    return metrics.presence_views_healed.labels(trigger)._value.get()  # type: ignore[no-any-return]


async def test_a_lost_announcement_is_healed_at_the_next_probe(world: Any) -> None:
    kv, hub, presence, conn = world
    announce(hub, 2, [2], [])
    assert [f["online"] for f in conn.frames] == [[2]]
    kv.views[ROOM] = (3, [1, 2, 3])  # revision 3 (3 online) was announced, its frame lost
    before = healed("probe")
    await presence.heal()
    assert kv.asked == [[(ROOM, 2)]]
    assert conn.frames[-1] == {"type": "presence", "room_id": ROOM, "online": [3], "offline": []}
    assert hub.online(ROOM) == {1, 2, 3} and healed("probe") == before + 1
    await presence.heal()  # in step now: nothing read whole, nothing sent
    assert len(conn.frames) == 2


async def test_a_skipped_revision_reads_the_view_whole(world: Any) -> None:
    kv, hub, presence, conn = world
    announce(hub, 3, [], [1])  # revision 2 never came
    kv.views[ROOM] = (3, [2])  # it was 2 coming online
    before = healed("stale")
    await presence.heal()
    assert kv.asked == [[(ROOM, UNKNOWN)]]
    assert conn.frames[-1]["online"] == [2] and conn.frames[-1]["offline"] == []
    assert hub.online(ROOM) == {2} and healed("stale") == before + 1
    announce(hub, 2, [], [2])  # the late one: older than the view, dropped
    assert hub.online(ROOM) == {2} and len(conn.frames) == 2


async def test_after_a_resubscribe_every_view_is_read_whole(world: Any) -> None:
    kv, hub, presence, conn = world
    kv.views[ROOM] = (1, [1])
    hub._resubscribed()  # what the subscriber calls once pub/sub is back
    assert presence.heals.due(0.0)
    whole = presence.heals.start(0.0)
    await presence.heal(whole)
    assert kv.asked == [[(ROOM, UNKNOWN)]]
    assert conn.frames == []  # the view was right: nothing to say


async def test_an_announcement_overtaking_the_read_wins(world: Any) -> None:
    kv, hub, presence, _ = world
    room = hub.rooms[ROOM]

    async def slow_views(rooms: Sequence[tuple[int, int]]) -> dict[int, tuple[int, list[int]]]:
        announce(hub, 3, [5], [])  # arrives while the read is on its way
        return {ROOM: (2, [1])}

    kv.presence_views = slow_views
    room.presence.rev = 2
    room.presence.stale = True
    await presence.heal()
    assert hub.online(ROOM) == {1, 5} and room.presence.stale  # read again next round


async def test_changes_wait_for_a_live_heartbeat(world: Any) -> None:
    kv, _, presence, _ = world
    presence._next_beat = 100.0
    kv.registered = False  # swept while Redis was away
    presence.joined(ROOM, 9)
    await presence.flush()
    assert kv.applied == [] and presence._changes == {ROOM: {9: +1}} and presence._next_beat == 0.0
    kv.registered = True
    await presence.flush()
    assert kv.applied == [(ROOM, [(9, +1)])]


async def test_close_retires_and_a_failure_is_left_to_the_sweep(world: Any) -> None:
    kv, _, presence, _ = world
    presence.joined(ROOM, 9)
    kv.down = True
    await presence.close()  # logged; the heartbeat expires and the others sweep
    assert presence._closed and presence._changes == {} and presence._local == {}
