"""The pure client state machine (chatd/client/session.py): resume, pending sends, dedupe by seq, streams."""

from __future__ import annotations

from typing import Any

from chatd.client.model import (
    Action,
    FetchPage,
    Notice,
    Reset,
    SendFrame,
    Show,
    reconnect_delay,
)
from chatd.client.session import (
    GAP_GRACE_S,
    RESUME_ID,
    ClientSession,
)

ME, BOB = 42, 57


def msg(seq: int, content: str = "", sender: int | None = BOB, room: int = 7, **extra: Any) -> dict[str, Any]:
    return {
        "type": "message",
        "room_id": room,
        "message_id": 9000 + seq,
        "seq": seq,
        "sender_id": sender,
        "role": "user" if sender is not None else "assistant",
        "kind": "text",
        "content": content or f"m{seq}",
        "created_at": "2025-06-01T12:00:00.000Z",
        "deleted": False,
        **extra,
    }


def frames(actions: list[Action]) -> list[dict[str, Any]]:
    return [a.frame for a in actions if isinstance(a, SendFrame)]


def shown(actions: list[Action]) -> list[int]:
    return [a.message.seq for a in actions if isinstance(a, Show)]


def fetches(actions: list[Action]) -> list[FetchPage]:
    return [a for a in actions if isinstance(a, FetchPage)]


def live_session(history: int = 3) -> ClientSession:
    """Signed in, room 7 loaded with seqs 1..history, socket open and past the resume barrier."""
    s = ClientSession("c")
    s.set_rooms([{"id": 7, "name": "ops", "last_seq": history, "read_seq": 0}])
    assert fetches(s.open_room(7)) == [FetchPage(7, "latest", limit=50)]
    s.page(7, "latest", [msg(i) for i in range(1, history + 1)], has_more=False)
    connect(s)
    s.receive({"type": "joined", "room_id": 7, "last_seq": history, "online": [ME]}, 0)
    s.receive({"type": "pong", "reply_to": RESUME_ID}, 0)
    assert s.live
    return s


def connect(s: ClientSession, now: float = 0.0) -> list[Action]:
    out = s.connection_opened()
    out += s.receive({"type": "hello", "user_id": ME, "connection_id": "x", "server_time": 0, "protocol": 1}, now)
    return out


def test_first_load_shows_history_then_join_resumes_after_it() -> None:
    s = ClientSession("c")
    s.set_rooms([{"id": 7, "name": "ops", "last_seq": 3}])
    s.connection_opened()
    out = s.receive({"type": "hello", "user_id": ME}, 0)
    # Not loaded yet: joined for live unread counts, without backfill; then the barrier.
    assert frames(out) == [{"type": "join", "id": "j:7", "room_id": 7}, {"type": "ping", "id": RESUME_ID}]
    s.open_room(7)
    out = s.page(7, "latest", [msg(2), msg(3)], has_more=True)
    assert shown(out) == [2, 3]
    assert frames(out) == [{"type": "join", "id": "j:7", "room_id": 7, "since_seq": 3}]
    room = s.rooms[7]
    assert (room.last_seq, room.first_seq, room.has_older) == (3, 2, True)
    out = s.load_older(7)
    assert fetches(out) == [FetchPage(7, "older", before_seq=2, limit=50)]
    s.page(7, "older", [msg(1)], has_more=False)
    assert [m.seq for m in room.ordered()] == [1, 2, 3] and not room.has_older


def test_resume_dedupes_replay_and_live_by_seq_and_buffers_gaps() -> None:
    s = live_session(3)
    s.connection_lost()
    out = connect(s)
    assert frames(out)[0] == {"type": "join", "id": "j:7", "room_id": 7, "since_seq": 3}
    s.receive({"type": "joined", "room_id": 7, "last_seq": 6, "online": [ME, BOB]}, 0)
    seen: list[int] = []
    # Live 6 overtakes the replay of 4 and 5; 3 and 5 arrive twice.
    for seq in (6, 3, 4, 5, 5):
        seen += shown(s.receive(msg(seq), 0))
    assert seen == [4, 5, 6]
    room = s.rooms[7]
    assert room.last_seq == 6 and not room.buffer and room.online == {ME, BOB}
    assert [m.seq for m in room.ordered()] == [1, 2, 3, 4, 5, 6]


def test_unfilled_gap_is_fetched_over_rest_after_a_grace() -> None:
    s = live_session(3)
    assert shown(s.receive(msg(5), 1.0)) == []  # 4 missing
    assert fetches(s.tick(1.0)) == []
    assert fetches(s.tick(1.0 + GAP_GRACE_S / 2)) == []
    assert fetches(s.tick(1.0 + GAP_GRACE_S)) == [FetchPage(7, "fill", after_seq=3, limit=200)]
    assert fetches(s.tick(5.0)) == []  # one page in flight at a time
    out = s.page(7, "fill", [msg(4), msg(5)], has_more=False)
    assert shown(out) == [4, 5]
    assert s.rooms[7].last_seq == 5


def test_pending_send_while_offline_is_sent_after_the_resume_barrier() -> None:
    s = live_session(3)
    s.connection_lost()
    out = s.send_text(7, "while away")
    assert frames(out) == []  # offline: kept pending
    [p] = s.pending.values()
    out = connect(s)
    assert [f["type"] for f in frames(out)] == ["join", "ping"]  # not before the barrier
    out = s.receive({"type": "pong", "reply_to": RESUME_ID}, 0)
    assert frames(out) == [
        {
            "type": "send",
            "id": f"s:{p.client_msg_id}",
            "room_id": 7,
            "content": "while away",
            "client_msg_id": p.client_msg_id,
        }
    ]
    assert p.state == "sent"
    s.receive({"type": "ack", "room_id": 7, "client_msg_id": p.client_msg_id, "seq": 4, "message_id": 9004}, 0)
    assert p.state == "acked" and p.seq == 4
    out = s.receive(msg(4, "while away", sender=ME, client_msg_id=p.client_msg_id), 0)
    assert shown(out) == [4] and not s.pending


def test_send_cut_before_its_ack_is_resent_with_the_same_id_unless_replayed() -> None:
    s = live_session(3)
    first = frames(s.send_text(7, "one"))[0]
    second = frames(s.send_text(7, "two"))[0]
    s.connection_lost()  # neither acked
    connect(s)
    # The replay shows "one" was stored before the cut: it must not be sent again.
    s.receive({"type": "joined", "room_id": 7, "last_seq": 4, "online": [ME]}, 0)
    s.receive(msg(4, "one", sender=ME, client_msg_id=first["client_msg_id"]), 0)
    out = s.receive({"type": "pong", "reply_to": RESUME_ID}, 0)
    assert frames(out) == [second]  # same client_msg_id and id as the first attempt
    # The server had stored "two" too: a duplicate ack settles it.
    s.receive({"type": "ack", "room_id": 7, "client_msg_id": second["client_msg_id"], "seq": 5, "duplicate": True}, 0)
    s.receive(msg(5, "two", sender=ME, client_msg_id=second["client_msg_id"]), 0)
    assert not s.pending
    assert [m.content for m in s.rooms[7].ordered()] == ["m1", "m2", "m3", "one", "two"]


def test_busy_and_rate_limited_sends_are_retried_after_the_delay_and_bad_ones_fail() -> None:
    s = live_session(0)
    busy = frames(s.send_text(7, "a"))[0]
    bad = frames(s.send_text(7, "b"))[0]
    s.receive(
        {"type": "error", "code": "busy", "message": "overloaded", "reply_to": busy["id"], "retry_after_ms": 1500}, 10
    )
    s.receive({"type": "error", "code": "too_large", "message": "too long", "reply_to": bad["id"]}, 10)
    assert frames(s.tick(11)) == []
    assert frames(s.tick(11.5)) == [busy]
    assert s.pending[bad["client_msg_id"]].state == "failed"
    s.connection_lost()
    connect(s)
    out = s.receive({"type": "pong", "reply_to": RESUME_ID}, 12)
    assert frames(out) == [busy]  # a failed send is never resent


def test_assistant_refusal_after_the_ack_is_a_note_not_a_resend() -> None:
    s = live_session(0)
    f = frames(s.send_text(7, "@assistant hi"))[0]
    s.receive(msg(1, "@assistant hi", sender=ME, client_msg_id=f["client_msg_id"]), 0)
    s.receive({"type": "ack", "room_id": 7, "client_msg_id": f["client_msg_id"], "seq": 1, "message_id": 9001}, 0)
    s.receive({"type": "error", "code": "busy", "message": "the assistant is busy", "reply_to": f["id"]}, 0)
    assert not s.pending and frames(s.tick(100)) == []
    assert s.rooms[7].notes == {9001: "the assistant did not answer: the assistant is busy"}


def test_cancelled_while_queued_drops_the_waiting_indicator() -> None:
    s = live_session(1)
    s.receive({"type": "queued", "room_id": 7, "reply_to_message_id": 9001, "position": 2}, 0)
    s.receive({"type": "queued", "room_id": 7, "reply_to_message_id": 9002, "position": 3}, 0)
    assert s.receive({"type": "cancelled", "room_id": 7, "reply_to_message_id": 9001}, 0) != []
    assert s.rooms[7].queued == {9002: 3}


def test_stream_catch_up_on_rejoin_replaces_the_text() -> None:
    s = live_session(1)
    room = s.rooms[7]
    s.receive({"type": "queued", "room_id": 7, "reply_to_message_id": 9001, "position": 1}, 0)
    assert room.queued == {9001: 1}
    s.receive({"type": "stream_start", "room_id": 7, "message_id": 9100, "reply_to_message_id": 9001}, 0)
    assert room.queued == {}
    for i, part in enumerate(["Hel", "lo"]):
        s.receive({"type": "stream_chunk", "room_id": 7, "message_id": 9100, "index": i, "content": part}, 0)
    s.receive({"type": "stream_chunk", "room_id": 7, "message_id": 9100, "index": 1, "content": "lo"}, 0)
    assert room.streams[9100].text == "Hello"
    s.connection_lost()
    connect(s)
    # Re-announced with one chunk holding chunks 0..2, then live chunk 3.
    s.receive({"type": "stream_start", "room_id": 7, "message_id": 9100, "reply_to_message_id": 9001}, 0)
    s.receive({"type": "stream_chunk", "room_id": 7, "message_id": 9100, "index": 2, "content": "Hello, wor"}, 0)
    s.receive({"type": "stream_chunk", "room_id": 7, "message_id": 9100, "index": 3, "content": "ld"}, 0)
    s.receive({"type": "pong", "reply_to": RESUME_ID}, 0)
    assert room.streams[9100].text == "Hello, world"
    answer = msg(2, "Hello, world", sender=None, reply_to_message_id=9001) | {"message_id": 9100}
    assert shown(s.receive(answer, 0)) == [2]
    assert 9100 not in room.streams
    s.receive({"type": "stream_end", "room_id": 7, "message_id": 9100, "seq": 2, "stop_reason": "end_turn"}, 0)
    assert not room.streams


def test_streams_not_re_announced_on_resume_are_dropped_and_seq_0_removes_the_bubble() -> None:
    s = live_session(1)
    room = s.rooms[7]
    s.receive({"type": "stream_start", "room_id": 7, "message_id": 9100, "reply_to_message_id": 9001}, 0)
    s.receive({"type": "stream_start", "room_id": 7, "message_id": 9101, "reply_to_message_id": 9001}, 0)
    s.receive({"type": "stream_end", "room_id": 7, "message_id": 9101, "seq": 0, "stop_reason": "error"}, 0)
    assert list(room.streams) == [9100]
    s.connection_lost()
    connect(s)
    s.receive({"type": "pong", "reply_to": RESUME_ID}, 0)
    assert room.streams == {}


def test_regenerated_answer_supersedes_the_older_one() -> None:
    s = live_session(1)
    s.receive(msg(2, "first", sender=None, reply_to_message_id=9001), 0)
    out = s.regenerate(7)
    assert frames(out) == [{"type": "regenerate", "id": "r:9002", "message_id": 9002}]
    s.receive(msg(3, "second", sender=None, reply_to_message_id=9001), 0)
    room = s.rooms[7]
    assert room.messages[2].superseded and not room.messages[3].superseded


def test_cancel_targets_the_streaming_answer_else_the_queued_prompt() -> None:
    s = live_session(1)
    s.receive({"type": "queued", "room_id": 7, "reply_to_message_id": 9001, "position": 2}, 0)
    assert frames(s.cancel(7)) == [{"type": "cancel", "id": "x:9001", "message_id": 9001}]
    s.receive({"type": "stream_start", "room_id": 7, "message_id": 9100, "reply_to_message_id": 9001}, 0)
    assert frames(s.cancel(7)) == [{"type": "cancel", "id": "x:9100", "message_id": 9100}]


def test_batched_presence_and_typing_expiry() -> None:
    s = live_session(0)
    s.receive({"type": "joined", "room_id": 7, "last_seq": 0, "online": [ME]}, 0)
    s.receive({"type": "presence", "room_id": 7, "online": [BOB, 61], "offline": []}, 0)
    assert s.rooms[7].online == {ME, BOB, 61}
    s.receive({"type": "presence", "room_id": 7, "online": [], "offline": [61]}, 0)
    assert s.rooms[7].online == {ME, BOB}
    s.receive({"type": "typing", "room_id": 7, "user_id": BOB, "is_typing": True}, 10)
    s.receive({"type": "typing", "room_id": 7, "user_id": ME, "is_typing": True}, 10)  # my other socket
    assert list(s.rooms[7].typing) == [BOB]
    s.tick(15.9)
    assert list(s.rooms[7].typing) == [BOB]
    s.tick(16.0)
    assert s.rooms[7].typing == {}


def test_local_typing_is_throttled_and_stopped_by_send_and_idleness() -> None:
    # Issue 22: `true` at most once per 3 s and `false` only after a `true`, so that typing and sending
    # fast stays under ws.typing_rate_per_s (3); the vectors of tests/vectors/session say the rest.
    s = live_session(0)
    on = {"type": "typing", "room_id": 7, "is_typing": True}
    off = {"type": "typing", "room_id": 7, "is_typing": False}
    seen: list[dict[str, Any]] = []
    for i in range(25):  # 25 messages in a second, each typed then sent
        now = i * 0.04
        seen += frames(s.input_changed(7, False, now)) + [
            f for f in frames(s.send_text(7, f"m{i}", now)) if f["type"] == "typing"
        ]
    assert seen == [on, off]
    assert frames(s.input_changed(7, False, 2.0)) == []  # within 3 s of the last `true`
    assert frames(s.tick(2.9)) == []
    assert frames(s.tick(3.0)) == [on]  # still typing: said once the 3 s passed
    assert frames(s.tick(6.0)) == [off]  # idle for 4 s
    assert frames(s.input_changed(7, False, 6.1)) == [on]
    assert frames(s.input_changed(7, True, 6.2)) == [off]  # cleared
    assert frames(s.input_changed(7, True, 6.3)) == []


def test_resync_required_reloads_the_newest_page_and_rejoins_from_it() -> None:
    s = live_session(3)
    out = s.receive({"type": "resync_required", "room_id": 7, "last_seq": 5000}, 0)
    assert fetches(out) == [FetchPage(7, "latest", limit=50)]
    out = s.page(7, "latest", [msg(i) for i in range(4951, 5001)], has_more=True)
    assert any(isinstance(a, Reset) for a in out)
    assert shown(out) == list(range(4951, 5001))
    assert frames(out) == [{"type": "join", "id": "j:7", "room_id": 7, "since_seq": 5000}]
    room = s.rooms[7]
    assert (room.first_seq, room.last_seq, room.has_older) == (4951, 5000, True)


def test_the_epoch_goes_back_with_since_seq_and_a_new_one_drops_the_old_history() -> None:
    s = live_session(3)
    s.receive({"type": "joined", "room_id": 7, "last_seq": 3, "epoch": "e1", "online": [ME]}, 0)
    assert s.rooms[7].epoch == "e1"
    rejoin = [f for f in frames(connect(s)) if f["type"] == "join"]  # a reconnect names the epoch of since_seq
    assert rejoin == [{"type": "join", "id": "j:7", "room_id": 7, "since_seq": 3, "epoch": "e1"}]
    # The room was restored to an older backup: seq 2 is now another message, the client's 3 is gone.
    out = s.receive({"type": "joined", "room_id": 7, "last_seq": 2, "epoch": "e2", "online": [ME]}, 0)
    assert fetches(out) == [FetchPage(7, "latest", limit=50)]
    room = s.rooms[7]
    assert (room.loaded, room.messages, room.epoch) == (False, {}, "e2")
    assert fetches(s.receive({"type": "resync_required", "room_id": 7, "last_seq": 2, "epoch": "e2"}, 0)) == []
    out = s.page(7, "latest", [msg(1, "new 1"), msg(2, "new 2")], has_more=False)
    assert shown(out) == [1, 2] and s.rooms[7].messages[2].content == "new 2"


def test_unread_counts_follow_live_messages_and_read_markers() -> None:
    s = ClientSession("c")
    s.set_rooms([{"id": 7, "name": "ops", "last_seq": 5, "read_seq": 3}, {"id": 9, "name": "x", "last_seq": 0}])
    connect(s)
    assert s.rooms[7].unread == 2
    s.receive(msg(6), 0)
    assert s.rooms[7].unread == 3
    s.receive({"type": "read", "room_id": 7, "user_id": ME, "seq": 6}, 0)
    assert s.rooms[7].unread == 0
    s.receive({"type": "left", "room_id": 9}, 0)  # removed by the owner
    assert list(s.rooms) == [7]


def test_reconnect_delay_policy() -> None:
    assert reconnect_delay(3, 1008, 0.5) == 6.0  # refused frames: reconnect after a pause (issue 22)
    assert reconnect_delay(5, 1001, 0.0) == 0.05
    assert reconnect_delay(0, 1006, 0.99) == 0.495
    assert reconnect_delay(20, 1006, 0.999) == 29.97
    assert reconnect_delay(1, 1006, 0.0) == 0.1


# -- room events (issue 11): the same scenarios run on session.js in tests/integration/test_webapp.py


def test_room_events_add_rename_and_remove_rooms() -> None:
    s = live_session(0)
    room8 = {"id": 8, "name": "new", "kind": "group", "owner_id": BOB, "status": "active", "last_seq": 1, "read_seq": 1}
    added = s.receive({"type": "room_added", "room": room8}, 0)
    assert frames(added) == [{"type": "join", "id": "j:8", "room_id": 8}]  # connected: joined at once
    assert [a.text for a in added if isinstance(a, Notice)] == ["you were added to new"]
    assert frames(s.receive({"type": "room_added", "room": room8}, 0)) == []  # already known: no second join
    s.receive({"type": "room_updated", "room": {**room8, "name": "renamed", "status": "archived"}}, 0)
    assert (s.rooms[8].name, s.rooms[8].status) == ("renamed", "archived")
    assert s.receive({"type": "room_updated", "room": {**room8, "id": 99}}, 0) == []  # not ours: ignored
    removed = s.receive({"type": "room_removed", "room_id": 8, "reason": "removed"}, 0)
    assert [type(a).__name__ for a in removed] == ["RoomRemoved", "Notice", "Redraw"] and 8 not in s.rooms
    assert s.receive({"type": "room_removed", "room_id": 8, "reason": "removed"}, 0) == []


def test_sender_names_from_the_roster_and_member_events() -> None:
    s = live_session(0)
    assert s.name_of(BOB) == f"user {BOB}"
    s.set_members([{"id": BOB, "name": "Bob"}])
    assert s.name_of(BOB) == "Bob"
    joined = msg(
        1,
        "Carol joined",
        None,
        role="system",
        kind="system",
        data={"event": "member_joined", "user_id": 61, "name": "Carol", "by": ME},
    )
    s.receive(joined, 0)
    assert s.name_of(61) == "Carol"
    stored = s.rooms[7].messages[1]
    assert stored.kind == "system" and stored.data == joined["data"]
    notices = s.receive({"type": "announcement", "content": "maintenance", "created_at": "x", "by": 1}, 0)
    assert [a.text for a in notices if isinstance(a, Notice)] == ["announcement: maintenance"]
