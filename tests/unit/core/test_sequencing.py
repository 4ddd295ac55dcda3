from __future__ import annotations

import heapq
import random
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from chatd.core.sequencing import Gap, LatestChange, Revisions, RoomSequencer


@pytest.mark.parametrize(
    ("arrivals", "delivered"),
    [
        ([1, 2, 3], [1, 2, 3]),
        ([2, 1, 3], [1, 2, 3]),  # overtaken publish
        ([3, 2, 1], [1, 2, 3]),
        ([1, 1, 2, 2, 3], [1, 2, 3]),  # duplicates (local + Redis copy)
        ([2, 3], []),  # 1 missing: everything held
        ([0, 1], [1]),  # older than next_seq: already in history
    ],
)
def test_sequencer_orders_and_dedupes(arrivals: list[int], delivered: list[int]) -> None:
    seq = RoomSequencer[int](next_seq=1)
    out: list[int] = []
    for s in arrivals:
        out += seq.offer(s, s, now=0.0)
    assert out == delivered


def test_gap_reported_only_after_timeout_then_filled() -> None:
    seq = RoomSequencer[str](next_seq=5, gap_timeout_s=0.25)
    assert seq.offer(7, "m7", now=10.0) == []
    assert seq.missing(now=10.1) is None
    gap = seq.missing(now=10.3)
    assert gap == Gap(5, 7)
    filled = seq.fill(gap, [(5, "m5"), (6, "m6"), (7, "m7")], now=10.3)
    assert filled.released == ["m5", "m6", "m7"] and not filled.lost
    assert seq.missing(now=99.0) is None and seq.next_seq == 8


def test_one_read_fills_every_hole_up_to_the_highest_committed_seq() -> None:
    # After a Redis outage every other worker's seq is missing: one hole each.  One read covers them all
    # (a read per hole, one per timeout, fell further behind than a busy room was filled).
    seq = RoomSequencer[int](next_seq=10, gap_timeout_s=0.25)
    out = seq.offer(11, 11, now=0.0) + seq.offer(13, 13, now=0.0) + seq.offer(15, 15, now=0.0)
    gap = seq.missing(now=0.3)
    assert gap == Gap(10, 15)  # 13 and 15 exist, so 10..15 are all committed (seqs commit in order)
    filled = seq.fill(gap, [(s, s) for s in range(10, 16)], now=0.3)  # held ones come back too: dropped
    assert not filled.lost
    out += filled.released
    assert out == [10, 11, 12, 13, 14, 15]
    assert seq.missing(now=9.0) is None
    assert seq.offer(13, 13, now=9.0) == [] and seq.offer(16, 16, now=9.0) == [16]


def test_a_publish_arriving_during_the_read_is_released_once() -> None:
    seq = RoomSequencer[int](next_seq=10, gap_timeout_s=0.25)
    out = seq.offer(11, 11, now=0.0) + seq.offer(13, 13, now=0.0)
    gap = seq.missing(now=0.3)
    assert gap == Gap(10, 13)
    out += seq.offer(10, 10, now=0.31) + seq.offer(12, 12, now=0.31)  # the lost-looking publishes were late
    assert out == [10, 11, 12, 13]
    filled = seq.fill(gap, [(s, s) for s in range(10, 14)], now=0.32)
    assert filled.released == [] and not filled.lost


def test_probe_finds_the_last_message_of_a_quiet_room() -> None:
    seq = RoomSequencer[str](next_seq=4, gap_timeout_s=0.25)
    seq.note_committed(3, now=0.0)  # nothing new
    assert seq.missing(now=5.0) is None
    seq.note_committed(5, now=1.0)  # 4 and 5 committed, their publishes lost
    assert seq.missing(now=1.1) is None
    gap = seq.missing(now=1.3)
    assert gap == Gap(4, 5)
    assert seq.fill(gap, [(4, "m4"), (5, "m5")], now=1.3).released == ["m4", "m5"]


def test_urgent_fill_does_not_wait_for_the_timeout() -> None:
    seq = RoomSequencer[str](next_seq=1)
    seq.note_committed(2, now=0.0)
    assert seq.missing(now=0.0) is None
    assert seq.missing(now=0.0, urgent=True) == Gap(1, 2)


def test_fill_is_bounded_to_max_fill() -> None:
    seq = RoomSequencer[int](next_seq=1, gap_timeout_s=0.0, max_fill=10)
    seq.note_committed(100, now=0.0)
    gap = seq.missing(now=0.0)
    assert gap == Gap(1, 10)
    assert seq.fill(gap, [(s, s) for s in range(1, 11)], now=0.0).released == list(range(1, 11))
    assert seq.missing(now=0.0) == Gap(11, 20)


def test_a_seq_postgres_does_not_have_is_reported_lost_and_skipped() -> None:
    seq = RoomSequencer[int](next_seq=1, gap_timeout_s=0.0)
    seq.offer(4, 4, now=0.0)
    gap = seq.missing(now=0.0)
    assert gap == Gap(1, 4)
    filled = seq.fill(gap, [(1, 1), (3, 3), (4, 4)], now=0.0)  # 2 is gone: an invariant breach
    assert filled.released == [1, 3, 4]
    assert filled.lost == [Gap(2, 2)]
    assert seq.next_seq == 5


def test_live_arrivals_during_a_fill_are_not_lost_or_doubled() -> None:
    seq = RoomSequencer[int](next_seq=1, gap_timeout_s=0.0)
    seq.offer(3, 3, now=0.0)
    gap = seq.missing(now=0.0)
    assert gap == Gap(1, 3)
    out = seq.offer(1, 1, now=0.01)  # arrived while the read ran
    filled = seq.fill(gap, [(1, 1), (2, 2), (3, 3)], now=0.02)
    assert out + filled.released == [1, 2, 3] and not filled.lost


def test_held_messages_are_bounded() -> None:
    seq = RoomSequencer[int](next_seq=1, gap_timeout_s=0.0, max_held=5)
    for s in range(2, 12):
        seq.offer(s, s, now=0.0)
    assert seq.held == 5
    assert seq.committed == 11  # the dropped ones are still known to exist
    gap = seq.missing(now=0.0)
    assert gap == Gap(1, 11)
    out = seq.fill(gap, [(s, s) for s in range(1, 12)], now=0.0).released
    assert out == list(range(1, 12))


# -- property: any arrival order, loss, duplication, delay, probe and fill timing ---------------


@dataclass(frozen=True)
class _Msg:
    commit_at: float
    copies: tuple[float, ...]  # delays of its publishes' arrivals; () = every publish lost


_msgs = st.lists(
    st.builds(
        _Msg,
        commit_at=st.floats(0, 5, allow_nan=False),
        copies=st.lists(st.floats(0, 3, allow_nan=False), max_size=3).map(tuple),
    ),
    min_size=1,
    max_size=40,
)


@settings(max_examples=400, deadline=None)
@given(
    msgs=_msgs,
    start=st.integers(1, 5),
    probes=st.lists(st.floats(0, 10, allow_nan=False), max_size=8),
    ticks=st.lists(st.tuples(st.floats(0, 10, allow_nan=False), st.floats(0, 2, allow_nan=False)), max_size=20),
    gap_timeout_s=st.sampled_from([0.0, 0.05, 0.25, 1.0]),
    max_held=st.integers(1, 50),
    max_fill=st.integers(1, 50),
)
def test_every_seq_released_exactly_once_and_in_order(
    msgs: list[_Msg],
    start: int,
    probes: list[float],
    ticks: list[tuple[float, float]],
    gap_timeout_s: float,
    max_held: int,
    max_fill: int,
) -> None:
    # Postgres commits a room's seqs in seq order: seq start+i commits at the i-th commit time.
    commit_times = sorted(m.commit_at for m in msgs)
    seqs = list(range(start, start + len(msgs)))
    committed_at = dict(zip(seqs, commit_times, strict=True))

    def committed_by(t: float) -> int:
        return max((s for s in seqs if committed_at[s] <= t), default=start - 1)

    # Events in time order: publishes (after their commit), probes, filler ticks and their
    # reads completing later (the read's snapshot is taken when it starts).
    events: list[tuple[float, int, str, tuple[object, ...]]] = []
    n = 0
    for s, m in zip(seqs, msgs, strict=True):
        for d in m.copies:
            events.append((committed_at[s] + d, (n := n + 1), "pub", (s,)))
    for t in probes:
        events.append((t, (n := n + 1), "probe", ()))
    for t, latency in ticks:
        events.append((t, (n := n + 1), "tick", (latency,)))
    heapq.heapify(events)

    seq = RoomSequencer[int](start, gap_timeout_s, max_held=max_held, max_fill=max_fill)
    out: list[int] = []
    reading = False

    def read(gap: Gap, at: float) -> list[tuple[int, int]]:
        upto = committed_by(at)
        return [(s, s) for s in range(gap.first, min(gap.last, upto) + 1)]

    while events:
        t, _, kind, args = heapq.heappop(events)
        if kind == "pub":
            out += seq.offer(int(args[0]), int(args[0]), t)  # type: ignore[call-overload]
        elif kind == "probe":
            seq.note_committed(committed_by(t), t)
        elif kind == "tick" and not reading:
            gap = seq.missing(t)
            if gap is not None:
                reading = True
                heapq.heappush(events, (t + float(args[0]), (n := n + 1), "done", (gap, read(gap, t))))  # type: ignore[arg-type]
        elif kind == "done":
            reading = False
            filled = seq.fill(args[0], args[1], t)  # type: ignore[arg-type]
            assert not filled.lost
            out += filled.released
        assert out == list(range(start, start + len(out)))  # in order, no duplicate, no skip

    # Quiet afterwards: one probe, then the filler runs until nothing is missing.
    end = 100.0
    seq.note_committed(committed_by(end), end)
    for i in range(len(msgs) + 2):
        gap = seq.missing(end + (i + 1) * (gap_timeout_s + 0.01))
        if gap is None:
            break
        filled = seq.fill(gap, read(gap, end), end)
        assert not filled.lost
        out += filled.released
    assert out == seqs


def test_random_permutations_with_duplicates_deliver_each_once_in_order() -> None:
    rng = random.Random(7)
    for _ in range(200):
        seqs = list(range(1, 40))
        arrivals = seqs + rng.sample(seqs, 10)
        rng.shuffle(arrivals)
        sequencer = RoomSequencer[int](next_seq=1)
        out: list[int] = []
        for s in arrivals:
            out += sequencer.offer(s, s, now=0.0)
        assert out == seqs


# -- Revisions: edits and deletes once each, missed ones found ------------------------------------------


def test_revisions_deliver_each_change_once_in_any_order() -> None:
    revs = Revisions(delivered=10, gap_timeout_s=0.25)
    assert [revs.offer(r, now=0.0) for r in (12, 11, 12, 10, 13)] == [True, True, False, False, True]
    assert revs.delivered == 13 and revs.missing(now=9.0) is None


def test_revisions_find_a_lost_change_by_probe_and_fill_it_once() -> None:
    revs = Revisions(delivered=3, gap_timeout_s=0.25)
    revs.note_committed(5, now=1.0)  # two changes happened; their publishes were lost
    assert revs.missing(now=1.1) is None
    after = revs.missing(now=1.3)
    assert after == 3
    # A message keeps only its latest revision: rev 4 was superseded by 5 on the same message.
    assert revs.fill(after, revs.committed, [(5, "m1 v2")], complete=True, now=1.3) == ["m1 v2"]
    assert revs.delivered == 5 and revs.missing(now=9.0) is None


def test_revisions_fill_skips_what_arrived_live_meanwhile_and_respects_a_cut_read() -> None:
    revs = Revisions(delivered=0, gap_timeout_s=0.0)
    revs.note_committed(4, now=0.0)
    after = revs.missing(now=0.0)
    assert after == 0
    assert revs.offer(2, now=0.0)  # arrived while the read ran
    got = revs.fill(after, 4, [(1, "a"), (2, "b")], complete=False, now=0.0)  # the read hit its limit at rev 2
    assert got == ["a"] and revs.delivered == 2
    assert revs.missing(now=0.0) == 2  # 3 and 4 are still to read
    assert revs.fill(2, 4, [(3, "c"), (4, "d")], complete=True, now=0.0) == ["c", "d"]


# -- a lost edit is read back within the gap timeout, however many later edits keep arriving ------------


@pytest.mark.parametrize(
    ("arrival_every_s", "probe"),
    [
        (0.05, False),  # a busy room: later edits arrive far more often than the timeout
        (0.1, False),
        (0.2, False),  # just under the timeout
        (0.3, False),  # slower than the timeout
        (0.1, True),  # and the probe reports the lost one as committed meanwhile
    ],
)
def test_a_lost_revision_is_read_within_the_timeout_while_later_ones_keep_arriving(
    arrival_every_s: float, probe: bool
) -> None:
    timeout_s, tick_s = 0.25, 0.01  # tick: how often the repair loop asks (finer than chatd's, for precision)
    revs = Revisions(delivered=10, gap_timeout_s=timeout_s)
    now, next_rev, next_arrival = 0.0, 12, 0.0  # rev 11's publish was lost
    missing_since: float | None = None
    asked_at: float | None = None
    while now < 5.0 and asked_at is None:
        if now >= next_arrival:
            assert revs.offer(next_rev, now)
            if missing_since is None:
                missing_since = now  # rev 12 shows that 11 exists
            next_rev += 1
            next_arrival += arrival_every_s
        if probe:
            revs.note_committed(next_rev - 1, now)
        if revs.missing(now) is not None:
            asked_at = now
        now = round(now + tick_s, 6)
    assert asked_at is not None, "rev 11 was never read back"
    assert missing_since is not None and asked_at - missing_since <= timeout_s + tick_s
    after = revs.missing(asked_at)
    assert after == 10
    assert revs.fill(after, revs.committed, [(11, "m11")], complete=True, now=asked_at) == ["m11"]
    assert revs.delivered == next_rev - 1 and revs.missing(asked_at + 9) is None


def test_a_hole_found_later_waits_its_own_timeout_not_the_first_ones() -> None:
    revs = Revisions(delivered=0, gap_timeout_s=0.25)
    assert revs.offer(2, now=0.0)  # 1 missing since 0.0
    assert revs.missing(now=0.2) is None
    assert revs.offer(1, now=0.2)  # it was only late: delivered is 2
    assert revs.offer(4, now=0.3)  # 3 missing since 0.3, not since 0.0
    assert revs.missing(now=0.5) is None
    assert revs.missing(now=0.55) == 2
    assert revs.offer(5, now=0.56) and revs.missing(now=0.57) == 2  # later arrivals do not push it back


def test_after_a_cut_read_the_rest_is_read_at_once_and_a_complete_read_leaves_only_newer_holes() -> None:
    revs = Revisions(delivered=0, gap_timeout_s=0.25)
    revs.note_committed(10, now=0.0)
    assert revs.missing(now=0.3) == 0
    assert revs.fill(0, 10, [(1, "a"), (2, "b")], complete=False, now=0.3) == ["a", "b"]
    assert revs.missing(now=0.3) == 2  # missing since 0.0: no new wait
    assert revs.offer(12, now=0.35)  # 11 goes missing at 0.35
    assert revs.fill(2, 10, [(5, "e")], complete=True, now=0.4) == ["e"]  # 3, 4, 6..10 superseded
    assert revs.delivered == 10
    assert revs.missing(now=0.5) is None and revs.missing(now=0.6) == 10  # 11: its own timeout from 0.35


@pytest.mark.parametrize("arrival_every_s", [0.05, 0.1, 0.2])
def test_the_sequencer_too_reads_a_lost_seq_within_the_timeout_while_later_ones_keep_arriving(
    arrival_every_s: float,
) -> None:
    # Held later seqs never restart its clock (only releasing the first missing one does).
    seq = RoomSequencer[int](next_seq=11, gap_timeout_s=0.25)
    now, asked_at, s = 0.0, None, 12  # 11 was lost
    while now < 5.0 and asked_at is None:
        if now >= (s - 12) * arrival_every_s:
            assert seq.offer(s, s, now) == []
            s += 1
        if seq.missing(now) is not None:
            asked_at = now
        now = round(now + 0.01, 6)
    assert asked_at is not None and asked_at <= 0.25 + 0.01


def test_revisions_remember_a_bounded_number_above_a_missing_one() -> None:
    revs = Revisions(delivered=0, gap_timeout_s=0.25, max_seen=4)
    assert all(revs.offer(r, now=0.0) for r in range(2, 12))  # 1 is missing: 2..11 wait for it
    assert len(revs._seen) <= 4
    remembered = set(revs._seen)
    assert revs.missing(now=1.0) == 0
    # The read returns 1 and every later change: the forgotten ones come a second time, nothing is missed.
    again = revs.fill(0, 11, [(r, r) for r in range(1, 12)], complete=True, now=1.0)
    assert again[0] == 1 and set(again) == set(range(1, 12)) - remembered  # each missing or forgotten one, once
    assert {10, 11} <= remembered
    assert revs.delivered == 11 and revs.missing(now=2.0) is None


@pytest.mark.parametrize(
    ("arrivals", "delivered"),
    [
        ([(9, 5), (9, 6)], [(9, 5), (9, 6)]),  # in order
        ([(9, 6), (9, 5)], [(9, 6)]),  # the edit (5) behind its delete (6): dropped
        ([(9, 6), (9, 6)], [(9, 6)]),  # a copy
        ([(9, 6), (8, 5)], [(9, 6), (8, 5)]),  # another message: its own order
    ],
)
def test_latest_change_drops_a_change_older_than_one_delivered(
    arrivals: list[tuple[int, int]], delivered: list[tuple[int, int]]
) -> None:
    latest = LatestChange()
    assert [a for a in arrivals if latest.newer(*a)] == delivered


def test_latest_change_is_bounded() -> None:
    latest = LatestChange(max_messages=2)
    for mid in (1, 2, 3):
        assert latest.newer(mid, 10)
    assert latest.newer(1, 5)  # forgotten: an old change of it is delivered (the bound's price)
    assert not latest.newer(3, 5)
