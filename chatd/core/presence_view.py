"""Pure presence-view logic: a worker's idea of who is online in a room, kept right without trusting pub/sub.

Redis holds the truth (``presence-n``: who is online, in grace included) and a revision per room,
bumped by every announcement (users online, users offline) and carried by it.  Each worker keeps a
``PresenceView`` per room it has sockets in: what its sockets were told, at which revision.

* Announcements are applied in revision order.  One that skips a revision (the frame in between was
  lost, or is overtaken) is applied all the same and marks the view ``stale``; one at or below the
  view's revision is dropped (the view has it already).
* A heal replaces the view with Redis' whole one (unless announcements newer than the read overtook
  it) and says what the sockets must now be told (``came`` online, ``went`` offline).
* ``HealSchedule`` says when to compare: every ``interval_s``, each room's revision against Redis'
  (one cheap read; the whole view only of rooms that differ or are stale), and every room whole at
  once after pub/sub was lost (``resubscribed``).

Time is an argument: nothing here reads a clock or does I/O.
"""

from __future__ import annotations

from collections.abc import Iterable

UNKNOWN = -1  # a revision that differs from every revision: read the view whole


class PresenceView:
    """One room's online members as this worker's sockets were told, and the revision it reflects."""

    __slots__ = ("online", "rev", "stale")

    def __init__(self, online: Iterable[int] = (), rev: int = 0, stale: bool = False) -> None:
        self.online = set(online)
        self.rev = rev
        self.stale = stale  # an announcement was skipped (or the view could not be read): read it whole

    @property
    def known_rev(self) -> int:
        """The revision to compare with Redis'; ``UNKNOWN`` when the view must be read whatever it is."""
        return UNKNOWN if self.stale else self.rev

    def offer(self, rev: int | None, online: Iterable[int], offline: Iterable[int]) -> bool:
        """An announcement at ``rev`` (None: from a worker that sends none); True: apply and deliver it."""
        if rev is not None:
            if rev <= self.rev:
                return False  # the view has it (read at a later revision)
            if rev != self.rev + 1:
                self.stale = True
            self.rev = rev
        self.online.update(online)
        self.online.difference_update(offline)
        return True

    def heal(self, rev: int, online: Iterable[int], asked_at: int) -> tuple[list[int], list[int]] | None:
        """Redis' whole view at ``rev``, asked for when this view was at revision ``asked_at``.

        ``(came, went)`` to tell the sockets (both empty: the view was right), or None when announcements
        applied since the ask are newer than the read (read again).  A read older than the view that no
        announcement overtook means Redis lost its revisions (a restart): it is taken as it is.
        """
        if rev < self.rev and self.rev != asked_at:
            self.stale = True
            return None
        truth = set(online)
        came, went = sorted(truth - self.online), sorted(self.online - truth)
        self.online, self.rev, self.stale = truth, rev, False
        return came, went


class HealSchedule:
    """When a worker next compares its presence views with Redis, and whether whole."""

    def __init__(self, interval_s: float, now: float) -> None:
        self.interval_s = interval_s
        self.next_at = now + interval_s
        self.whole = False  # the next round reads every view whole
        self.urgent = False  # ... and is due now

    def resubscribed(self) -> None:
        """Pub/sub was lost for a while: read every view whole, now."""
        self.whole = self.urgent = True

    def due(self, now: float) -> bool:
        return self.urgent or now >= self.next_at

    def start(self, now: float) -> bool:
        """A round starts: whether it reads every view whole."""
        whole = self.whole
        self.whole = self.urgent = False
        self.next_at = now + self.interval_s
        return whole

    def failed(self, whole: bool) -> None:
        """The round did not reach Redis: the next one, at the interval, reads whole if this one did."""
        self.whole = self.whole or whole

    def wait_s(self, now: float) -> float:
        """Until the next round (0: due)."""
        return 0.0 if self.urgent else max(0.0, self.next_at - now)
