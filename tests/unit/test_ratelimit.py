from __future__ import annotations

import pytest

from chatd.ratelimit import SlidingWindow


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize(
    ("times", "allowed"),
    [
        ([0, 1, 2], [True, True, True]),
        ([0, 1, 2, 3], [True, True, True, False]),  # 4th within 10 s
        ([0, 1, 2, 10.5], [True, True, True, True]),  # the first left the window
        ([0, 0, 0, 9.9, 10.1], [True, True, True, False, True]),
    ],
)
def test_three_per_ten_seconds(times: list[float], allowed: list[bool]) -> None:
    clock = Clock()
    limiter = SlidingWindow(3, 10.0, clock)
    got = []
    for t in times:
        clock.now = 100.0 + t
        got.append(limiter.hit("u").allowed)
    assert got == allowed


def test_retry_after_is_until_the_oldest_leaves() -> None:
    clock = Clock()
    limiter = SlidingWindow(2, 10.0, clock)
    limiter.hit("u")
    clock.now += 4
    limiter.hit("u")
    refused = limiter.hit("u")
    assert not refused.allowed and refused.retry_after_ms == 6000


def test_subjects_are_independent_and_idle_ones_forgotten() -> None:
    clock = Clock()
    limiter = SlidingWindow(1, 10.0, clock)
    assert limiter.hit("a").allowed and limiter.hit("b").allowed
    assert not limiter.hit("a").allowed
    clock.now += 11
    limiter.forget_idle()
    assert limiter._events == {}
    assert limiter.hit("a").allowed
