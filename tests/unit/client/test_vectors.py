"""The shared vectors of tests/vectors/session (format: its README) run against chatd/client/session.py.

tests/js/vectors.test.mjs runs the same files against chatd/static/js/session.js, so that the two twins
cannot drift. This adapter only translates: times in ms to the session's seconds, its actions to the
vector's shape. Every step's frames, fetches, notices, removed rooms and refresh are compared (absent
means none); ``state`` is compared key by key where a step gives it.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from chatd.client.model import Action, FetchPage, Notice, RefreshToken, RoomRemoved, SendFrame, after_close
from chatd.client.session import ClientSession

VECTORS = Path(__file__).resolve().parents[2] / "vectors" / "session"
FILES = sorted(VECTORS.glob("*.json"))


def test_there_are_vectors() -> None:
    assert len(FILES) >= 12


def _s(ms: float) -> float:
    return ms / 1000


def _outputs(actions: list[Action]) -> dict[str, Any]:
    return {
        "frames": [a.frame for a in actions if isinstance(a, SendFrame)],
        "fetches": [
            {"room_id": a.room_id, "purpose": a.purpose, "query": a.query()}
            for a in actions
            if isinstance(a, FetchPage)
        ],
        "notices": [{"room_id": a.room_id, "level": a.level} for a in actions if isinstance(a, Notice)],
        "removed": [a.room_id for a in actions if isinstance(a, RoomRemoved)],
        "refresh": any(isinstance(a, RefreshToken) for a in actions),
    }


def _state(s: ClientSession, want: dict[str, Any]) -> dict[str, Any]:
    """The session's state in the vector's names, for the keys the step asks about."""
    got: dict[str, Any] = {}
    if "live" in want:
        got["live"] = s.live
    if "pending" in want:
        got["pending"] = {cmid: p.state for cmid, p in s.pending.items()}
    if "rooms" in want:
        got["rooms"] = {}
        for rid, keys in want["rooms"].items():
            room = s.rooms[int(rid)]
            every = {
                "last_seq": room.last_seq,
                "latest_seq": room.latest_seq,
                "seqs": sorted(room.messages),
                "buffered": sorted(room.buffer),
                "typing": sorted(room.typing),
                "joined": room.joined,
                "reactions": {  # seq -> emoji -> who, of the messages that have any
                    str(seq): {r["emoji"]: r["users"] for r in m.reactions}
                    for seq, m in sorted(room.messages.items())
                    if m.reactions
                },
            }
            got["rooms"][rid] = {k: every[k] for k in keys}
    return got


def _step(s: ClientSession, st: dict[str, Any]) -> tuple[list[Action], dict[str, Any] | None]:
    do = st["do"]
    if do == "set_rooms":
        return s.set_rooms(st["rooms"]), None
    if do == "open_room":
        return s.open_room(st["room_id"]), None
    if do == "page":
        return s.page(st["room_id"], st["purpose"], st["messages"], st["has_more"]), None
    if do == "connection_opened":
        return s.connection_opened(), None
    if do == "receive":
        return s.receive(st["frame"], _s(st["now"])), None
    if do == "send_text":
        return s.send_text(st["room_id"], st["content"], _s(st["now"])), None
    if do == "input_changed":
        return s.input_changed(st["room_id"], st["empty"], _s(st["now"])), None
    if do == "tick":
        return s.tick(_s(st["now"])), None
    if do == "react":
        return s.react(st["room_id"], st["message_id"], st["emoji"]), None
    if do == "mark_read":
        return s.mark_read(st["room_id"]), None
    if do == "token_refreshed":
        return s.token_refreshed(st["token"]), None
    if do == "closed":
        out = s.connection_lost()
        low = after_close(st["code"], st["reason"], st["attempt"], 0.0)
        high = after_close(st["code"], st["reason"], st["attempt"], math.nextafter(1.0, 0.0))
        decision = {
            "refresh_first": low.refresh_first,
            "policy": low.policy,
            "delay_ms": [round(low.delay * 1000, 3), round(high.delay * 1000, 3)],
        }
        return out, decision
    raise AssertionError(f"unknown step {do!r}")


@pytest.mark.parametrize("path", FILES, ids=[p.stem for p in FILES])
def test_vector(path: Path) -> None:
    vector = json.loads(path.read_text())
    s = ClientSession(vector["client_id"])
    for i, st in enumerate(vector["steps"]):
        where = f"{path.name} step {i} ({st['do']})"
        actions, decision = _step(s, st)
        expect = st.get("expect", {})
        want = {
            "frames": expect.get("frames", []),
            "fetches": expect.get("fetches", []),
            "notices": expect.get("notices", []),
            "removed": expect.get("removed", []),
            "refresh": expect.get("refresh", False),
        }
        assert _outputs(actions) == want, where
        if "after_close" in expect or decision is not None:
            assert decision == expect.get("after_close"), where
        if "state" in expect:
            assert _state(s, expect["state"]) == expect["state"], where
