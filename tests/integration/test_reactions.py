"""Reactions against real chatd processes, Postgres and Valkey: races across instances, limits, bad input,
membership, repair of a socket that was away, and REST history with ``me``."""

from __future__ import annotations

import asyncio
import urllib.parse
import uuid
from typing import Any

import psycopg
import pytest

from tests.chat import API, connect, join, make_room, send
from tests.conftest import Services
from tests.openapi_check import Api, contract_for
from tests.support import WS, Chatd
from tests.users import User, make_users


async def react(ws: WS, message_id: int, emoji: str, add: bool = True) -> dict[str, Any]:
    rid = uuid.uuid4().hex[:8]
    await ws.send({"type": "react", "id": rid, "message_id": message_id, "emoji": emoji, "add": add})
    return await ws.expect_any(("reacted", "error"), timeout_s=30, reply_to=rid)


def reaction_path(room: int, message_id: int, emoji: str) -> str:
    return f"{API}/rooms/{room}/messages/{message_id}/reactions/{urllib.parse.quote(emoji, safe='')}"


def counts(reactions: list[dict[str, Any]] | None) -> dict[str, list[int]]:
    return {r["emoji"]: sorted(r["users"]) for r in reactions or []}


def stored(database_url: str, message_id: int) -> tuple[list[tuple[int, str]], Any]:
    with psycopg.connect(database_url) as conn:
        rows = conn.execute(
            "SELECT user_id, emoji FROM message_reactions WHERE message_id = %s ORDER BY user_id, emoji",
            (message_id,),
        ).fetchall()
        agg = conn.execute("SELECT reactions FROM messages WHERE id = %s", (message_id,)).fetchone()
    return [(int(u), str(e)) for u, e in rows], agg[0] if agg else None


async def history(api: Api, user: User, room: int) -> list[dict[str, Any]]:
    r = await api("GET", f"{API}/rooms/{room}/messages", token=user.token)  # checked against the OpenAPI document
    assert r.status == 200, r.body
    return list(r.body["messages"])


@pytest.fixture
def two_instances(chatd_factory: Any) -> tuple[Chatd, Chatd]:
    # Many reactions at full speed: the per-socket bucket of react frames (ws.control_*) is not under test here.
    limits = {"CHATD_WS_CONTROL_BURST": "1000", "CHATD_WS_CONTROL_RATE_PER_S": "1000"}
    return chatd_factory(**limits), chatd_factory(workers=2, **limits)


async def test_concurrent_reactions_across_instances_count_exactly(
    two_instances: tuple[Chatd, Chatd], services: Services
) -> None:
    """Two users on two instances add and remove the same emoji over and over, at once: the final counts
    are exact, every socket ends on the same state, nobody counts twice."""
    a_srv, b_srv = two_instances
    alice, bob, carol = make_users(services.database_url, 3)
    room = await make_room(a_srv, alice, [bob, carol])
    a, b, c = await connect(a_srv, alice), await connect(b_srv, bob), await connect(b_srv, carol)
    for ws in (a, b, c):
        await join(ws, room)
    msg = (await send(c, room, "react to me"))["message_id"]
    rounds = 40

    async def churn(ws: WS) -> list[dict[str, Any]]:
        replies = []
        for i in range(rounds):
            replies.append(await react(ws, msg, "👍"))
            replies.append(await react(ws, msg, "👍"))  # the same user again: no second count
            if i < rounds - 1:
                replies.append(await react(ws, msg, "👍", add=False))
        return replies

    got_a, got_b = await asyncio.gather(churn(a), churn(b))
    for replies in (got_a, got_b):
        assert all(r["type"] == "reacted" for r in replies), replies
        assert [r["changed"] for r in replies[:3]] == [True, False, True]  # add, add again (no-op), remove
    # Both add 🎉 at the same instant too.
    both = await asyncio.gather(react(a, msg, "🎉"), react(b, msg, "🎉"))
    assert all(r["changed"] for r in both)

    want = {"👍": sorted([alice.id, bob.id]), "🎉": sorted([alice.id, bob.id])}
    rows, agg = stored(services.database_url, msg)
    assert rows == sorted([(alice.id, "👍"), (bob.id, "👍"), (alice.id, "🎉"), (bob.id, "🎉")])
    assert counts(agg) == want and all(r["count"] == 2 for r in agg)
    for ws in (a, b, c):  # every socket, on either instance, converges on the stored state
        last = await ws.expect(
            "message_updated", timeout_s=15, message_id=msg, where=lambda f: counts(f["reactions"]) == want
        )
        assert [r["count"] for r in last["reactions"]] == [2, 2]
        assert "edited_at" not in last  # a reaction is not an edit
    (page,) = await history(Api(a_srv.http, await contract_for(a_srv.http)), carol, room)
    assert counts(page["reactions"]) == want and not any(r["me"] for r in page["reactions"])


async def test_limits_bad_emoji_and_membership(chatd_factory: Any, services: Services) -> None:
    server = chatd_factory(CHATD_WS_REACTIONS_PER_MESSAGE="3", CHATD_WS_REACTIONS_PER_USER="2")
    alice, bob, carol, mallory = make_users(services.database_url, 4)
    room = await make_room(server, alice, [bob, carol])
    api = Api(server.http, await contract_for(server.http))
    a, b, c, m = [await connect(server, u) for u in (alice, bob, carol, mallory)]
    for ws in (a, b, c):
        await join(ws, room)
    msg = (await send(a, room, "limits"))["message_id"]

    assert (await react(a, msg, "👍"))["changed"]
    assert (await react(a, msg, "❤️"))["changed"]
    over_user = await react(a, msg, "😂")
    assert over_user["type"] == "error" and over_user["code"] == "conflict"
    assert "per user" in over_user["message"]
    assert (await react(b, msg, "👍"))["changed"]
    over_msg = await react(c, msg, "👍")
    assert over_msg["type"] == "error" and over_msg["code"] == "conflict"
    assert "on a message" in over_msg["message"]
    rows, agg = stored(services.database_url, msg)  # the refused adds left nothing behind
    assert rows == sorted([(alice.id, "👍"), (alice.id, "❤️"), (bob.id, "👍")])
    assert counts(agg) == {"👍": sorted([alice.id, bob.id]), "❤️": [alice.id]}
    # Removing frees a place.
    assert (await react(a, msg, "❤️", add=False))["changed"]
    assert (await react(c, msg, "👍"))["changed"]

    for bad in ("a", "👍👍", ":Bad:", "", "x" * 40, "1", "\u200d"):
        err = await react(a, msg, bad)
        assert err["type"] == "error" and err["code"] == "bad_request", (bad, err)
        assert err["message"].startswith("react.emoji "), err
    # Not a member: the message is not found (its existence is not revealed).
    err = await react(m, msg, "👍")
    assert err["type"] == "error" and err["code"] == "not_found"
    err = await react(a, 2**50, "👍")
    assert err["type"] == "error" and err["code"] == "not_found"
    r = await api("PUT", reaction_path(room, msg, "👍"), token=mallory.token)
    assert r.status == 404 and r.body["error"]["code"] == "not_found"
    r = await api("PUT", reaction_path(room, msg, "nope"), token=bob.token)
    assert r.status == 400 and r.body["error"]["code"] == "bad_request"
    other = await make_room(server, bob, [])
    r = await api("PUT", reaction_path(other, msg, "👍"), token=bob.token)  # the wrong room
    assert r.status == 404
    # A deleted message takes no reactions and carries none.
    await a.send({"type": "delete", "id": "d", "message_id": msg})
    gone = await b.expect("message_deleted", message_id=msg)
    assert "reactions" not in gone
    err = await react(b, msg, "👍", add=False)
    assert err["type"] == "error" and err["code"] == "conflict"
    assert stored(services.database_url, msg) == ([], None)


async def test_rest_reactions_and_history_carry_me(chatd: Chatd, services: Services) -> None:
    alice, bob = make_users(services.database_url, 2)
    api = Api(chatd.http, await contract_for(chatd.http))
    room = await make_room(chatd, alice, [bob])
    b = await connect(chatd, bob)
    await join(b, room)
    msg = (await send(b, room, "rest"))["message_id"]
    url = reaction_path(room, msg, "🎉")
    r = await api("PUT", url, token=alice.token)
    assert r.status == 200, r.body
    assert r.body["reactions"] == [{"emoji": "🎉", "count": 1, "users": [alice.id], "me": True}]
    live = await b.expect("message_updated", message_id=msg)
    assert live["reactions"] == [{"emoji": "🎉", "count": 1, "users": [alice.id]}]
    again = await api("PUT", url, token=alice.token)  # idempotent
    assert again.status == 200 and again.body["reactions"][0]["count"] == 1
    (mine,) = await history(api, alice, room)
    (theirs,) = await history(api, bob, room)
    assert mine["reactions"][0]["me"] is True and theirs["reactions"][0]["me"] is False
    r = await api("DELETE", url, token=alice.token)
    assert r.status == 200 and "reactions" not in r.body
    await b.expect("message_updated", message_id=msg, where=lambda f: f["reactions"] == [])
    r = await api("DELETE", url, token=alice.token)  # removing what is not there: no change
    assert r.status == 200
    (page,) = await history(api, bob, room)
    assert "reactions" not in page


async def test_reactions_missed_while_away_arrive_on_resume(
    two_instances: tuple[Chatd, Chatd], services: Services
) -> None:
    """A socket that was away rejoins with since_seq and since_rev (the edit_rev of its last joined): the
    reactions (and deletes) made meanwhile on messages it holds come before its joined, newest state only."""
    a_srv, b_srv = two_instances
    alice, bob, carol = make_users(services.database_url, 3)
    room = await make_room(a_srv, alice, [bob, carol])
    a = await connect(a_srv, alice)
    await join(a, room)
    first = (await send(a, room, "one"))["message_id"]
    second = (await send(a, room, "two"))["message_id"]
    assert (await react(a, first, "👀"))["changed"]
    c = await connect(b_srv, carol)
    before = await join(c, room, since_seq=0)
    assert before["last_seq"] == 2 and before["edit_rev"] >= 1
    c.close()  # away
    await c.closed()

    b = await connect(b_srv, bob)
    await join(b, room)
    assert (await react(b, first, "👀"))["changed"]
    assert (await react(b, first, "🚀"))["changed"]
    assert (await react(a, first, "👀", add=False))["changed"]
    await a.send({"type": "delete", "id": "d", "message_id": second})
    await a.expect("message_deleted", message_id=second)
    third = (await send(b, room, "three"))["message_id"]
    assert (await react(a, third, "✅"))["changed"]

    c = await connect(b_srv, carol)
    rid = "resume"
    await c.send(
        {
            "type": "join",
            "id": rid,
            "room_id": room,
            "since_seq": 2,
            "epoch": before["epoch"],
            "since_rev": before["edit_rev"],
        }
    )
    frames = []
    while True:
        frame = await c.recv()
        assert frame is not None
        frames.append(frame)
        if frame["type"] == "joined":
            break
    changes = {f["message_id"]: f for f in frames if f["type"] in ("message_updated", "message_deleted")}
    assert set(changes) == {first, second}, frames  # the third is replayed as it is now, after joined
    assert counts(changes[first]["reactions"]) == {"👀": [bob.id], "🚀": [bob.id]}
    assert changes[second]["type"] == "message_deleted"
    assert frames[-1]["edit_rev"] > before["edit_rev"]
    replayed = await c.expect("message", room_id=room, seq=3)
    assert counts(replayed["reactions"]) == {"✅": [alice.id]}

    # Without since_rev nothing but the replay comes (the client refetches over REST instead).
    d = await connect(b_srv, carol)
    await d.send({"type": "join", "id": "plain", "room_id": room, "since_seq": 2, "epoch": before["epoch"]})
    assert (await d.recv())["type"] == "joined"  # type: ignore[index]
