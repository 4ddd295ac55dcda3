"""Stream position with an epoch: a client's seq from another history of the room is never trusted.

After a restore from a backup or a failover to a replica that lacks the newest commits, a room's seqs go
back and are then reused.  A client still holding seq 500 of the old history against a room now at 300
would drop 301..500 of the new one as "already seen".  `joined` and `resync_required` carry the room's
epoch; a join whose `since_seq` is past the room's last seq, or whose `epoch` is not the room's, gets
`resync_required` (refetch over REST) instead of a replay.
"""

from __future__ import annotations

from typing import Any

import pytest

from tests.chat import connect, join, make_room, send
from tests.conftest import Services
from tests.support import Chatd
from tests.users import make_users

pytestmark = pytest.mark.slow


async def test_joined_carries_the_epoch_and_a_seq_from_the_future_gets_resync(
    chatd: Chatd, services: Services
) -> None:
    (alice,) = make_users(services.database_url, 1)
    room = await make_room(chatd, alice, [])
    ws = await connect(chatd, alice)
    first = await join(ws, room)
    epoch = first["epoch"]
    assert isinstance(epoch, str) and epoch
    for i in range(3):
        await send(ws, room, f"m{i}")
    assert [(await ws.expect("message", room_id=room))["seq"] for _ in range(3)] == [1, 2, 3]  # the echoes

    # The room is at 3: a client at 500 (an older history of the room) must refetch, not skip 4..500.
    await ws.send({"type": "join", "room_id": room, "since_seq": 500, "epoch": epoch, "id": "future"})
    reply = await ws.expect_any(("joined", "resync_required"), reply_to="future")
    if reply["type"] == "joined":
        reply = await ws.expect("resync_required", room_id=room)
    assert reply["last_seq"] == 3 and reply["epoch"] == epoch

    # Another epoch: the client's seqs belong to another history, whatever their value.
    await ws.send({"type": "join", "room_id": room, "since_seq": 1, "epoch": "not-this-one", "id": "other"})
    joined = await ws.expect("joined", reply_to="other")
    assert joined["epoch"] == epoch
    resync = await ws.expect("resync_required", room_id=room)
    assert resync["last_seq"] == 3 and resync["epoch"] == epoch
    # No replay of 2..3 from a history the client does not have.
    stray: list[dict[str, Any]] = []
    while ws.backlog:
        stray.append(ws.backlog.pop(0))
    assert not [f for f in stray if f.get("type") == "message"], stray

    # The same epoch: a normal replay.
    await ws.send({"type": "join", "room_id": room, "since_seq": 1, "epoch": epoch, "id": "same"})
    await ws.expect("joined", reply_to="same")
    assert [(await ws.expect("message", room_id=room))["seq"] for _ in range(2)] == [2, 3]
