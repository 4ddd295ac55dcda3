"""The server session (chatd/core/session.py): tables of inputs and the actions they give, an injected clock."""

from __future__ import annotations

import datetime
import json
from collections.abc import Callable
from typing import Any

import pytest

from chatd.core import client_frames, errors
from chatd.core.client_frames import FrameDecoder
from chatd.core.framelimits import FrameLimiter
from chatd.core.session import (
    FRAME_GROUPS,
    TOKEN_EXPIRY,
    TOKEN_WARNING,
    TYPING,
    Action,
    Actions,
    AdoptToken,
    ArmTimer,
    Authenticate,
    CancelTimer,
    Close,
    Detach,
    EnterRoom,
    Join,
    Leave,
    PauseReading,
    Perform,
    PublishTyping,
    RelayTyping,
    Reply,
    ResumeReading,
    ServerSession,
    SessionConfig,
    Submit,
)

USER = 7
CONFIG = SessionConfig(max_pending_sends=3, typing_interval_s=2.0, typing_ttl_s=6.0, token_warning_s=60)
ROW = {"room_id": 5, "id": 100, "seq": 9, "created_at": datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)}


def make(typing_burst: int = 10, max_violations: int = 3) -> ServerSession:
    limiter = FrameLimiter(
        limits={
            "all": (1000.0, 1000),
            "join": (10.0, 100),
            "read": (5.0, 30),
            "typing": (1.0, typing_burst),
            "control": (2.0, 20),
        },
        groups=dict(FRAME_GROUPS),
        max_violations=max_violations,
        violation_window_s=10.0,
    )
    return ServerSession(USER, CONFIG, FrameDecoder(max_frame_bytes=1024), limiter, counts={})


def text(type: str, **fields: Any) -> str:
    return json.dumps({"type": type, **fields})


def send(cmid: str) -> str:
    return text("send", id=f"s:{cmid}", room_id=5, content="hi", client_msg_id=cmid)


def send_frame(cmid: str) -> client_frames.Send:
    return client_frames.Send(5, "hi", cmid, request_id=f"s:{cmid}")


def join_frame(room_id: int) -> client_frames.Join:
    return client_frames.Join(room_id, request_id=f"j{room_id}")


def show(action: Action) -> str:
    """One action as a short line, for the tables."""
    match action:
        case Reply(frame=f):
            extra = f" {f['code']}" if f["type"] == "error" else ""
            reply_to = f" ->{f['reply_to']}" if f.get("reply_to") is not None else ""
            return f"reply {f['type']}{extra}{reply_to}"
        case Close():
            return f"close {action.code}"
        case Submit(frame=f):
            return f"submit {f.client_msg_id}"
        case Join(frame=f):
            return f"join {f.room_id}" + (" rejoin" if action.rejoin else "")
        case EnterRoom():
            return f"enter {action.room_id}"
        case Detach():
            return f"detach {action.room_id}"
        case Leave():
            how = " detached" if action.detached else "" if action.presence else " hub"
            return f"leave {action.room_id}{how}"
        case RelayTyping(frame=f):
            return f"relay typing {f.room_id} {f.is_typing}"
        case PublishTyping(frame=f):
            return f"publish typing {action.room_id} {f['is_typing']}"
        case Perform(frame=f):
            return f"perform {f.TYPE}"
        case Authenticate():
            return "authenticate"
        case AdoptToken():
            return "adopt"
        case ArmTimer(key=(name, room)):
            return f"arm {name}{f' {room}' if name == TYPING else ''} {action.after_s:g}"
        case CancelTimer(key=(name, room)):
            return f"cancel {name}{f' {room}' if name == TYPING else ''}"
        case PauseReading(capacity_s=None):
            return "pause"
        case PauseReading(capacity_s=float(s)):
            return f"pause capacity {s:g}"
        case ResumeReading():
            return "resume"
    raise AssertionError(action)


Step = tuple[Callable[[ServerSession], Actions], list[str]]


def run(session: ServerSession, steps: list[Step]) -> None:
    for i, (step, expected) in enumerate(steps):
        assert [show(a) for a in step(session)] == expected, f"step {i}"


def rx(data: str | bytes, now: float = 0.0, wall: float = 1000.0) -> Callable[[ServerSession], Actions]:
    return lambda s: s.receive(data, now, wall)


# -- sends ----------------------------------------------------------------------------------------


def durable(cmid: str) -> Callable[[ServerSession], Actions]:
    return lambda s: s.send_durable(send_frame(cmid), ROW, False)


def queued(cmid: str) -> Callable[[ServerSession], Actions]:
    return lambda s: s.queued(send_frame(cmid))


def test_sends_pipeline_up_to_the_cap_then_reading_pauses_until_an_answer() -> None:
    run(
        make(),
        [
            (rx(send("a")), ["submit a"]),
            (queued("a"), []),
            (rx(send("b")), ["submit b"]),
            (queued("b"), []),
            (rx(send("c")), ["submit c"]),
            (queued("c"), ["pause"]),  # 3 unanswered = ws.max_pending_sends
            (durable("a"), ["resume", "reply ack ->s:a"]),
            (rx(send("d")), ["submit d"]),
            (queued("d"), ["pause"]),
            (
                lambda s: s.send_failed(send_frame("b"), errors.Unavailable()),
                ["resume", "reply error unavailable ->s:b"],
            ),
            (durable("c"), ["reply ack ->s:c"]),
            (durable("d"), ["reply ack ->s:d"]),
        ],
    )


@pytest.mark.parametrize(("retry_after_ms", "waits"), [(250, "0.25"), (None, "1")])
def test_busy_answers_and_pauses_until_the_commit_queue_has_room(retry_after_ms: int | None, waits: str) -> None:
    session = make()
    busy = errors.Busy("commit queue full", retry_after_ms=retry_after_ms)
    run(
        session,
        [
            (rx(send("a")), ["submit a"]),
            (lambda s: s.busy(send_frame("a"), busy), ["reply error busy ->s:a", f"pause capacity {waits}"]),
            (lambda s: s.capacity(), ["resume"]),
            (rx(send("a")), ["submit a"]),  # the client's retry
            (queued("a"), []),
        ],
    )
    assert session.pending == 1 and not session.paused


def test_a_send_over_the_users_rate_is_answered_and_counts_as_a_violation() -> None:
    limited = errors.RateLimited("too many", retry_after_ms=100)
    fail: Callable[[ServerSession], Actions] = lambda s: s.failed(send_frame("a"), limited, 0.0)  # noqa: E731
    run(
        make(max_violations=2),
        [
            (rx(send("a")), ["submit a"]),
            (fail, ["reply error rate_limited ->s:a"]),
            (fail, ["reply error rate_limited ->s:a", "close 1008"]),
            (rx(send("b")), []),
        ],
    )


# -- join, leave, kick ------------------------------------------------------------------------------


JOIN5 = text("join", id="j5", room_id=5)


def answered(room_id: int = 5) -> Callable[[ServerSession], Actions]:
    return lambda s: s.join_answered(join_frame(room_id))


@pytest.mark.parametrize(
    ("name", "steps"),
    [
        ("join → joined", [(rx(JOIN5), ["join 5"]), (answered(), ["enter 5"])]),
        (
            "rejoin",
            [
                (rx(JOIN5), ["join 5"]),
                (answered(), ["enter 5"]),
                (rx(JOIN5), ["join 5 rejoin"]),
                (answered(), ["enter 5"]),
            ],
        ),
        (
            "join failed",
            [
                (rx(JOIN5), ["join 5"]),
                (
                    lambda s: s.failed(join_frame(5), errors.NotFound("room not found"), 0.0),
                    ["reply error not_found ->j5"],
                ),
                (lambda s: s.kicked(5), []),  # not joined, no join in flight
            ],
        ),
        (
            "kick during the join: not_found, and the room is left",
            [
                (rx(JOIN5), ["join 5"]),
                (lambda s: s.kicked(5), []),
                (answered(), ["leave 5", "reply error not_found ->j5"]),
            ],
        ),
        (
            "kick during a rejoin: left now, the rejoin answered not_found and left in the hub only",
            [
                (rx(JOIN5), ["join 5"]),
                (answered(), ["enter 5"]),
                (rx(JOIN5), ["join 5 rejoin"]),
                (lambda s: s.kicked(5), ["detach 5", "reply left", "leave 5 detached"]),
                (answered(), ["leave 5 hub", "reply error not_found ->j5"]),
            ],
        ),
        (
            "kick of another room during a join",
            [(rx(JOIN5), ["join 5"]), (lambda s: s.kicked(6), []), (answered(), ["enter 5"])],
        ),
        (
            "a kick before this join does not count against it",
            [
                (rx(JOIN5), ["join 5"]),
                (lambda s: s.kicked(5), []),
                (answered(), ["leave 5", "reply error not_found ->j5"]),
                (rx(JOIN5), ["join 5"]),
                (answered(), ["enter 5"]),
            ],
        ),
        (
            "kick of a joined room: left, reply_to None",
            [
                (rx(JOIN5), ["join 5"]),
                (answered(), ["enter 5"]),
                (lambda s: s.kicked(5), ["detach 5", "reply left", "leave 5 detached"]),
                (lambda s: s.kicked(5), []),  # the second copy (local and the revocation probe)
                (rx(text("leave", id="l5", room_id=5)), ["reply error not_found ->l5"]),
            ],
        ),
        (
            "leave",
            [
                (rx(text("leave", id="l5", room_id=5)), ["reply error not_found ->l5"]),  # not joined
                (rx(JOIN5), ["join 5"]),
                (answered(), ["enter 5"]),
                (rx(text("leave", id="l5", room_id=5)), ["leave 5", "reply left ->l5"]),
                (rx(text("leave", id="l5", room_id=5)), ["reply error not_found ->l5"]),
            ],
        ),
    ],
)
def test_join_leave_and_kick(name: str, steps: list[Step]) -> None:
    run(make(), steps)


def test_a_leave_that_fails_keeps_the_room_left_and_answers_the_error() -> None:
    session = make()
    leave = text("leave", id="l5", room_id=5)
    run(
        session,
        [
            (rx(JOIN5), ["join 5"]),
            (answered(), ["enter 5"]),
            (rx(leave), ["leave 5", "reply left ->l5"]),
            (
                lambda s: s.failed(client_frames.Leave(5, request_id="l5"), errors.Unavailable(), 0.0),
                ["reply error unavailable ->l5"],
            ),
        ],
    )
    assert session.joined == set()


# -- typing ---------------------------------------------------------------------------------------


def typing(is_typing: bool, now: float) -> Callable[[ServerSession], Actions]:
    return rx(text("typing", room_id=5, is_typing=is_typing), now=now)


def relayed(is_typing: bool) -> Callable[[ServerSession], Actions]:
    return lambda s: s.typing_relayed(client_frames.Typing(5, is_typing))


EXPIRES: Callable[[ServerSession], Actions] = lambda s: s.timer_fired((TYPING, 5), 0.0, 0.0)  # noqa: E731


@pytest.mark.parametrize(
    ("name", "steps"),
    [
        ("false while not typing: nothing", [(typing(False, 0), [])]),
        (
            "true relayed once per interval, each one re-arms the expiry",
            [
                (typing(True, 0), ["relay typing 5 True"]),
                (relayed(True), ["arm typing 5 6"]),
                (typing(True, 0.1), ["arm typing 5 6"]),
                (typing(True, 1.9), ["arm typing 5 6"]),
                (typing(True, 2.0), ["relay typing 5 True"]),  # a refresh after typing_interval_s
                (relayed(True), ["arm typing 5 6"]),
            ],
        ),
        (
            "false after true: relayed once, the expiry cancelled",
            [
                (typing(True, 0), ["relay typing 5 True"]),
                (relayed(True), ["arm typing 5 6"]),
                (typing(False, 1), ["relay typing 5 False"]),
                (relayed(False), ["cancel typing 5"]),
                (typing(False, 1.1), []),
                (typing(True, 1.2), ["relay typing 5 True"]),  # a change is always relayed
            ],
        ),
        (
            "expiry: the server relays false itself, and forgets",
            [
                (typing(True, 0), ["relay typing 5 True"]),
                (relayed(True), ["arm typing 5 6"]),
                (EXPIRES, ["publish typing 5 False"]),
                (typing(False, 7), []),  # nothing left to stop
                (typing(True, 7.1), ["relay typing 5 True"]),
            ],
        ),
        (
            "a failed relay is answered and tried again with the next frame",
            [
                (typing(True, 0), ["relay typing 5 True"]),
                (
                    lambda s: s.failed(client_frames.Typing(5, True, request_id="t"), errors.NotFound("room"), 0.0),
                    ["reply error not_found ->t"],
                ),
                (typing(True, 0.5), ["relay typing 5 True"]),
            ],
        ),
    ],
)
def test_typing(name: str, steps: list[Step]) -> None:
    run(make(), steps)


# -- token --------------------------------------------------------------------------------------


def fired(key: tuple[str, int], wall: float) -> Callable[[ServerSession], Actions]:
    return lambda s: s.timer_fired(key, 0.0, wall)


AUTH = text("auth", id="a", token="t")
AUTH_FRAME = client_frames.Auth("t", request_id="a")


def authenticated(user_id: int, exp: float, wall: float) -> Callable[[ServerSession], Actions]:
    return lambda s: s.authenticated(AUTH_FRAME, user_id, exp, wall)


@pytest.mark.parametrize(
    ("name", "steps"),
    [
        (
            "warning at exp - 60 s, close at exp",
            [
                (
                    lambda s: s.opened(1900, 1000),
                    ["cancel token_warning", "arm token_warning 840", "arm token_expiry 900"],
                ),
                (fired(TOKEN_WARNING, 1840), ["reply token_expiring"]),
                (fired(TOKEN_EXPIRY, 1900), ["close 4001"]),
                (rx(text("ping", id="p")), []),
            ],
        ),
        (
            "never closed before exp: an early timer is re-armed",
            [
                (
                    lambda s: s.opened(1900, 1000),
                    ["cancel token_warning", "arm token_warning 840", "arm token_expiry 900"],
                ),
                (fired(TOKEN_EXPIRY, 1899.999), ["arm token_expiry 0.002"]),
                (fired(TOKEN_EXPIRY, 1900.0005), ["close 4001"]),
            ],
        ),
        (
            "inside the warning window at once: warned now",
            [(lambda s: s.opened(1030, 1000), ["cancel token_warning", "reply token_expiring", "arm token_expiry 30"])],
        ),
        (
            "already expired: closed at once",
            [
                (lambda s: s.opened(990, 1000), ["cancel token_warning", "arm token_expiry 0"]),
                (fired(TOKEN_EXPIRY, 1000), ["close 4001"]),
            ],
        ),
        (
            "re-auth of the same user reschedules both",
            [
                (
                    lambda s: s.opened(1900, 1000),
                    ["cancel token_warning", "arm token_warning 840", "arm token_expiry 900"],
                ),
                (rx(AUTH, wall=1850), ["authenticate"]),
                (
                    authenticated(USER, 2800, 1850),
                    [
                        "adopt",
                        "cancel token_warning",
                        "arm token_warning 890",
                        "arm token_expiry 950",
                        "reply authenticated ->a",
                    ],
                ),
                (fired(TOKEN_EXPIRY, 2800), ["close 4001"]),
            ],
        ),
        (
            "re-auth with another user's token: forbidden, nothing rescheduled",
            [
                (
                    lambda s: s.opened(1900, 1000),
                    ["cancel token_warning", "arm token_warning 840", "arm token_expiry 900"],
                ),
                (rx(AUTH, wall=1850), ["authenticate"]),
                (authenticated(USER + 1, 2800, 1850), ["reply error forbidden ->a"]),
                (fired(TOKEN_EXPIRY, 1900), ["close 4001"]),
            ],
        ),
        (
            "re-auth with an invalid token",
            [
                (rx(AUTH, wall=1850), ["authenticate"]),
                (
                    lambda s: s.failed(AUTH_FRAME, errors.Unauthorized("token expired"), 0.0),
                    ["reply error unauthorized ->a"],
                ),
            ],
        ),
    ],
)
def test_token(name: str, steps: list[Step]) -> None:
    run(make(), steps)


def test_the_warning_never_announces_more_than_is_left() -> None:
    session = make()
    session.opened(1900, 1000)
    (warning,) = session.timer_fired(TOKEN_WARNING, 0.0, 1840.5)
    assert isinstance(warning, Reply) and warning.frame["expires_in_ms"] == 59500
    (warning,) = session.opened(1030.25, 1000)[1:2]
    assert isinstance(warning, Reply) and warning.frame["expires_in_ms"] == 30250


# -- limits and violations ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "frames", "last"),
    [
        ("typing flood", [text("typing", room_id=5, is_typing=False)] * 5, ["reply error rate_limited", "close 1008"]),
        ("invalid fields", [text("nope")] * 3, ["reply error bad_request", "close 1008"]),
        ("unknown rooms", [text("join", room_id=0)] * 3, ["reply error bad_request", "close 1008"]),
    ],
)
def test_refused_frames_close_1008_at_max_violations(name: str, frames: list[str], last: list[str]) -> None:
    session = make(typing_burst=2, max_violations=3)
    out = [[show(a) for a in session.receive(f, 0.0, 0.0)] for f in frames]
    assert out[-1] == last
    assert all("close 1008" not in step for step in out[:-1])
    assert session.receive(text("ping", id="p"), 0.0, 0.0) == []  # frames after the close are ignored


def test_violations_leave_the_window() -> None:
    session = make(max_violations=3)
    for now in (0.0, 0.0, 11.0, 11.0):
        assert [show(a) for a in session.receive(text("nope"), now, 0.0)] == ["reply error bad_request"]


def test_sends_are_not_frame_limited() -> None:
    session = make(typing_burst=1)
    assert all(session.receive(send(f"c{i}"), 0.0, 0.0) for i in range(50))


@pytest.mark.parametrize(
    ("data", "first"),
    [
        (b"\x00binary", ["reply error bad_request", "close 1003"]),
        ("x" * 2000, ["reply error bad_request", "close 1009"]),
    ],
)
def test_a_protocol_violation_answers_then_closes_with_its_code(data: str | bytes, first: list[str]) -> None:
    session = make()
    assert [show(a) for a in session.receive(data, 0.0, 0.0)] == first
    assert session.closed
    assert session.receive(text("ping"), 0.0, 0.0) == []


def test_unparsable_frames_are_strikes_then_1007() -> None:
    session = make(max_violations=10)
    steps = [[show(a) for a in session.receive("{", 0.0, 0.0)] for _ in range(3)]
    assert steps == [
        ["reply error bad_request"],
        ["reply error bad_request"],
        ["reply error bad_request", "close 1007"],
    ]


def test_frames_are_counted_by_type() -> None:
    session = make(typing_burst=1)
    for data in [
        send("a"),
        text("ping"),
        text("typing", room_id=5, is_typing=True),
        text("typing", room_id=5, is_typing=True),
        "{",
    ]:
        session.receive(data, 0.0, 0.0)
    assert session.counts == {"send": 1, "ping": 1, "typing": 1, "limited": 1, "invalid": 1}


@pytest.mark.parametrize(
    ("data", "shown"),
    [
        (text("read", room_id=5, seq=3), ["perform read"]),
        (text("edit", message_id=3, content="x"), ["perform edit"]),
        (text("delete", message_id=3), ["perform delete"]),
        (text("cancel", message_id=3), ["perform cancel"]),
        (text("regenerate", message_id=3), ["perform regenerate"]),
        (text("ping", id=1), ["reply pong ->1"]),
    ],
)
def test_other_frames(data: str, shown: list[str]) -> None:
    assert [show(a) for a in make().receive(data, 0.0, 1000.0)] == shown


def test_pong_carries_the_wall_clock() -> None:
    (pong,) = make().receive(text("ping"), 5.0, 1234.5678)
    assert isinstance(pong, Reply) and pong.frame["server_time"] == 1234567


# -- after the close -----------------------------------------------------------------------------------


def test_after_the_connection_closed_nothing_is_written_and_every_room_is_left() -> None:
    session = make()
    run(
        session,
        [
            (rx(JOIN5), ["join 5"]),
            (answered(), ["enter 5"]),
            (rx(send("a")), ["submit a"]),
            (queued("a"), []),
            (rx(send("b")), ["submit b"]),
            (queued("b"), []),
            (rx(send("c")), ["submit c"]),
            (queued("c"), ["pause"]),
            (rx(text("join", id="j6", room_id=6)), ["join 6"]),  # (not read while paused: the test feeds it anyway)
            (lambda s: s.connection_closed(), ["resume", "leave 5"]),  # the parked reader is released
            (rx(text("ping")), []),
            (durable("a"), []),
            (lambda s: s.send_failed(send_frame("b"), errors.Unavailable()), []),
            (answered(6), ["leave 6"]),  # answered after the close: left again
            (lambda s: s.kicked(5), []),
            (EXPIRES, []),
            (fired(TOKEN_EXPIRY, 1e10), []),
        ],
    )
    assert session.pending == 1 and session.joined == set()
