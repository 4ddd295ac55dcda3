from __future__ import annotations

import pytest

from chatd.core.framelimits import FrameLimiter, TokenBucket


def test_token_bucket_allows_a_burst_then_the_rate() -> None:
    now = 100.0
    bucket = TokenBucket(rate_per_s=2.0, burst=3)
    assert [bucket.take(now) for _ in range(4)] == [0.0, 0.0, 0.0, pytest.approx(0.5)]
    now += 0.5  # one token back
    assert bucket.take(now) == 0.0
    assert bucket.take(now) == pytest.approx(0.5)
    now += 100  # refills to the burst, never beyond
    assert [bucket.take(now) for _ in range(4)][-1] > 0


def _limiter(max_violations: int = 3) -> FrameLimiter:
    return FrameLimiter(
        limits={"all": (100.0, 10), "join": (1.0, 2), "typing": (1.0, 1)},
        groups={"join": "join", "leave": "join", "typing": "typing"},
        max_violations=max_violations,
        violation_window_s=10.0,
    )


def test_frame_limiter_limits_each_group_and_shares_one_bucket_for_all() -> None:
    limiter = _limiter()
    now = 100.0
    assert [limiter.hit("join", now).allowed for _ in range(3)] == [True, True, False]
    assert not limiter.hit("leave", now).allowed  # leave shares join's bucket
    assert limiter.hit("typing", now).allowed and not limiter.hit("typing", now).allowed
    refused = limiter.hit("join", now)
    assert refused.retry_after_ms == 1000
    assert all(limiter.hit("ping", now).allowed for _ in range(3))  # ungrouped: only the shared bucket...
    assert not limiter.hit("ping", now).allowed  # ...10 frames of any kind, refused ones included


@pytest.mark.parametrize(
    ("max_violations", "times", "closes"),
    [
        (3, [0, 0, 0], [False, False, True]),
        (3, [0, 0, 11, 11, 11], [False, False, False, False, True]),  # the first two left the window
        (3, [0, 0, 10], [False, False, False]),  # exactly window_s later: the first ones are out
        (1, [0], [True]),  # the first one closes
    ],
)
def test_frame_limiter_closes_after_max_violations_within_the_window(
    max_violations: int, times: list[float], closes: list[bool]
) -> None:
    limiter = _limiter(max_violations)
    assert [limiter.violation(100.0 + t) for t in times] == closes
