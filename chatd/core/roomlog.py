"""One room on one worker, sans I/O: which of its sockets gets which frame, in order, once.

A ``RoomLog`` holds everything a worker knows of one room's stream: the ``RoomSequencer`` (messages in
seq order, each once, holes read back), the ``Revisions`` and ``LatestChange`` (edits and deletes once
each, never an older one after a newer one), the ``PresenceView``, the room's epoch, and one
``Subscription`` per local socket with an explicit state:

    (none) --join--> JOINING --finish--> LIVE --leave / kick--> LEFT
                        |  ^                |
                        |  +----join--------+   (a rejoin starts over: nothing of the room until it finishes)
                        +--leave / kick (at finish)--> LEFT

A JOINING subscription gets nothing; the live frames arriving meanwhile are held in one log shared by
every joiner (each joiner is a start position in it, so a hot room holds each frame once, not once per
joiner; bounded: beyond ``max_held`` every joiner then holding is told to resync).  ``finish`` merges
its history (read after the subscription, so nothing falls between) with what was held: no gap, no
duplicate.  A LIVE subscription has its delivered seq (nothing at or below it is written again) and its
stream marks (chunks of a running answer that its catch-up already contained).

Inputs: messages (this worker's commits and other workers' publishes), seq-less frames, changes,
presence announcements and heals, fills and probes from repair, joins, finishes and leaves, the epoch a
join read.  Outputs: the writes ``(frame bytes, sockets)``, returned in the order they must be made,
and the needs in ``needs`` (``Kick`` a socket, ``Resync`` sockets, ``Probe`` the room), which the caller
drains after the writes.  Holes to fill are asked with ``missing_messages`` / ``missing_changes``.

Membership is part of the stream: a seq'd ``member_left`` message (``Event.removes``) kicks the removed
user's subscriptions when it is released, before it is written to anyone, so a removed member reads
nothing of the room after its removal whatever happened to the kick's PUBLISH.  A joining subscription
is kicked at ``finish`` when a ``member_left`` for it was held with a seq after its read.

Sockets are opaque (any hashable); nothing here reads a clock, does I/O or touches a socket.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Generic, TypeVar

from chatd.core import server_frames, wsframe
from chatd.core.presence_view import PresenceView
from chatd.core.sequencing import Filled, Gap, LatestChange, Revisions, RoomSequencer

C = TypeVar("C")

MAX_STREAM_MARKS = 64  # streams a socket joined mid-way and has not seen a new chunk of yet


@dataclass(slots=True)
class Event:
    """One frame of the room, built (serialized and framed) once for every socket; never changed after.

    Not ``frozen``: one is built per event on the fan-out's hot path, and a frozen dataclass's
    ``__init__`` costs several times as much."""

    frame: bytes  # one or more complete WebSocket frames
    seq: int | None = None
    exclude: str | None = None  # connection id that must not receive it (its own echo)
    stream: tuple[int, int] | None = None  # (answer message id, chunk index; -1 = stream_start)
    removes: int | None = None  # a seq'd member_left: this user's subscriptions end at this seq


class State(Enum):
    JOINING = "joining"
    LIVE = "live"
    LEFT = "left"


class Subscription(Generic[C]):
    """One socket in the room."""

    __slots__ = ("conn", "connection_id", "marks", "overflowed", "seq", "start", "state", "user_id")

    def __init__(self, conn: C, user_id: int, connection_id: str) -> None:
        self.conn = conn
        self.user_id = user_id
        self.connection_id = connection_id
        self.state = State.JOINING
        self.seq = 0  # the last message seq this socket has (delivered, or in its history)
        self.marks: dict[int, int] = {}  # answer message id -> last chunk index its catch-up had
        self.start = 0  # JOINING: absolute position of its first held frame
        self.overflowed = False  # JOINING: held frames were dropped for it (it must resync)

    def admits(self, event: Event) -> bool:
        """Whether ``event`` is new to this socket (and, if so, it counts as delivered)."""
        if event.exclude is not None and event.exclude == self.connection_id:
            return False
        seq = event.seq
        if seq is not None:
            if seq <= self.seq:
                return False  # this socket already has it (history, or an earlier copy)
            self.seq = seq
        elif event.stream is not None and self.marks:
            mark = self.marks.get(event.stream[0])
            if mark is not None:
                if event.stream[1] <= mark:
                    return False  # part of the text this socket got when it joined mid-stream
                del self.marks[event.stream[0]]  # past the catch-up: every later chunk is new
        return True

    def mark_stream(self, message_id: int, index: int) -> None:
        mark_stream(self.marks, message_id, index)


def mark_stream(marks: dict[int, int], message_id: int, index: int) -> None:
    """Remember the catch-up of a running stream; the oldest marks go first beyond ``MAX_STREAM_MARKS``
    (a stream that ended right at the join leaves its mark until then)."""
    marks.pop(message_id, None)
    marks[message_id] = index
    while len(marks) > MAX_STREAM_MARKS:
        del marks[next(iter(marks))]


@dataclass(frozen=True, slots=True)
class Kick(Generic[C]):
    """The socket is out of the room (its user was removed): tell it, it is no longer subscribed."""

    conn: C


@dataclass(frozen=True, slots=True)
class Resync(Generic[C]):
    """These sockets cannot be brought up to date frame by frame: ``resync_required`` to each."""

    conns: list[C]
    last_seq: int
    epoch: str | None
    reason: str  # held_overflow, seq_lost, epoch


@dataclass(frozen=True, slots=True)
class Probe:
    """Read the room's last_seq and edit_rev now (its history changed: the revisions start over)."""


Need = Kick[C] | Resync[C] | Probe
Write = tuple[bytes, Sequence[C]]

_MEMBER_LEFT = b'"member_left"'  # inside message content a quote is escaped: only a JSON token matches


def member_left_user(payload: bytes) -> int | None:
    """The user a ``message`` frame's JSON removes from the room (a system ``member_left``), else None.

    A substring test first: one per message per worker, nothing parsed for any other message."""
    if _MEMBER_LEFT not in payload:
        return None
    try:
        frame = json.loads(payload)
    except ValueError:
        return None
    data = frame.get("data") if isinstance(frame, dict) and frame.get("kind") == "system" else None
    if isinstance(data, dict) and data.get("event") == "member_left":
        user_id = data.get("user_id")
        if type(user_id) is int:
            return user_id
    return None


class RoomLog(Generic[C]):
    def __init__(self, room_id: int, gap_timeout_s: float = 0.25, max_held: int = 10_000) -> None:
        self.room_id = room_id
        self.gap_timeout_s = gap_timeout_s
        self.max_held = max_held
        self.sequencer: RoomSequencer[Event] | None = None  # None until ``open``
        self.revisions: Revisions | None = None
        self.latest = LatestChange()  # per message: the newest change delivered
        self.presence: PresenceView | None = None  # members online anywhere, as these sockets were told
        self.epoch: str | None = None  # of the room's seqs, as the last join read it
        self.needs: list[Need[C]] = []  # drained by the caller after the writes
        self._early: list[Event] = []  # messages that arrived before ``open`` (bounded)
        self._live: dict[C, Subscription[C]] = {}
        self._joining: dict[C, Subscription[C]] = {}
        self._held: list[Event] = []  # live frames held while sockets join, shared by every joiner
        self._base = 0  # absolute position of _held[0]
        self._rebase_revisions = False  # the epoch changed: revisions start over at the next probe

    # -- queries ------------------------------------------------------------------------

    @property
    def opened(self) -> bool:
        return self.sequencer is not None

    @property
    def sockets(self) -> int:
        return len(self._live) + len(self._joining)

    @property
    def held(self) -> int:
        return len(self._held)

    def subscription(self, conn: C) -> Subscription[C] | None:
        return self._live.get(conn) or self._joining.get(conn)

    def delivered(self, conn: C) -> int | None:
        """The last seq ``conn`` has; None unless it is live in the room."""
        sub = self._live.get(conn)
        return sub.seq if sub is not None else None

    def live(self) -> list[C]:
        return list(self._live)

    def missing_messages(self, now: float, *, urgent: bool = False) -> Gap | None:
        return self.sequencer.missing(now, urgent=urgent) if self.sequencer is not None else None

    def missing_changes(self, now: float, *, urgent: bool = False) -> tuple[int, int] | None:
        """``(after, committed when asked)``: read the changes after this revision."""
        if self.revisions is None or self._rebase_revisions:
            return None
        after = self.revisions.missing(now, urgent=urgent)
        return None if after is None else (after, self.revisions.committed)

    # -- the room's stream --------------------------------------------------------------

    def open(self, last_seq: int, edit_rev: int, presence: PresenceView, now: float) -> list[Write[C]]:
        """Subscribed (confirmed), then read: the stream starts after ``last_seq``; early messages are offered."""
        self.presence = presence
        self.sequencer = RoomSequencer(last_seq + 1, self.gap_timeout_s, self.max_held)
        self.revisions = Revisions(edit_rev, self.gap_timeout_s)
        early, self._early = self._early, []
        out: list[Write[C]] = []
        for event in early:
            self._release(self.sequencer.offer(event.seq or 0, event, now), out)
        return out

    def message(self, event: Event, now: float) -> list[Write[C]]:
        """A committed message (``event.seq`` set), from this worker's commit or another worker's publish."""
        sequencer = self.sequencer
        if sequencer is None:
            if len(self._early) < self.max_held:  # beyond: read back once the room is open
                self._early.append(event)
            return []
        released = sequencer.offer(event.seq or 0, event, now)
        if not released:
            return []
        out: list[Write[C]] = []
        self._release(released, out)
        return out

    def frame(self, event: Event) -> list[Write[C]]:
        """A frame without a seq (typing, stream chunks, queued...): not ordered against messages."""
        out: list[Write[C]] = []
        self._release((event,), out)
        return out

    def change(self, rev: int, message_id: int | None, event: Event, now: float) -> list[Write[C]]:
        """An edit or delete at room revision ``rev``: once, and never behind a later change of its message."""
        if self.revisions is None:
            return []
        if not self._rebase_revisions and not self.revisions.offer(rev, now):
            return []
        if message_id is not None and not self.latest.newer(message_id, rev):
            return []  # a later change of this message was delivered already (an edit behind its delete)
        out: list[Write[C]] = []
        self._release((event,), out)
        return out

    def probed(self, last_seq: int, edit_rev: int, now: float) -> None:
        """Repair's probe read ``rooms.last_seq`` and ``edit_rev``: everything up to them is committed."""
        if self.sequencer is None or self.revisions is None:
            return
        self.sequencer.note_committed(last_seq, now)
        if self._rebase_revisions:
            self._rebase_revisions = False
            self.revisions = Revisions(edit_rev, self.gap_timeout_s)
        else:
            self.revisions.note_committed(edit_rev, now)

    def filled(self, gap: Gap, rows: list[tuple[int, Event]], now: float) -> tuple[list[Write[C]], Filled[Event]]:
        """What Postgres returned for ``gap``; seqs it lacked (an invariant breach) resync the live sockets."""
        out: list[Write[C]] = []
        if self.sequencer is None:
            return out, Filled([])
        filled = self.sequencer.fill(gap, rows, now)
        self._release(filled.released, out)
        if filled.lost:
            self.resync(self.sequencer.next_seq - 1, "seq_lost")
        return out, filled

    def changes_filled(
        self, after: int, upto: int, rows: list[tuple[int, tuple[int, int, Event]]], complete: bool, now: float
    ) -> tuple[list[Write[C]], int]:
        """Changes read back ``(rev, (message id, rev, event))``; each unless a later one was delivered.
        Also returns how many the read brought that were new to the revisions."""
        out: list[Write[C]] = []
        if self.revisions is None or self._rebase_revisions:
            return out, 0
        read = self.revisions.fill(after, upto, rows, complete, now)
        self._release([event for mid, rev, event in read if self.latest.newer(mid, rev)], out)
        return out, len(read)

    def resync(self, last_seq: int, reason: str) -> None:
        """The live sockets missed messages that cannot be delivered: they refetch and rejoin."""
        if self._live:
            self.needs.append(Resync(list(self._live), last_seq, self.epoch, reason))
        for sub in self._live.values():
            sub.seq = max(sub.seq, last_seq)

    def set_epoch(self, epoch: str, last_seq: int, now: float) -> None:
        """A join read the room at ``last_seq`` in ``epoch``.  Another epoch than the one the log had means
        the room's history was replaced (a restore, a failover that lost commits): its seqs mean other
        messages now, so the stream starts over at ``last_seq`` and the live sockets resync."""
        previous, self.epoch = self.epoch, epoch
        if previous is None or previous == epoch or self.sequencer is None:
            return
        self.sequencer = RoomSequencer(last_seq + 1, self.gap_timeout_s, self.max_held)
        self.latest = LatestChange()
        self._rebase_revisions = True  # until the probe reads the new edit_rev, changes are delivered as they come
        self.needs.append(Probe())
        if self._live:
            self.needs.append(Resync(list(self._live), last_seq, epoch, "epoch"))
        for sub in self._live.values():
            sub.seq = last_seq
            sub.marks.clear()

    def _release(self, events: Iterable[Event], out: list[Write[C]]) -> None:
        live = self._live
        for event in events:
            if self._joining:
                self._hold(event)
            if event.removes is not None:
                self._remove(event.removes, event.seq or 0)
            if not live:
                continue
            targets: list[C] = []
            seq, exclude = event.seq, event.exclude
            # The common shapes inline (this loop runs once per socket per event); the rest through ``admits``.
            if seq is not None and exclude is None:  # a message
                for sub in live.values():
                    if seq > sub.seq:
                        sub.seq = seq
                        targets.append(sub.conn)
            elif seq is None and event.stream is None:  # typing, queued...: all but the sender
                if exclude is None:
                    targets = [sub.conn for sub in live.values()]
                else:
                    targets = [sub.conn for sub in live.values() if sub.connection_id != exclude]
            elif seq is None and exclude is None:  # a stream chunk: held back only by a catch-up's mark
                for sub in live.values():
                    if not sub.marks or sub.admits(event):
                        targets.append(sub.conn)
            else:
                for sub in live.values():
                    if sub.admits(event):
                        targets.append(sub.conn)
            if targets:
                out.append((event.frame, targets))

    def _remove(self, user_id: int, seq: int) -> None:
        """A ``member_left`` of ``user_id`` at ``seq`` is released: that user's live sockets that do not have it
        (they joined before it) are out of the room before it is written."""
        gone = [sub for sub in self._live.values() if sub.user_id == user_id and sub.seq < seq]
        for sub in gone:
            del self._live[sub.conn]
            sub.state = State.LEFT
            self.needs.append(Kick(sub.conn))

    # -- presence -----------------------------------------------------------------------

    def presence_announced(
        self, rev: int | None, online: Sequence[int], offline: Sequence[int], frame: bytes
    ) -> list[Write[C]]:
        """An announcement at the room's presence revision ``rev``; to the live sockets unless the view has it.

        Not held for joining sockets: their ``joined`` carries the view as it is then."""
        if self.presence is None or self.sequencer is None:
            return []  # the view is read at ``open`` (a later revision than this, or healed)
        if not self.presence.offer(rev, online, offline) or not self._live:
            return []
        return [(frame, list(self._live))]

    def presence_healed(self, rev: int, online: Sequence[int], asked_at: int) -> list[Write[C]] | None:
        """Redis' whole view at ``rev`` (asked when the view was at ``asked_at``): the live sockets are told
        what their view lacked.  None when the view was right or the read was overtaken (then not healed)."""
        if self.presence is None:
            return None
        diff = self.presence.heal(rev, online, asked_at)
        if diff is None or not (diff[0] or diff[1]):
            return None
        if not self._live:
            return []
        payload = server_frames.encode_bytes(
            server_frames.presence(room_id=self.room_id, online=diff[0], offline=diff[1])
        )
        return [(wsframe.ws_text_frame(payload), list(self._live))]

    # -- sockets ------------------------------------------------------------------------

    def join(self, conn: C, user_id: int, connection_id: str) -> None:
        """``conn`` starts joining: from now on its live frames are held.  A socket already in the room
        starts over (a rejoin): it gets nothing of the room until ``finish``, then each frame once."""
        sub = self._live.pop(conn, None) or self._joining.pop(conn, None)
        if sub is None:
            sub = Subscription(conn, user_id, connection_id)
        sub.state = State.JOINING
        sub.start = self._base + len(self._held)
        sub.overflowed = False
        self._joining[conn] = sub
        self._trim()

    def finish(
        self,
        conn: C,
        history: list[tuple[int, Event]],
        baseline_seq: int,
        catch_up: Sequence[tuple[int, int, list[bytes]]] = (),
    ) -> list[Write[C]]:
        """History, running streams' text so far, then the held live frames; the socket is live.

        ``baseline_seq``: the socket has everything up to it (since_seq when replaying, else the room's
        last_seq at the read), so older copies are dropped.  ``catch_up``: ``(answer id, chunk index,
        frames)`` of streams running in the room.  A socket that left (or was never joining) gets nothing.
        """
        sub = self._joining.pop(conn, None)
        if sub is None:
            return []
        last_read = history[-1][0] if history else baseline_seq
        held = self._held[sub.start - self._base :]
        self._trim()
        if any(e.removes == sub.user_id and e.seq is not None and e.seq > last_read for e in held):
            sub.state = State.LEFT  # removed after the read said it was a member
            self.needs.append(Kick(conn))
            return []
        sub.state = State.LIVE
        sub.seq = baseline_seq
        self._live[conn] = sub
        one = (conn,)
        out: list[Write[C]] = []
        for message_id, index, frames in catch_up:
            for frame in frames:
                out.append((frame, one))
            sub.mark_stream(message_id, index)  # held chunks up to here are in the catch-up
        for _, event in sorted(history, key=lambda r: r[0]):
            if sub.admits(event):
                out.append((event.frame, one))
        for event in held:
            if (event.seq is None or event.seq > last_read) and sub.admits(event):
                out.append((event.frame, one))
        if sub.overflowed:
            sub.overflowed = False
            last = self.sequencer.next_seq - 1 if self.sequencer is not None else baseline_seq
            self.needs.append(Resync([conn], last, self.epoch, "held_overflow"))
        return out

    def leave(self, conn: C) -> bool:
        """``conn`` is out of the room now (left, kicked, failed to join); False if it was not in it."""
        sub = self._live.pop(conn, None)
        if sub is None:
            sub = self._joining.pop(conn, None)
            if sub is None:
                return False
            self._trim()
        sub.state = State.LEFT
        return True

    def _hold(self, event: Event) -> None:
        if len(self._held) >= self.max_held:
            for sub in self._joining.values():
                sub.overflowed = True
            return
        self._held.append(event)

    def _trim(self) -> None:
        """Drop the held frames no joiner needs any more: those before the earliest start."""
        end = self._base + len(self._held)
        first = min((sub.start for sub in self._joining.values()), default=end)
        drop = first - self._base
        if drop > 0:
            del self._held[:drop]
            self._base = first
        if not self._held:
            # Bounded, then taking no more until it empties: the positions start over.
            for sub in self._joining.values():
                sub.start = 0
            self._base = 0
