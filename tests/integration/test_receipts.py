"""Mention counts and read receipts (issue 20) across two chatd instances, against real Postgres and Valkey."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import psycopg

from tests.chat import API, connect, join, make_room, send_many
from tests.conftest import Services
from tests.support import WS, Chatd, request
from tests.users import User, make_users


def name_of(user: User) -> str:
    return user.email.split("@")[0]  # tests/users.py names each user after its email's local part


async def room_of(server: Chatd, user: User, room: int) -> dict[str, Any]:
    r = await request("GET", f"{server.http}{API}/rooms", token=user.token)
    assert r.status == 200, r.body
    return next(x for x in r.body["rooms"] if x["id"] == room)


async def receipts_of(server: Chatd, user: User, room: int) -> dict[int, int]:
    r = await request("GET", f"{server.http}{API}/rooms/{room}/receipts", token=user.token)
    assert r.status == 200, r.body
    return {x["user_id"]: x["read_seq"] for x in r.body["receipts"]}


async def receipt_frames(ws: WS, seconds: float) -> list[dict[str, Any]]:
    """Every ``receipts`` frame for ``seconds`` (other frames dropped)."""
    out, deadline = [], time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        try:
            frame = await ws.recv(timeout_s=left)
        except TimeoutError:
            break
        if frame is not None and frame["type"] == "receipts":
            out.append(frame)
    return out


async def test_mentions_counted_per_user_and_cleared_from_another_device(
    chatd_factory: Any, services: Services
) -> None:
    a_srv, b_srv = chatd_factory(), chatd_factory()
    alice, bob, carol = make_users(services.database_url, 3)
    room = await make_room(a_srv, alice, [bob, carol])
    a, bob_phone, bob_laptop = await connect(a_srv, alice), await connect(a_srv, bob), await connect(b_srv, bob)
    for ws in (a, bob_phone, bob_laptop):
        await join(ws, room)
    bob_name = name_of(bob)
    acks = await send_many(
        a,
        room,
        [
            f"hi @{bob_name.upper()}, see this",  # 1: @name, any case
            "@room lunch?",  # 2: everyone but the sender
            f"mail me at x@{bob_name}",  # 3: '@' after a letter: an address, not a mention
            f"@{bob_name}x is someone else",  # 4: the name must end at a non-word character
            f"(@{bob_name})",  # 5: punctuation on both sides is fine
        ],
    )
    assert [x["type"] for x in acks] == ["ack"] * 5
    assert (await room_of(b_srv, bob, room))["mention_count"] == 3
    assert (await room_of(a_srv, carol, room))["mention_count"] == 1  # @room only
    assert (await room_of(a_srv, alice, room))["mention_count"] == 0  # never by your own message

    # A deleted message's mention no longer counts.
    await a.send({"type": "delete", "message_id": acks[4]["message_id"]})
    await bob_laptop.expect("message_deleted", message_id=acks[4]["message_id"])
    assert (await room_of(b_srv, bob, room))["mention_count"] == 2

    # Reading on the phone (instance A) moves the laptop (instance B) along, with the new count.
    await bob_phone.send({"type": "read", "room_id": room, "seq": acks[0]["seq"]})
    sync = await bob_laptop.expect("read", room_id=room)
    assert sync == {"type": "read", "room_id": room, "user_id": bob.id, "seq": acks[0]["seq"], "mention_count": 1}
    await bob_phone.send({"type": "read", "room_id": room, "seq": acks[-1]["seq"]})
    sync = await bob_laptop.expect("read", room_id=room, seq=acks[-1]["seq"])
    assert sync["mention_count"] == 0
    mine = await room_of(b_srv, bob, room)
    assert mine["mention_count"] == 0 and mine["unread_count"] == 0
    assert (await room_of(a_srv, carol, room))["mention_count"] == 1  # per user: carol has not read


async def test_mention_rule_takes_names_literally(chatd: Chatd, services: Services) -> None:
    """Names with regex characters and spaces are matched as text; system messages mention nobody."""
    alice, bob, carol = make_users(services.database_url, 3)
    odd = f"B.o*b (x) {bob.id}"
    with psycopg.connect(services.database_url) as conn:
        conn.execute("UPDATE users SET name = %s WHERE id = %s", (odd, bob.id))
        conn.execute("UPDATE users SET name = %s WHERE id = %s", (f"Bxoob {carol.id}", carol.id))
    room = await make_room(chatd, alice, [bob, carol])
    a = await connect(chatd, alice)
    await join(a, room)
    acks = await send_many(a, room, [f"@{odd.lower()} hello", f"@Bxoob x {bob.id}", "@roomy is not @room"])
    assert [x["type"] for x in acks] == ["ack"] * 3
    assert (await room_of(chatd, bob, room))["mention_count"] == 2  # the literal name, then @room
    assert (await room_of(chatd, carol, room))["mention_count"] == 1  # '.' and '*' are not patterns


async def test_receipts_live_batched_and_private(chatd_factory: Any, services: Services) -> None:
    a_srv = chatd_factory(CHATD_WS_RECEIPTS_INTERVAL_S="1")
    b_srv = chatd_factory(workers=2, CHATD_WS_RECEIPTS_INTERVAL_S="1")
    alice, bob, carol = make_users(services.database_url, 3)
    room = await make_room(a_srv, alice, [bob, carol])
    a, b, c = await connect(a_srv, alice), await connect(b_srv, bob), await connect(b_srv, carol)
    for ws in (a, b, c):
        await join(ws, room)
    acks = await send_many(a, room, [f"m{i}" for i in range(20)])
    seqs = [x["seq"] for x in acks]

    # A private read: carol's devices know, the other members do not.
    carol_laptop = await connect(a_srv, carol)
    await c.send({"type": "read", "room_id": room, "seq": seqs[5], "private": True})
    assert (await carol_laptop.expect("read", room_id=room))["seq"] == seqs[5]
    assert (await receipts_of(b_srv, carol, room))[carol.id] == seqs[5]  # her own marker
    assert (await receipts_of(a_srv, alice, room))[carol.id] == 0
    members = await request("GET", f"{a_srv.http}{API}/rooms/{room}/members", token=alice.token)
    assert {m["id"]: m["read_seq"] for m in members.body["members"]}[carol.id] == 0

    # A burst of 20 reads from instance B reaches instance A in a few batched frames, ending at the last.
    for seq in seqs:
        await b.send({"type": "read", "room_id": room, "seq": seq})
    frames = await receipt_frames(a, 3.5)
    assert 1 <= len(frames) <= 5, frames  # one per second per worker, not 20
    latest = {r["user_id"]: r["read_seq"] for f in frames for r in f["receipts"]}
    assert latest == {bob.id: seqs[-1]}  # carol's private read never went out
    assert (await receipts_of(a_srv, alice, room))[bob.id] == seqs[-1]

    # A public read below her private marker shares that much and no more; unread still follows the private one.
    await c.send({"type": "read", "room_id": room, "seq": seqs[2]})
    frame = await a.expect("receipts", room_id=room, timeout_s=5)
    assert frame["receipts"] == [{"user_id": carol.id, "read_seq": seqs[2]}]
    assert (await receipts_of(a_srv, alice, room))[carol.id] == seqs[2]
    assert (await room_of(b_srv, carol, room))["read_seq"] == seqs[5]
    await c.send({"type": "read", "room_id": room, "seq": seqs[-1]})
    await a.expect("receipts", room_id=room, where=lambda f: f["receipts"][0]["read_seq"] == seqs[-1])
    with psycopg.connect(services.database_url) as conn:
        row = conn.execute(
            "SELECT read_seq, shared_seq FROM room_members WHERE room_id = %s AND user_id = %s", (room, carol.id)
        ).fetchone()
    assert row == (seqs[-1], None)  # caught up: one marker again


async def test_receipts_route_errors(chatd: Chatd, services: Services) -> None:
    alice, outsider = make_users(services.database_url, 2)
    room = await make_room(chatd, alice, [])
    r = await request("GET", f"{chatd.http}{API}/rooms/{room}/receipts", token=outsider.token)
    assert r.status == 404 and r.body["error"]["code"] == "not_found"
    r = await request("GET", f"{chatd.http}{API}/rooms/{room}/receipts?limit=0", token=alice.token)
    assert r.status == 400
    r = await request("GET", f"{chatd.http}{API}/rooms/{room}/receipts", token=None)
    assert r.status == 401
    a = await connect(chatd, alice)
    await a.send({"type": "read", "room_id": room, "seq": 0, "private": "yes", "id": "r1"})
    err = await a.expect("error", reply_to="r1")
    assert err["code"] == "bad_request" and "private" in err["message"]
    await asyncio.sleep(0)
