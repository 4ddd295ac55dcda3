"""Subscriber.want: batched SUBSCRIBEs, each caller's future done once Redis confirmed (a fake pub/sub, no I/O)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from chatd.core import errors
from chatd.process.config import StorageSettings
from chatd.realtime.pubsub import Subscriber


class FakePubSub:
    def __init__(self) -> None:
        self.commands: list[tuple[str, ...]] = []
        self.subscribed = True

    async def subscribe(self, *channels: str) -> None:
        self.commands.append(("SUBSCRIBE", *channels))

    async def unsubscribe(self, *channels: str) -> None:
        self.commands.append(("UNSUBSCRIBE", *channels))


def confirm(sub: Subscriber, channel: str) -> None:
    sub._dispatch({"type": "subscribe", "channel": channel.encode(), "data": 1})


@pytest.fixture
async def sub() -> Any:
    subscriber = Subscriber(StorageSettings(redis_url="redis://127.0.0.1:1/0"), lambda c, d: None, lambda: None)
    subscriber._pubsub = FakePubSub()
    subscriber.connected = True
    flush = asyncio.ensure_future(subscriber.flush_wanted())
    yield subscriber
    flush.cancel()
    await subscriber.close()


async def test_wanted_together_go_in_one_subscribe_and_resolve_on_confirmation(sub: Subscriber) -> None:
    futs = [sub.want(f"u:{i}") for i in range(3)]
    again = sub.want("u:0")  # a second socket of the same user: the same confirmation, no second SUBSCRIBE
    await asyncio.sleep(0)
    [command] = sub._pubsub.commands
    assert command[0] == "SUBSCRIBE" and sorted(command[1:]) == ["u:0", "u:1", "u:2"]
    assert not any(f.done() for f in [*futs, again])
    confirm(sub, "u:0")
    assert futs[0].done() and again.done() and not futs[1].done()
    assert sub.want("u:0").done()  # confirmed: nothing to wait for, nothing sent
    await asyncio.sleep(0)
    assert len(sub._pubsub.commands) == 1


async def test_unsubscribed_then_wanted_again_waits_for_its_own_subscribe(sub: Subscriber) -> None:
    first = sub.want("u:1")
    await asyncio.sleep(0)
    await sub.unsubscribe("u:1")  # the last socket left before the confirmation
    with pytest.raises(errors.Unavailable):
        first.result()
    second = sub.want("u:1")
    await asyncio.sleep(0)
    assert [c[0] for c in sub._pubsub.commands] == ["SUBSCRIBE", "UNSUBSCRIBE", "SUBSCRIBE"]
    confirm(sub, "u:1")  # the first SUBSCRIBE's: the UNSUBSCRIBE after it still stands
    assert not second.done()
    confirm(sub, "u:1")
    assert second.done() and second.exception() is None


async def test_disconnected_fails_at_once_and_subscribes_once_connected(sub: Subscriber) -> None:
    sub.connected = False
    fut = sub.want("u:1")
    with pytest.raises(errors.Unavailable):
        fut.result()
    await asyncio.sleep(0)
    assert sub._pubsub.commands == []  # kept pending, not dropped
    sub.connected = True
    sub._pending_event.set()  # what the reader does once connected again
    await asyncio.sleep(0)
    assert sub._pubsub.commands == [("SUBSCRIBE", "u:1")]
