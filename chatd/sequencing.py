"""Pure ordering logic: every socket sees a room's messages in seq order, once.

Two places need it:

* ``RoomSequencer``, one per room per worker.  Messages reach a worker from
  Redis (several publishers: commits of other workers and instances) and from
  its own group commit.  Postgres assigns seqs in commit order, but publishes
  can overtake each other, and a publish can be lost (publisher crashed after
  commit, Redis blinked).  The sequencer releases messages strictly in seq
  order, drops duplicates, holds later ones while a gap is open, and reports
  the gap so the worker can read the missing seqs from Postgres after
  ``gap_timeout_s``.

* ``JoinMerge``, one per socket joining with ``since_seq``.  The socket is
  subscribed first, then history is read; live frames that arrive meanwhile
  are held, then history and held frames are merged by seq: no gap (the
  subscription predates the read) and no duplicate (dedupe by seq).

Frames without a seq (typing, presence, edits, stream chunks) are not ordered
against messages and pass straight through.  Time is injected.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field
from typing import Generic, TypeVar

T = TypeVar("T")


@dataclass
class RoomSequencer(Generic[T]):
    """Releases ``(seq, item)`` pairs in order starting at ``next_seq``."""

    next_seq: int
    gap_timeout_s: float = 0.25
    _held: list[tuple[int, int, T]] = field(default_factory=list)  # heap of (seq, tiebreak, item)
    _held_seqs: set[int] = field(default_factory=set)
    _gap_since: float | None = None
    _counter: int = 0

    def offer(self, seq: int, item: T, now: float) -> list[T]:
        """Accept one message; return what is now deliverable, in order."""
        if seq < self.next_seq or seq in self._held_seqs:
            return []  # duplicate: already delivered or already waiting
        self._counter += 1
        heapq.heappush(self._held, (seq, self._counter, item))
        self._held_seqs.add(seq)
        return self._release(now)

    def _release(self, now: float) -> list[T]:
        out: list[T] = []
        while self._held and self._held[0][0] == self.next_seq:
            seq, _, item = heapq.heappop(self._held)
            self._held_seqs.discard(seq)
            out.append(item)
            self.next_seq += 1
        if self._held:
            if self._gap_since is None:
                self._gap_since = now
        else:
            self._gap_since = None
        return out

    def missing(self, now: float) -> tuple[int, int] | None:
        """``(first, last)`` seqs to fetch from Postgres when a gap outlived the timeout."""
        if self._gap_since is None or now - self._gap_since < self.gap_timeout_s:
            return None
        return self.next_seq, self._held[0][0] - 1

    def fill(self, rows: list[tuple[int, T]], now: float) -> list[T]:
        """Offer what Postgres returned for a gap; skip seqs Postgres does not have."""
        out: list[T] = []
        for seq, item in sorted(rows, key=lambda r: r[0]):
            out += self.offer(seq, item, now)
        gap = self.missing(now)
        if gap is not None and not any(gap[0] <= seq <= gap[1] for seq, _ in rows):
            # Postgres does not have these seqs: they were never committed. Move on.
            self.next_seq = gap[1] + 1
            out += self._release(now)
        return out

    def reset(self, next_seq: int, now: float) -> list[T]:
        """Jump forward (e.g. after reading last_seq on resubscribe); release what became contiguous."""
        if next_seq > self.next_seq:
            self.next_seq = next_seq
            while self._held and self._held[0][0] < self.next_seq:
                seq, _, _ = heapq.heappop(self._held)
                self._held_seqs.discard(seq)
        return self._release(now)

    @property
    def held(self) -> int:
        return len(self._held)


@dataclass
class JoinMerge(Generic[T]):
    """Live frames held while a joining socket reads its history."""

    _held: list[tuple[int | None, T]] = field(default_factory=list)

    def hold(self, seq: int | None, item: T) -> None:
        self._held.append((seq, item))

    def merge(self, history: list[tuple[int, T]], last_history_seq: int) -> list[T]:
        """History first, then held frames that history did not already contain.

        Held message frames with ``seq <= last_history_seq`` are duplicates of
        history rows; held frames without a seq are kept in arrival order.
        """
        out = [item for _, item in sorted(history, key=lambda r: r[0])]
        for seq, item in self._held:
            if seq is None or seq > last_history_seq:
                out.append(item)
        self._held.clear()
        return out
