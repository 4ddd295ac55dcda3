"""The revocation log's bookkeeping, without I/O: each revocation is applied once."""

from __future__ import annotations

import pytest

from chatd.services.revocations import Seen
from chatd.storage.revocations import Revocation


def rev(rid: int) -> Revocation:
    return Revocation(rid, user_id=7, room_id=None, family=None)


@pytest.mark.parametrize(
    ("reads", "fresh"),
    [
        # (time, ids read) per poll -> ids new at each poll
        ([(0, [1, 2])], [[1, 2]]),
        ([(0, [1, 2]), (1, [1, 2, 3])], [[1, 2], [3]]),
        ([(0, [2]), (1, [1, 2])], [[2], [1]]),  # a row that committed after a later id is still applied
        ([(0, [1]), (59, [1]), (60, [1])], [[1], [], []]),  # remembered for as long as a read may return it
        ([(0, [1]), (121, [])], [[1], []]),
    ],
)
def test_each_revocation_is_fresh_once(reads: list[tuple[float, list[int]]], fresh: list[list[int]]) -> None:
    seen = Seen(window_s=60)
    got = [[r.id for r in seen.fresh([rev(i) for i in ids], now)] for now, ids in reads]
    assert got == fresh


def test_forgotten_only_after_twice_the_window() -> None:
    seen = Seen(window_s=60)
    assert [r.id for r in seen.fresh([rev(1)], 0)] == [1]
    assert seen.fresh([rev(1)], 119) == []
    seen.fresh([], 121)
    assert [r.id for r in seen.fresh([rev(1)], 122)] == [1]  # out of the read's window by then in practice
