"""The room log: one room on one worker, sans I/O.  Tables of inputs -> (socket, frame) writes and needs.

Sockets are strings here ("a", "b", ...); each is user 1, 2, ... in order of its letter unless said.
A frame is its tag (``m5`` for the message of seq 5) so the writes read as what each socket saw.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from typing import Any

import pytest

from chatd.core import wsframe
from chatd.core.presence_view import PresenceView
from chatd.core.roomlog import (
    MAX_STREAM_MARKS,
    Event,
    Kick,
    Probe,
    Resync,
    RoomLog,
    State,
    Write,
    mark_stream,
    member_left_user,
)
from chatd.core.sequencing import Gap

ROOM = 7


def user(sock: str) -> int:
    return ord(sock[0]) - ord("a") + 1


def msg(seq: int, removes: int | None = None) -> Event:
    return Event(f"m{seq}".encode(), seq, removes=removes)


def typing(tag: str = "t", exclude: str | None = None) -> Event:
    return Event(tag.encode(), None, exclude)


def chunk(message_id: int, index: int) -> Event:
    return Event(f"s{message_id}.{index}".encode(), None, stream=(message_id, index))


def change(tag: str) -> Event:
    return Event(tag.encode())


def seen(writes: Sequence[Write[str]], into: dict[str, list[str]] | None = None) -> dict[str, list[str]]:
    """What each socket was written, in order."""
    out: dict[str, list[str]] = {} if into is None else into
    for frame, conns in writes:
        for conn in conns:
            out.setdefault(conn, []).append(frame.decode())
    return out


def opened(last_seq: int = 0, edit_rev: int = 0, max_held: int = 100, online: Sequence[int] = ()) -> RoomLog[str]:
    log = RoomLog[str](ROOM, gap_timeout_s=0.25, max_held=max_held)
    assert log.open(last_seq, edit_rev, PresenceView(online, rev=1), now=0.0) == []
    return log


def live(log: RoomLog[str], *socks: str, baseline: int | None = None) -> None:
    for sock in socks:
        log.join(sock, user(sock), sock)
        assert (
            log.finish(sock, [], baseline if baseline is not None else log.sequencer.next_seq - 1)  # type: ignore[union-attr]
            == []
        )


def drain(log: RoomLog[str]) -> list[Any]:
    needs, log.needs = log.needs, []
    return needs


# -- delivery: in order, once, holes filled ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("arrivals", "fill", "delivered"),
    [
        ([1, 2, 3], None, [1, 2, 3]),
        ([2, 1, 3], None, [1, 2, 3]),  # an overtaken publish
        ([1, 1, 2, 2, 3], None, [1, 2, 3]),  # local commit + Redis copy
        ([1, 3, 4], None, [1]),  # 2 missing: 3 and 4 wait
        ([1, 3, 4], [2, 3, 4], [1, 2, 3, 4]),  # the fill reads the hole up to the highest held (held come back)
        ([3], [1, 2, 3], [1, 2, 3]),
    ],
)
def test_messages_reach_each_live_socket_in_order_once(
    arrivals: list[int], fill: list[int] | None, delivered: list[int]
) -> None:
    log = opened()
    live(log, "a", "b")
    out: dict[str, list[str]] = {}
    for s in arrivals:
        seen(log.message(msg(s), now=0.0), out)
    if fill is not None:
        gap = log.missing_messages(1.0)
        assert gap == Gap(min(fill), max(fill))
        writes, filled = log.filled(gap, [(s, msg(s)) for s in fill], now=1.0)
        assert not filled.lost
        seen(writes, out)
    want = [f"m{s}" for s in delivered]
    assert out.get("a", []) == want and out.get("b", []) == want
    assert log.delivered("a") == (delivered[-1] if delivered else 0)
    assert drain(log) == []


def test_a_hole_is_asked_for_only_after_the_timeout_and_the_probe_finds_a_quiet_rooms_last() -> None:
    log = opened(last_seq=4)
    live(log, "a")
    log.probed(6, 0, now=10.0)  # 5 and 6 committed, both publishes lost
    assert log.missing_messages(10.1) is None
    assert log.missing_messages(10.3) == Gap(5, 6)
    assert log.missing_messages(10.1, urgent=True) == Gap(5, 6)  # after a Redis reconnect: now


def test_a_seq_postgres_lacks_resyncs_the_live_sockets_not_the_joining_ones() -> None:
    log = opened()
    live(log, "a")
    log.join("b", 2, "b")
    log.message(msg(2), now=0.0)
    gap = log.missing_messages(1.0)
    assert gap == Gap(1, 2)
    writes, filled = log.filled(gap, [(2, msg(2))], now=1.0)
    assert filled.lost == [Gap(1, 1)]
    assert seen(writes) == {"a": ["m2"]}
    assert drain(log) == [Resync(["a"], 2, None, "seq_lost")]
    assert log.delivered("a") == 2


def test_messages_before_the_room_is_open_are_released_at_open() -> None:
    log = RoomLog[str](ROOM)
    log.join("a", 1, "a")
    assert log.message(msg(6), now=0.0) == [] and log.message(msg(5), now=0.0) == []
    assert log.open(4, 0, PresenceView(), now=0.0) == []  # held for "a", which is joining
    assert seen(log.finish("a", [], 4)) == {"a": ["m5", "m6"]}


def test_seq_less_frames_pass_straight_through_but_not_to_their_sender() -> None:
    log = opened()
    live(log, "a", "b")
    assert seen(log.frame(typing("t", exclude="a"))) == {"b": ["t"]}


# -- joins: held, then merged exactly once ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("opened_at", "held", "history", "baseline", "expected"),
    [
        # 8 and 9 committed between subscribe and read: in both, written once
        (7, [8, 9, "t", 10], [8, 9], 7, ["m8", "m9", "t", "m10"]),
        (3, [4], [], 3, ["m4"]),  # no replay: the baseline is the room's last_seq at the read
        (7, [8, 9, "t"], [], 9, ["t"]),  # older than the read: the socket has them
        (6, [], [5, 6], 4, ["m5", "m6"]),
    ],
)
def test_a_join_while_events_flow_gets_history_then_held_frames_no_gap_no_duplicate(
    opened_at: int, held: list[int | str], history: list[int], baseline: int, expected: list[str]
) -> None:
    log = opened(last_seq=opened_at)
    log.join("a", 1, "a")
    for item in held:
        writes = log.message(msg(item), now=0.0) if isinstance(item, int) else log.frame(typing(item))
        assert writes == []  # a joining socket gets nothing yet
    writes = log.finish("a", [(s, msg(s)) for s in history], baseline)
    assert seen(writes) == {"a": expected} if expected else writes == []
    assert log.subscription("a").state is State.LIVE  # type: ignore[union-attr]
    nxt = log.sequencer.next_seq  # type: ignore[union-attr]
    assert seen(log.message(msg(nxt), now=0.0)) == {"a": [f"m{nxt}"]}
    assert log.held == 0


def test_each_frame_is_held_once_for_all_joiners_and_freed_when_no_one_needs_it() -> None:
    log = opened()
    log.message(msg(1), now=0.0)  # nobody joining: not held
    log.join("a", 1, "a")
    log.message(msg(2), now=0.0)
    log.join("b", 2, "b")
    log.message(msg(3), now=0.0)
    assert log.held == 2  # not 3 (one per joiner per frame)
    assert seen(log.finish("a", [], 1)) == {"a": ["m2", "m3"]}
    assert log.held == 1  # what only b still needs
    seen(log.message(msg(4), now=0.0))  # a is live: written; b holds it
    assert seen(log.finish("b", [], 2)) == {"b": ["m3", "m4"]}
    assert log.held == 0


def test_the_hold_is_bounded_and_every_joiner_it_failed_resyncs() -> None:
    log = opened(last_seq=4, max_held=2)
    log.join("a", 1, "a")
    for s in (5, 6, 7):
        log.message(msg(s), now=0.0)
    log.join("b", 2, "b")  # started while full: what it misses is dropped too
    log.message(msg(8), now=0.0)
    assert seen(log.finish("a", [], 4)) == {"a": ["m5", "m6"]}
    assert drain(log) == [Resync(["a"], 8, None, "held_overflow")]
    assert log.finish("b", [], 7) == []
    assert drain(log) == [Resync(["b"], 8, None, "held_overflow")]
    log.join("c", 3, "c")  # the hold emptied: a new joiner holds again
    log.message(msg(9), now=0.0)
    assert seen(log.finish("c", [], 8)) == {"c": ["m9"]} and drain(log) == []


def test_a_rejoin_of_a_live_socket_writes_nothing_before_finish_and_nothing_twice() -> None:
    log = opened()
    live(log, "a", "b")
    seen(log.message(msg(1), now=0.0))
    log.join("a", 1, "a")  # the same socket joins again (both reference clients do, on every room open)
    assert log.subscription("a").state is State.JOINING  # type: ignore[union-attr]
    assert seen(log.message(msg(2), now=0.0)) == {"b": ["m2"]}
    assert seen(log.frame(typing())) == {"b": ["t"]}
    assert log.delivered("a") is None  # not live meanwhile
    log.message(msg(3), now=0.0)
    writes = log.finish("a", [(s, msg(s)) for s in (1, 2)], 0)  # since_seq 0: a replay of 1..2
    assert seen(writes) == {"a": ["m1", "m2", "t", "m3"]}
    assert seen(log.message(msg(4), now=0.0)) == {"a": ["m4"], "b": ["m4"]}
    assert log.sockets == 2


def test_a_socket_that_leaves_during_its_join_gets_nothing_and_frees_its_hold() -> None:
    log = opened()
    log.join("a", 1, "a")
    log.message(msg(1), now=0.0)
    assert log.held == 1
    assert log.leave("a") and log.held == 0 and log.sockets == 0
    assert log.finish("a", [(1, msg(1))], 0) == []  # the join's reply came after: it stays out
    assert log.subscription("a") is None and log.message(msg(2), now=0.0) == []
    assert not log.leave("a")


def test_leave_stops_delivery_at_once() -> None:
    log = opened()
    live(log, "a", "b")
    assert log.leave("a")
    assert seen(log.message(msg(1), now=0.0)) == {"b": ["m1"]}
    assert log.sockets == 1 and log.delivered("a") is None


# -- membership: a seq'd member_left kicks -------------------------------------------------------------------


def test_member_left_kicks_the_members_live_sockets_before_it_is_written() -> None:
    log = opened()
    live(log, "a", "b", "bb")  # "b" and "bb": two devices of user 2
    writes = log.message(msg(1, removes=2), now=0.0)
    assert seen(writes) == {"a": ["m1"]}
    assert drain(log) == [Kick("b"), Kick("bb")]
    assert log.subscription("b") is None and log.sockets == 1
    assert seen(log.message(msg(2), now=0.0)) == {"a": ["m2"]}  # nothing more of the room


def test_member_left_held_during_a_join_kicks_at_finish_when_it_came_after_the_read() -> None:
    log = opened(last_seq=4)
    log.join("b", 2, "b")
    log.message(msg(5, removes=2), now=0.0)  # removed after the join's read (at 4) said "member"
    assert log.finish("b", [], 4) == []
    assert drain(log) == [Kick("b")] and log.sockets == 0


def test_member_left_before_the_read_does_not_kick_a_member_added_again() -> None:
    log = opened(last_seq=4)
    log.join("b", 2, "b")
    log.message(msg(5, removes=2), now=0.0)  # removed, added back (6), then the read at 6: a member
    log.message(msg(6), now=0.0)
    assert seen(log.finish("b", [(5, msg(5, removes=2)), (6, msg(6))], 4)) == {"b": ["m5", "m6"]}
    assert drain(log) == []
    live(log, "c")
    assert seen(log.message(msg(7), now=0.0)) == {"b": ["m7"], "c": ["m7"]}


def test_a_late_member_left_does_not_kick_a_socket_that_joined_after_it() -> None:
    log = opened(last_seq=4)
    log.message(msg(6), now=0.0)  # 5 (member_left of user 2) is late
    live(log, "b", baseline=6)  # rejoined after being added back: its read was at 6
    writes, _ = log.filled(Gap(5, 6), [(5, msg(5, removes=2)), (6, msg(6))], now=1.0)
    assert writes == [] and drain(log) == []
    assert log.subscription("b").state is State.LIVE  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("payload", "user_id"),
    [
        (
            {"type": "message", "kind": "system", "content": "x left", "data": {"event": "member_left", "user_id": 9}},
            9,
        ),
        ({"type": "message", "kind": "system", "data": {"event": "member_joined", "user_id": 9}}, None),
        ({"type": "message", "kind": "text", "content": '"member_left"', "data": None}, None),  # escaped in content
        ({"type": "message", "kind": "text", "data": {"event": "member_left", "user_id": 9}}, None),
        ({"type": "message", "kind": "system", "data": {"event": "member_left", "user_id": "9"}}, None),
    ],
)
def test_member_left_is_read_from_system_messages_only(payload: dict[str, Any], user_id: int | None) -> None:
    assert member_left_user(json.dumps(payload, separators=(",", ":")).encode()) == user_id


# -- changes ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("arrivals", "delivered"),
    [
        ([(1, 10, "e1"), (2, 10, "d2")], ["e1", "d2"]),
        ([(2, 10, "d2"), (1, 10, "e1")], ["d2"]),  # the edit behind its delete: not delivered
        ([(1, 10, "e1"), (1, 10, "e1")], ["e1"]),  # the same revision twice
        ([(2, 11, "x2"), (1, 10, "e1")], ["x2", "e1"]),  # other messages: any order
    ],
)
def test_changes_once_and_never_an_older_one_after_a_newer_one(
    arrivals: list[tuple[int, int, str]], delivered: list[str]
) -> None:
    log = opened()
    live(log, "a")
    out: dict[str, list[str]] = {}
    for rev, mid, tag in arrivals:
        seen(log.change(rev, mid, change(tag), now=0.0), out)
    assert out.get("a", []) == delivered


def test_a_lost_change_is_read_back_unless_a_newer_one_of_its_message_was_delivered() -> None:
    log = opened(edit_rev=3)
    live(log, "a")
    seen(log.change(6, 10, change("d6"), now=0.0))  # 4 and 5 missing
    assert log.missing_changes(0.1) is None
    assert log.missing_changes(0.3) == (3, 6)
    rows = [(4, (10, 4, change("e4"))), (5, (11, 5, change("e5")))]
    writes, read = log.changes_filled(3, 6, rows, complete=True, now=0.3)
    assert seen(writes) == {"a": ["e5"]} and read == 2  # e4 is older than d6 of message 10
    assert log.missing_changes(9.0) is None


# -- streams ---------------------------------------------------------------------------------------------------


def test_stream_chunks_in_the_catch_up_are_not_repeated() -> None:
    log = opened()
    live(log, "b")
    log.join("a", 1, "a")
    for i in (2, 3, 4):
        assert seen(log.frame(chunk(50, i))) == {"b": [f"s50.{i}"]}
    catch_up = [(50, 3, [b"text-to-3"])]
    assert seen(log.finish("a", [], 0, catch_up)) == {"a": ["text-to-3", "s50.4"]}
    assert seen(log.frame(chunk(50, 5))) == {"a": ["s50.5"], "b": ["s50.5"]}  # past the catch-up: all new
    assert log.subscription("a").marks == {}  # type: ignore[union-attr]


def test_a_mark_holds_back_live_chunks_up_to_it_until_a_newer_one() -> None:
    log = opened()
    log.join("a", 1, "a")
    log.finish("a", [], 0, [(50, 3, [b"text-to-3"]), (51, 0, [b"other"])])
    assert seen(log.frame(chunk(50, 2))) == {} and seen(log.frame(chunk(50, 3))) == {}
    assert seen(log.frame(chunk(51, 1))) == {"a": ["s51.1"]}
    assert log.subscription("a").marks == {50: 3}  # type: ignore[union-attr]


def test_stream_marks_are_bounded_and_the_newest_kept() -> None:
    marks: dict[int, int] = {}
    for mid in range(MAX_STREAM_MARKS + 10):
        mark_stream(marks, mid, 3)
    assert len(marks) == MAX_STREAM_MARKS and min(marks) == 10
    mark_stream(marks, 10, 7)  # joined the same stream again: its newer catch-up, kept longest
    mark_stream(marks, 10_000, 0)
    assert marks[10] == 7 and 11 not in marks


# -- presence --------------------------------------------------------------------------------------------------


def presence_frame(writes: Sequence[Write[str]]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for frame, conns in writes:
        for conn in conns:
            out.setdefault(conn, []).extend(json.loads(p) for p in wsframe.ws_frame_payloads(frame))
    return out


def test_presence_goes_to_live_sockets_in_revision_order_and_heals_what_was_skipped() -> None:
    log = opened(online=[1])
    live(log, "a")
    log.join("b", 2, "b")  # joining: its `joined` will carry the view
    assert seen(log.presence_announced(2, [2], [], b"p2")) == {"a": ["p2"]}
    assert log.presence_announced(2, [2], [], b"p2") == []  # the view has it
    assert seen(log.presence_announced(4, [], [1], b"p4")) == {"a": ["p4"]}  # 3 skipped: applied, stale
    assert log.presence is not None and log.presence.stale
    healed = log.presence_healed(4, [2, 3], asked_at=4)  # 3 was user 3 coming online
    assert healed is not None
    assert presence_frame(healed) == {"a": [{"type": "presence", "room_id": ROOM, "online": [3], "offline": []}]}
    assert not log.presence.stale and log.presence.online == {2, 3}
    assert log.presence_healed(4, [2, 3], asked_at=4) is None  # right now: nothing to say


def test_a_heal_overtaken_by_a_newer_announcement_is_read_again() -> None:
    log = opened(online=[1])
    live(log, "a")
    seen(log.presence_announced(2, [5], [], b"p2"))
    assert log.presence_healed(1, [1], asked_at=1) is None  # the read predates announcement 2
    assert log.presence is not None and log.presence.stale and log.presence.online == {1, 5}


def test_presence_before_the_room_is_open_is_not_delivered() -> None:
    log = RoomLog[str](ROOM)
    log.join("a", 1, "a")
    assert log.presence_announced(1, [2], [], b"p") == []


# -- epoch -----------------------------------------------------------------------------------------------------


def test_another_epoch_resyncs_the_live_sockets_and_restarts_the_stream() -> None:
    log = opened(last_seq=500, edit_rev=40)
    log.set_epoch("e1", 500, now=0.0)
    live(log, "a")
    log.set_epoch("e1", 500, now=0.0)  # the same history: nothing
    assert drain(log) == []
    log.join("b", 2, "b")
    log.set_epoch("e2", 300, now=1.0)  # restored: the room is at 300 of another history
    assert drain(log) == [Probe(), Resync(["a"], 300, "e2", "epoch")]
    assert log.delivered("a") == 300
    assert seen(log.message(msg(301), now=1.0)) == {"a": ["m301"]}  # not dropped as "already seen"
    assert seen(log.finish("b", [], 300)) == {"b": ["m301"]}
    assert seen(log.change(3, 9, change("e3"), now=1.0)) == {"a": ["e3"], "b": ["e3"]}  # rev 3 < 40: still new
    log.probed(301, 3, now=2.0)  # the revisions start over at the probed edit_rev
    assert log.change(3, 9, change("e3"), now=2.0) == []
    assert seen(log.change(4, 9, change("e4"), now=2.0)) == {"a": ["e4"], "b": ["e4"]}


# -- a property: random joins, leaves and arrivals -------------------------------------------------------------


def test_random_joins_and_arrivals_give_every_socket_a_gap_free_duplicate_free_stream() -> None:
    rng = random.Random(11)
    for _ in range(200):
        log = opened()
        committed = 0
        pending: list[int] = []
        got: dict[str, list[int]] = {}
        first: dict[str, int] = {}
        joining: dict[str, int] = {}  # socket -> seq its read will see (committed at the read)
        for _step in range(60):
            r = rng.random()
            if r < 0.35:
                committed += 1
                pending += [committed] * rng.choice((1, 2))  # a local commit and its Redis copy
            elif r < 0.7 and pending:
                s = pending.pop(rng.randrange(len(pending)))
                for frame, conns in log.message(msg(s), now=0.0):
                    for c in conns:
                        assert c not in joining  # nothing of the room while joining
                        got[c].append(int(frame[1:]))
            elif r < 0.8:
                sock = rng.choice("abcd")
                if sock not in joining:
                    log.join(sock, user(sock), sock)
                    joining[sock] = -1
            elif r < 0.9:
                for sock in [s for s, read in joining.items() if read == -1]:
                    joining[sock] = committed  # its read happens now
            else:
                for sock, read in [(s, read) for s, read in joining.items() if read >= 0]:
                    del joining[sock]
                    since = rng.randint(max(0, read - 3), read)
                    history = [(s, msg(s)) for s in range(since + 1, read + 1)]
                    got[sock] = []
                    first[sock] = since + 1
                    for frame, conns in log.finish(sock, history, since):
                        assert list(conns) == [sock]
                        got[sock].append(int(frame[1:]))
        for s in sorted(set(pending)):
            for frame, conns in log.message(msg(s), now=0.0):
                for c in conns:
                    got[c].append(int(frame[1:]))
        for sock, seqs in got.items():
            assert seqs == list(range(first[sock], first[sock] + len(seqs))), (sock, seqs)
            if sock not in joining:
                assert seqs[-1:] == [committed] or first[sock] > committed
