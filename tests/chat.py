"""Chat client helpers shared by the integration tests: rooms, sockets, sends."""

from __future__ import annotations

import uuid
from typing import Any

from tests.support import WS, Chatd, request
from tests.users import User

API = "/api/v1"


async def make_room(server: Chatd, owner: User, members: list[User], kind: str = "group") -> int:
    r = await request(
        "POST",
        server.http + API + "/rooms",
        {"name": "room", "kind": kind, "members": [m.id for m in members]},
        owner.token,
    )
    assert r.status == 201, r.body
    return int(r.body["id"])


async def connect(server: Chatd, user: User) -> WS:
    ws = await WS.connect(server.ws, user.token)
    hello = await ws.expect("hello")
    assert hello["user_id"] == user.id
    return ws


async def join(ws: WS, room_id: int, since_seq: int | None = None) -> dict[str, Any]:
    rid = uuid.uuid4().hex[:8]
    frame: dict[str, Any] = {"type": "join", "room_id": room_id, "id": rid}
    if since_seq is not None:
        frame["since_seq"] = since_seq
    await ws.send(frame)
    return await ws.expect("joined", reply_to=rid)


async def send(ws: WS, room_id: int, content: str, cmid: str | None = None) -> dict[str, Any]:
    cmid = cmid or uuid.uuid4().hex
    await ws.send({"type": "send", "room_id": room_id, "content": content, "client_msg_id": cmid, "id": cmid})
    reply = await ws.expect_any(("ack", "error"), reply_to=cmid)
    return reply


async def send_many(ws: WS, room_id: int, contents: list[str]) -> list[dict[str, Any]]:
    """Pipelined: write every frame, then read every reply (one reader per socket)."""
    ids = [uuid.uuid4().hex for _ in contents]
    for cmid, content in zip(ids, contents, strict=True):
        await ws.send({"type": "send", "room_id": room_id, "content": content, "client_msg_id": cmid, "id": cmid})
    return [await ws.expect_any(("ack", "error"), timeout_s=60, reply_to=cmid) for cmid in ids]


async def collect_messages(ws: WS, room_id: int, count: int, timeout_s: float = 30) -> list[dict[str, Any]]:
    out = []
    for _ in range(count):
        out.append(await ws.expect("message", timeout_s=timeout_s, room_id=room_id))
    return out
