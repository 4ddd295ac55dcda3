"""BusyPacer: the retry_after_ms of a send refused with busy (pure, injected clock)."""

from __future__ import annotations

import pytest

from chatd.realtime.writer import BusyPacer


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def run_window(pacer: BusyPacer, clock: Clock, accepted: int, refused: int, queued: int) -> list[int]:
    """One second: ``refused`` sends refused (their waits come from the windows before), ``accepted`` queued."""
    waits = [pacer.refused(queued) for _ in range(refused)]
    for _ in range(accepted):
        pacer.accepted()
    clock.now += 1.0
    return waits


@pytest.mark.parametrize(
    ("accepted", "refused", "queued", "low_ms", "high_ms"),
    [
        # The queue drains in queued / rate s; no refusals in the last window: between 1x and 2x of it.
        (4000, 0, 1000, 250, 500),
        (1000, 0, 1000, 1000, 2000),
        # As many refused as accepted in the last window: the waits double (a half-weighted average).
        (4000, 4000, 1000, 250 * 1.5, 500 * 1.5 + 1),
        # Bounds: never under 100 ms, never over 5 s.
        (100_000, 0, 10, 100, 100),
        (10, 0, 1000, 5000, 5000),
    ],
)
def test_waits_follow_the_drain_time_and_the_refusals(
    accepted: int, refused: int, queued: int, low_ms: float, high_ms: float
) -> None:
    clock = Clock()
    pacer = BusyPacer(clock)
    run_window(pacer, clock, accepted, refused, queued)  # the window the next waits are computed from
    waits = run_window(pacer, clock, 0, 200, queued)
    assert low_ms <= min(waits) and max(waits) <= high_ms, (min(waits), max(waits))


def test_clients_refused_together_are_spread_over_the_window() -> None:
    clock = Clock()
    pacer = BusyPacer(clock)
    run_window(pacer, clock, 2000, 0, 1000)  # drain time 500 ms
    waits = run_window(pacer, clock, 0, 100, 1000)
    assert len(set(waits)) > 50, "refused at the same moment, they must not all come back at the same moment"
    assert 500 <= min(waits) < 550 and 950 < max(waits) <= 1000


def test_a_flood_lengthens_the_waits_until_it_stops() -> None:
    clock = Clock()
    pacer = BusyPacer(clock)
    calm = [max(run_window(pacer, clock, 2000, 10, 1000)) for _ in range(2)][-1]  # drain 500 ms, spread
    flooded = [max(run_window(pacer, clock, 2000, 6000, 1000)) for _ in range(4)]  # 3 refused per accepted
    assert flooded == sorted(flooded) and flooded[-1] > 3 * calm, (calm, flooded)
    after = [max(run_window(pacer, clock, 2000, 1, 1000)) for _ in range(6)]
    assert after == sorted(after, reverse=True) and after[-1] < 1.2 * calm, after


def test_first_window_uses_what_it_has_seen() -> None:
    clock = Clock()
    pacer = BusyPacer(clock)
    clock.now += 0.5
    for _ in range(1000):
        pacer.accepted()
    wait = pacer.refused(1000)  # 2,000 sends/s so far: 500 ms, spread to at most 2x
    assert 500 <= wait <= 1000
