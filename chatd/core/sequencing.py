"""Pure ordering logic: every socket sees a room's messages in seq order, each once.

Seqs are gap-free by construction: ``storage.messages.commit_batch`` and
``storage.answers.persist_answer`` take ``rooms.last_seq + 1`` under the room's row
lock, so a room's commits happen in seq order and every seq up to
``rooms.last_seq`` is in Postgres.

``RoomSequencer``, one per room per worker (in the room's log).  Messages reach a worker from
  Redis (commits of other workers and instances) and from its own group commit.
  Publishes can overtake each other and can be lost (a publisher crashed after
  its commit, Redis blinked).  The sequencer releases messages strictly in seq
  order, drops duplicates, holds later ones while an earlier one is missing,
  and asks for the missing range (``missing``: every hole up to the highest
  committed seq, in one read) once it has been missing for ``gap_timeout_s``.
  It learns that seqs exist from held messages
  and from probes of ``rooms.last_seq`` (``note_committed``), so the last
  message of a quiet room is found even when its publish was lost.  It never
  releases past a seq it has not released: a seq that Postgres cannot return
  although it must exist is an invariant breach, reported by ``fill``.

The live frames held while sockets join a room, and their merge with each joiner's history, are the
room log's (``chatd.core.roomlog``), which holds a room's sequencer, revisions and latest changes.

Frames without a seq (typing, edits, stream chunks) are not ordered against
messages and pass straight through.  Time is an argument: nothing here reads
a clock or does I/O.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field
from typing import Generic, TypeVar

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Gap:
    """Seqs ``first..last`` (inclusive) to read from Postgres."""

    first: int
    last: int

    @property
    def count(self) -> int:
        return self.last - self.first + 1


@dataclass(frozen=True, slots=True)
class Filled(Generic[T]):
    released: list[T]
    lost: list[Gap] = field(default_factory=list)  # committed seqs Postgres did not return: an invariant breach


class RoomSequencer(Generic[T]):
    """Releases ``(seq, item)`` pairs in order starting at ``next_seq``."""

    def __init__(self, next_seq: int, gap_timeout_s: float = 0.25, max_held: int = 10_000, max_fill: int = 500) -> None:
        if next_seq < 1 or max_held < 1 or max_fill < 1:
            raise ValueError("next_seq, max_held and max_fill must be positive")
        self.next_seq = next_seq
        self.committed = next_seq - 1  # highest seq known to be in Postgres
        self.gap_timeout_s = gap_timeout_s
        self.max_held = max_held
        self.max_fill = max_fill
        self._held: dict[int, T] = {}
        self._stalled_since: float | None = None  # next_seq has been behind `committed` since then

    @property
    def held(self) -> int:
        return len(self._held)

    def offer(self, seq: int, item: T, now: float) -> list[T]:
        """Accept one message; return what is now deliverable, in order."""
        if seq < self.next_seq or seq in self._held:
            return []  # a duplicate: already released or already waiting
        if seq > self.committed:
            self.committed = seq
        if seq != self.next_seq:
            self._held[seq] = item
            if len(self._held) > self.max_held:
                # Memory stays bounded; the dropped message is committed, so a fill reads it back.
                del self._held[max(self._held)]
            self._track(now, advanced=False)
            return []
        out = [item]
        self.next_seq += 1
        self._release_contiguous(out)
        self._track(now, advanced=True)
        return out

    def note_committed(self, last_seq: int, now: float) -> None:
        """A probe read ``rooms.last_seq``: every seq up to it is in Postgres."""
        if last_seq > self.committed:
            self.committed = last_seq
            self._track(now, advanced=False)

    def missing(self, now: float, *, urgent: bool = False) -> Gap | None:
        """The range to read from Postgres, once it has been missing for ``gap_timeout_s``.

        From the first missing seq to the highest committed one (at most ``max_fill``): every hole
        in one read.  Held seqs inside it come back too and are dropped as duplicates; reading only
        up to the first held seq filled one hole per timeout, so after a Redis outage (every other
        worker's seq missing, one hole each) a busy room fell further behind than it was filled.

        ``urgent``: read now (e.g. after a Redis reconnect, when publishes were surely lost).
        """
        if self._stalled_since is None:
            return None
        if not urgent and now - self._stalled_since < self.gap_timeout_s:
            return None
        first = self.next_seq
        return Gap(first, min(self.committed, first + self.max_fill - 1))

    def fill(self, gap: Gap, rows: list[tuple[int, T]], now: float) -> Filled[T]:
        """Offer what Postgres returned for ``gap``.

        Every seq of the gap is committed (``missing`` only asks for such seqs),
        so the rows cover it unless Postgres lost a message.  Then, and only
        then, the sequencer moves past it and reports it as ``lost``.
        """
        out: list[T] = []
        for seq, item in sorted(rows, key=lambda r: r[0]):
            out += self.offer(seq, item, now)
        lost: list[Gap] = []
        while self.next_seq <= gap.last:  # a hole: skip exactly the seqs Postgres did not return
            after = min((s for s in self._held if s <= gap.last), default=gap.last + 1)
            lost.append(Gap(self.next_seq, after - 1))
            self.next_seq = after
            self._release_contiguous(out)
        # The read counts as an attempt: what is still missing waits a full timeout again.
        self._track(now, advanced=True)
        return Filled(out, lost)

    def _release_contiguous(self, out: list[T]) -> None:
        held = self._held
        while held:
            item = held.pop(self.next_seq, None)
            if item is None:
                break
            out.append(item)
            self.next_seq += 1

    def _track(self, now: float, advanced: bool) -> None:
        if self.committed < self.next_seq:
            self._stalled_since = None
        elif advanced or self._stalled_since is None:
            self._stalled_since = now


class Revisions:
    """Edits and deletes of a room by revision (``rooms.edit_rev``): each delivered once, none missed.

    Unlike messages they need no order (each carries the message's whole new
    state), only completeness: revisions up to ``delivered`` are done; later
    ones seen live are remembered until the floor reaches them.  A message
    keeps only the revision of its last change, so a read of "changed after
    the floor" returns every message whose latest change was missed, and the
    revisions it does not return were superseded by ones it does.

    A revision is missing from the moment a later one arrives or a probe reports
    it committed, and is read once it has been missing for ``gap_timeout_s``.
    Later arrivals do not restart that clock: they come all the time in a busy
    room, and a lost edit would never be read back.

    At most ``max_seen`` revisions above a missing one are remembered (while the
    read cannot be made, Postgres down): beyond, the older half is forgotten, and
    the read may deliver those a second time (harmless: a change frame carries
    the message's whole state).
    """

    def __init__(self, delivered: int, gap_timeout_s: float = 0.25, max_seen: int = 10_000) -> None:
        self.delivered = delivered
        self.committed = delivered
        self.gap_timeout_s = gap_timeout_s
        self.max_seen = max_seen
        self._seen: set[int] = set()
        # (rev, since): the revisions above the previous mark up to ``rev`` have been known committed since
        # ``since``; one mark per raise of ``committed``, the oldest first, none at or below ``delivered``.
        self._known: collections.deque[tuple[int, float]] = collections.deque()

    def offer(self, rev: int, now: float) -> bool:
        """True: deliver this change (first copy, not older than what was delivered)."""
        if rev <= self.delivered or rev in self._seen:
            return False
        self._seen.add(rev)
        self.note_committed(rev, now)
        self._advance()
        if len(self._seen) > self.max_seen:
            self._seen = set(sorted(self._seen)[len(self._seen) // 2 :])
        return True

    def note_committed(self, rev: int, now: float) -> None:
        if rev > self.committed:
            self.committed = rev
            self._known.append((rev, now))

    def missing(self, now: float, *, urgent: bool = False) -> int | None:
        """Read the messages changed after this revision, once the first missing one has been missing for the
        timeout."""
        if not self._known or (not urgent and now - self._known[0][1] < self.gap_timeout_s):
            return None
        return self.delivered

    def fill(self, after: int, upto: int, rows: list[tuple[int, T]], complete: bool, now: float) -> list[T]:
        """Changes read for revisions after ``after`` (``upto``: ``committed`` when the read was asked).

        ``complete``: the read was not cut by its limit, so every revision up to
        ``upto`` is now delivered or superseded.  What a cut read left is read at
        the next ``missing``: it has been missing for the timeout already.
        """
        out = [item for rev, item in sorted(rows, key=lambda r: r[0]) if rev > self.delivered and rev not in self._seen]
        floor = max([r for r, _ in rows], default=after)
        if complete:
            floor = max(floor, upto)
        if floor > self.delivered:
            self.delivered = floor
            self._seen = {r for r in self._seen if r > floor}
        self._advance()
        self.committed = max(self.committed, self.delivered)
        return out

    def _advance(self) -> None:
        while self.delivered + 1 in self._seen:
            self.delivered += 1
            self._seen.discard(self.delivered)
        known = self._known
        while known and known[0][0] <= self.delivered:
            known.popleft()


class LatestChange:
    """The newest change (room revision) delivered per message, so an older one arriving later is dropped.

    Revisions make changes complete, not ordered: an edit committed just before a delete can reach a worker
    after it, and would show the deleted message edited.  Remembers ``max_messages`` messages (the least
    recently changed go first; an older change of one of those arriving that late is delivered).
    """

    def __init__(self, max_messages: int = 10_000) -> None:
        self.max_messages = max_messages
        self._rev: collections.OrderedDict[int, int] = collections.OrderedDict()

    def newer(self, message_id: int, rev: int) -> bool:
        """True (and remembered) unless a later change of this message was delivered already."""
        last = self._rev.get(message_id)
        if last is not None and rev <= last:
            return False
        self._rev[message_id] = rev
        self._rev.move_to_end(message_id)
        if len(self._rev) > self.max_messages:
            self._rev.popitem(last=False)
        return True
