"""PresenceView and HealSchedule: revision order, heals, when to compare (pure, time as an argument)."""

from __future__ import annotations

import pytest

from chatd.core.presence_view import UNKNOWN, HealSchedule, PresenceView

# -- PresenceView ------------------------------------------------------------------------------------


def test_announcements_in_revision_order_are_applied() -> None:
    view = PresenceView([1], rev=3)
    assert view.offer(4, [2, 3], [])
    assert view.offer(5, [], [1])
    assert (view.online, view.rev, view.stale, view.known_rev) == ({2, 3}, 5, False, 5)


def test_an_announcement_the_view_has_is_dropped() -> None:
    view = PresenceView([1], rev=3)
    assert not view.offer(3, [], [1])  # read at revision 3: already in the view
    assert not view.offer(2, [7], [])
    assert (view.online, view.rev, view.stale) == ({1}, 3, False)


def test_a_skipped_revision_applies_the_later_one_and_marks_the_view_stale() -> None:
    view = PresenceView([1], rev=3)
    assert view.offer(5, [2], [])  # 4 was lost or is late
    assert (view.online, view.rev, view.stale, view.known_rev) == ({1, 2}, 5, True, UNKNOWN)
    assert not view.offer(4, [], [1])  # the late one: older than the view, the heal settles it
    assert view.offer(6, [], [2])
    assert view.stale  # until healed


def test_an_announcement_without_revision_is_applied_as_is() -> None:
    view = PresenceView([1], rev=3)  # from a worker of an older version: the probe compares revisions
    assert view.offer(None, [2], [1])
    assert (view.online, view.rev, view.stale) == ({2}, 3, False)


@pytest.mark.parametrize(
    ("online", "rev", "asked_at", "truth", "truth_rev", "diff", "after"),
    [
        ({1, 2}, 3, 3, [2, 3], 4, ([3], [1]), ({2, 3}, 4)),  # lost announcements: came and went
        ({1, 2}, 3, 3, [1, 2], 3, ([], []), ({1, 2}, 3)),  # the view was right
        ({1, 2}, 5, 4, [1], 4, None, ({1, 2}, 5)),  # revision 5 arrived after the read at 4: read again
        ({1, 2}, 5, 4, [1, 2], 5, ([], []), ({1, 2}, 5)),  # ... the read has it
        ({1}, 57, 57, [4], 2, ([4], [1]), ({4}, 2)),  # Redis restarted empty: its (lower) revision is taken
    ],
)
def test_heal(
    online: set[int],
    rev: int,
    asked_at: int,
    truth: list[int],
    truth_rev: int,
    diff: tuple[list[int], list[int]] | None,
    after: tuple[set[int], int],
) -> None:
    view = PresenceView(online, rev)
    assert view.heal(truth_rev, truth, asked_at) == diff
    assert (view.online, view.rev) == after
    assert view.stale == (diff is None)


def test_a_heal_clears_stale_and_later_announcements_follow_it() -> None:
    view = PresenceView(stale=True)  # could not be read when the room was set up
    assert view.known_rev == UNKNOWN
    assert view.heal(9, [1, 2], 0) == ([1, 2], [])
    assert not view.stale
    assert not view.offer(9, [], [1])  # published before the read: the read has it
    assert view.offer(10, [], [1])
    assert view.online == {2}


def test_after_redis_lost_its_revisions_the_view_follows_the_new_ones() -> None:
    view = PresenceView([1], rev=57)
    assert not view.offer(1, [2], [])  # the first announcements after the restart look old: dropped...
    assert view.heal(1, [2], 57) == ([2], [1])  # ... until the next probe (revision 1, not 57) heals
    assert view.offer(2, [3], [])
    assert (view.online, view.rev, view.stale) == ({2, 3}, 2, False)


# -- HealSchedule ------------------------------------------------------------------------------------


def test_rounds_every_interval() -> None:
    heals = HealSchedule(1.0, now=10.0)
    assert not heals.due(10.5) and heals.wait_s(10.5) == 0.5
    assert heals.due(11.0)
    assert heals.start(11.0) is False  # revisions first
    assert not heals.due(11.5) and heals.wait_s(11.5) == 0.5
    assert heals.due(12.0)


def test_a_resubscribe_reads_every_view_whole_now() -> None:
    heals = HealSchedule(1.0, now=10.0)
    heals.resubscribed()
    assert heals.due(10.1) and heals.wait_s(10.1) == 0.0
    assert heals.start(10.1) is True
    assert not heals.due(10.2)
    assert heals.start(11.1) is False


def test_a_failed_whole_round_is_whole_again_at_the_next_interval() -> None:
    heals = HealSchedule(1.0, now=10.0)
    heals.resubscribed()
    whole = heals.start(10.0)
    heals.failed(whole)  # Redis did not answer: no busy loop, but the next round reads whole
    assert not heals.due(10.5)
    assert heals.due(11.0) and heals.start(11.0) is True
    heals.failed(False)
    assert heals.start(12.0) is False
