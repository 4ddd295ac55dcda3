from __future__ import annotations

import pytest

from chatd.ratelimit import FrameLimiter, SlidingWindow, TokenBucket, TypingDedup


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


# -- per-socket frame limits (TokenBucket, FrameLimiter) and typing dedup -------------------------


def test_token_bucket_allows_a_burst_then_the_rate() -> None:
    clock = Clock()
    bucket = TokenBucket(rate_per_s=2.0, burst=3)
    assert [bucket.take(clock()) for _ in range(4)] == [0.0, 0.0, 0.0, pytest.approx(0.5)]
    clock.now += 0.5  # one token back
    assert bucket.take(clock()) == 0.0
    assert bucket.take(clock()) == pytest.approx(0.5)
    clock.now += 100  # refills to the burst, never beyond
    assert [bucket.take(clock()) for _ in range(4)][-1] > 0


def _limiter(clock: Clock, max_violations: int = 3) -> FrameLimiter:
    return FrameLimiter(
        limits={"all": (100.0, 10), "join": (1.0, 2), "typing": (1.0, 1)},
        groups={"join": "join", "leave": "join", "typing": "typing"},
        max_violations=max_violations,
        violation_window_s=10.0,
        clock=clock,
    )


def test_frame_limiter_limits_each_group_and_shares_one_bucket_for_all() -> None:
    clock = Clock()
    limiter = _limiter(clock)
    assert [limiter.hit("join").allowed for _ in range(3)] == [True, True, False]
    assert not limiter.hit("leave").allowed  # leave shares join's bucket
    assert limiter.hit("typing").allowed and not limiter.hit("typing").allowed
    refused = limiter.hit("join")
    assert refused.retry_after_ms == 1000
    assert all(limiter.hit("ping").allowed for _ in range(3))  # ungrouped: only the shared bucket...
    assert not limiter.hit("ping").allowed  # ...10 frames of any kind, refused ones included


def test_frame_limiter_closes_after_max_violations_within_the_window() -> None:
    clock = Clock()
    limiter = _limiter(clock, max_violations=3)
    assert [limiter.violation() for _ in range(2)] == [False, False]
    clock.now += 11  # the first two left the window
    assert [limiter.violation() for _ in range(3)] == [False, False, True]


@pytest.mark.parametrize(
    ("steps", "relayed"),
    [
        ([(0, False)], [False]),  # never typing: nothing to stop
        ([(0, True), (0.1, True), (0.2, True)], [True, False, False]),  # a repeated true within the refresh
        ([(0, True), (2.5, True)], [True, True]),  # a refresh after typing_interval_s
        ([(0, True), (1, False), (1.1, False), (1.2, False)], [True, True, False, False]),
        ([(0, True), (1, False), (1.1, True)], [True, True, True]),  # a change is always relayed
    ],
)
def test_typing_dedup(steps: list[tuple[float, bool]], relayed: list[bool]) -> None:
    clock = Clock()
    dedup = TypingDedup(refresh_s=2.0, clock=clock)
    got = []
    for at, is_typing in steps:
        clock.now = 100.0 + at
        got.append(dedup.should_relay(7, is_typing))
    assert got == relayed


def test_typing_dedup_forgets_an_expired_state() -> None:
    clock = Clock()
    dedup = TypingDedup(refresh_s=2.0, clock=clock)
    assert dedup.should_relay(7, True)
    dedup.expired(7)  # the server relayed false itself
    assert not dedup.should_relay(7, False)
    assert dedup.should_relay(7, True)
