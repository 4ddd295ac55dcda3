from __future__ import annotations

import pytest

from chatd.services.ratelimit import SharedQuota, SlidingWindow


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


# -- SharedQuota: the limit across workers, without a round trip per event --------------------------------


def test_shared_quota_alone_is_the_sliding_window() -> None:
    clock = Clock()
    quota = SharedQuota(3, 10.0, clock)
    assert [quota.hit("u").allowed for _ in range(4)] == [True, True, True, False]
    clock.now += 10.5
    assert quota.hit("u").allowed


@pytest.mark.parametrize(
    ("others", "own_allowed"),
    [
        (0, 5),  # nobody else sends: the whole limit is ours
        (3, 2),  # other workers accepted 3 in the window: 2 left here
        (5, 0),  # they used it all
        (9, 0),  # over (they raced each other within one sync): still nothing, never negative
    ],
)
def test_other_workers_events_reduce_what_this_one_accepts(others: int, own_allowed: int) -> None:
    clock = Clock()
    quota = SharedQuota(5, 10.0, clock)
    quota.synced("u", others)  # Redis counted `others` events, none of them ours
    got = [quota.hit("u").allowed for _ in range(6)]
    assert got.count(True) == own_allowed and got[:own_allowed] == [True] * own_allowed


def test_sync_reports_own_events_once_and_watches_subjects_limited_by_others() -> None:
    clock = Clock()
    quota = SharedQuota(5, 10.0, clock)
    quota.hit("a")
    quota.hit("a")
    quota.synced("b", 4)
    assert quota.pending() == {"a": 2, "b": 0}  # b is reported (0 new) so its count keeps being refreshed
    assert quota.pending() == {"b": 0}  # a's events were reported already
    quota.synced("a", 2)  # only our own 2: nobody else
    refused = SharedQuota(1, 10.0, clock)
    refused.synced("c", 1)
    decision = refused.hit("c")
    assert not decision.allowed and decision.retry_after_ms == 1000  # a tenth of the window: ask again soon


def test_others_count_expires_after_a_window_without_sync() -> None:
    clock = Clock()
    quota = SharedQuota(2, 10.0, clock)
    quota.synced("u", 2)
    assert not quota.hit("u").allowed
    clock.now += 10.5
    quota.forget_stale()
    assert quota.hit("u").allowed
