"""The terminal client's mention counts (chatd/client/session.py): from the rooms list and the read sync."""

from __future__ import annotations

from chatd.client.session import ClientSession
from tests.unit.client.test_client_session import frames, live_session

ME = 42


def test_mention_counts_follow_the_rooms_list_and_read_markers() -> None:
    s = ClientSession("c")
    s.set_rooms([{"id": 7, "name": "ops", "last_seq": 9, "read_seq": 3, "mention_count": 2}])
    assert s.rooms[7].mention_count == 2
    s.receive({"type": "read", "room_id": 7, "user_id": ME, "seq": 5, "mention_count": 1}, 0)
    assert (s.rooms[7].read_seq, s.rooms[7].mention_count) == (5, 1)
    s.receive({"type": "read", "room_id": 7, "user_id": ME, "seq": 4, "mention_count": 2}, 0)  # late: older marker
    assert (s.rooms[7].read_seq, s.rooms[7].mention_count) == (5, 1)
    s.set_rooms([{"id": 7, "name": "ops", "last_seq": 9, "read_seq": 9, "mention_count": 0}])
    assert s.rooms[7].mention_count == 0


def test_private_reads_send_the_private_flag() -> None:
    s = live_session(history=3)
    s.private_reads = True
    assert [f for f in frames(s.mark_read(7)) if f["type"] == "read"] == [
        {"type": "read", "room_id": 7, "seq": 3, "private": True}
    ]
    assert s.rooms[7].mention_count == 0
