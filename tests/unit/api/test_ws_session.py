"""The socket handler's session is built from the settings (the driver itself is tested from outside)."""

from __future__ import annotations

import json

from chatd.api.ws import _frame_of, session_for
from chatd.core import client_frames
from chatd.core.session import Authenticate, EnterRoom, Join, Leave, Perform, RelayTyping, Reply, ResumeReading, Submit
from chatd.process import config


def test_the_session_takes_the_socket_settings() -> None:
    settings = config.replace(config.Settings(), "ws", max_pending_sends=4, join_burst=3, max_violations=2)
    session = session_for(settings)
    assert session.config.max_pending_sends == 4
    assert session.config.typing_ttl_s == settings.ws.typing_ttl_s
    assert session.config.token_warning_s == settings.auth.token_expiring_warning_s
    join = json.dumps({"type": "join", "room_id": 1})
    answers = [session.receive(join, 0.0, 0.0) for _ in range(5)]
    assert [type(a[0]).__name__ for a in answers[:3]] == ["Join"] * 3  # ws.join_burst
    assert isinstance(answers[3][0], Reply) and answers[3][0].frame["code"] == "rate_limited"
    assert [type(a).__name__ for a in answers[4]] == ["Reply", "Close"]  # ws.max_violations


def test_an_io_action_names_the_frame_its_failure_answers() -> None:
    send = client_frames.Send(1, "hi", "c1")
    join = client_frames.Join(1)
    typing = client_frames.Typing(1, True)
    read = client_frames.Read(1, 2)
    auth = client_frames.Auth("t")
    assert _frame_of(Submit(send)) is send
    assert _frame_of(Join(join, rejoin=False)) is join
    assert _frame_of(EnterRoom(join)) is join  # the hub's merge failing answers the join `internal`
    assert _frame_of(RelayTyping(typing)) is typing
    assert _frame_of(Perform(read)) is read
    assert _frame_of(Authenticate(auth)) is auth
    assert _frame_of(Leave(1)) is None  # a kick's leave: its failure is logged by the task
    assert _frame_of(ResumeReading()) is None
