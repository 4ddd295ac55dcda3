"""The publish queue's bounds, without I/O: order kept, the oldest give way, the late are dropped."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from chatd.realtime.outbox import PublishQueue


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class NoBroker:
    async def publish_many(self, items: Sequence[tuple[str, bytes]]) -> None:
        raise AssertionError("not called in these tests")


def queue(max_items: int = 5, deadline_s: float = 1.0) -> tuple[PublishQueue, Clock]:
    clock = Clock()
    return PublishQueue(NoBroker(), max_items, deadline_s, clock), clock


def names(batch: list[tuple[str, bytes]]) -> list[bytes]:
    return [envelope for _, envelope in batch]


@pytest.mark.parametrize(
    ("puts", "take_at", "expected", "dropped_full", "dropped_late"),
    [
        # puts: (time, [envelopes]); all on one channel
        ([(0, [b"a", b"b"]), (0.1, [b"c"])], 0.2, [b"a", b"b", b"c"], 0, 0),  # FIFO
        ([(0, [b"a", b"b", b"c", b"d", b"e", b"f", b"g"])], 0.1, [b"c", b"d", b"e", b"f", b"g"], 2, 0),  # bound
        ([(0, [b"a"]), (0.5, [b"b"])], 1.2, [b"b"], 0, 1),  # past the deadline: dropped, the rest kept
        ([(0, [b"a"]), (0.5, [b"b"])], 1.6, [], 0, 2),
        ([(0, [])], 0, [], 0, 0),
    ],
)
def test_take(
    puts: list[tuple[float, list[bytes]]],
    take_at: float,
    expected: list[bytes],
    dropped_full: int,
    dropped_late: int,
) -> None:
    q, clock = queue()
    for at, envelopes in puts:
        clock.now = at
        q.put([("room:1", e) for e in envelopes])
    clock.now = take_at
    assert names(q.take()) == expected
    assert (q.dropped_full, q.dropped_late) == (dropped_full, dropped_late)
    assert len(q) == 0


def test_a_pipeline_is_bounded_and_the_rest_waits_its_turn() -> None:
    q, _ = queue(max_items=2000)
    q.put([("room:1", str(i).encode()) for i in range(1200)])
    first, second, third = q.take(), q.take(), q.take()
    assert (len(first), len(second), len(third)) == (500, 500, 200)
    assert names(first + second + third) == [str(i).encode() for i in range(1200)]
