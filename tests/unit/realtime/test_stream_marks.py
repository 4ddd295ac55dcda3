"""A socket's stream marks (the catch-up of streams it joined mid-way) stay bounded."""

from __future__ import annotations

from chatd.core.roomlog import MAX_STREAM_MARKS, mark_stream


def test_marks_keep_the_newest_and_a_repeated_stream_moves_to_the_end() -> None:
    marks: dict[int, int] = {}
    for mid in range(MAX_STREAM_MARKS + 10):
        mark_stream(marks, mid, 3)
    assert len(marks) == MAX_STREAM_MARKS
    assert min(marks) == 10  # the oldest went first
    mark_stream(marks, 10, 7)  # joined the same stream again: its newer catch-up, kept longest
    mark_stream(marks, 10_000, 0)
    assert marks[10] == 7 and 11 not in marks
