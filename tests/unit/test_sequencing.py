from __future__ import annotations

import random

import pytest

from chatd.sequencing import JoinMerge, RoomSequencer


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
    assert seq.missing(now=10.3) == (5, 6)
    assert seq.fill([(5, "m5"), (6, "m6")], now=10.3) == ["m5", "m6", "m7"]
    assert seq.missing(now=99.0) is None and seq.next_seq == 8


def test_fill_skips_seqs_postgres_does_not_have() -> None:
    seq = RoomSequencer[str](next_seq=1, gap_timeout_s=0.0)
    seq.offer(3, "m3", now=0.0)
    assert seq.fill([], now=1.0) == ["m3"]
    assert seq.next_seq == 4


def test_reset_jumps_forward_and_drops_older_held() -> None:
    seq = RoomSequencer[int](next_seq=1)
    seq.offer(3, 3, now=0.0)
    seq.offer(6, 6, now=0.0)
    assert seq.reset(5, now=0.0) == []  # 3 is older than 5: dropped
    assert seq.offer(5, 5, now=0.0) == [5, 6]
    assert seq.held == 0


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


def test_join_merge_no_gap_no_duplicate() -> None:
    merge = JoinMerge[str]()
    merge.hold(9, "live9")  # committed between subscribe and history read: in both
    merge.hold(None, "typing")
    merge.hold(10, "live10")
    history = [(8, "h8"), (9, "h9")]
    assert merge.merge(history, last_history_seq=9) == ["h8", "h9", "typing", "live10"]


def test_join_merge_empty_history() -> None:
    merge = JoinMerge[str]()
    merge.hold(4, "live4")
    assert merge.merge([], last_history_seq=3) == ["live4"]
