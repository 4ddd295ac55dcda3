"""Issue 11: search over the caller's rooms only, Korean and English, text / semantic / hybrid."""

from __future__ import annotations

import asyncio
import time
from typing import Any
from urllib.parse import quote

import psycopg

from tests.chat import API, make_room
from tests.openapi_check import Api, contract_for
from tests.users import make_users

ALICE_LINES = [
    "The quarterly invoice for the Berlin office is overdue",
    "서울에서 다음 주 화요일에 분기실적회의가 있어요",
    "Remember to water the tomato plants on the balcony",
]
BOB_LINES = [
    "Bob's private invoice must never leak to Alice",
    "부산에서 비밀 회의를 했어요",
]


async def test_search_modes_languages_and_isolation(chatd_factory: Any, services: Any) -> None:
    server = chatd_factory()
    call = Api(server.http, await contract_for(server.http))
    alice, bob = make_users(services.database_url, 2)
    room_a = await make_room(server, alice, [], kind="assistant")  # assistant rooms are embedded
    room_b = await make_room(server, bob, [], kind="assistant")
    for room, user, lines in ((room_a, alice, ALICE_LINES), (room_b, bob, BOB_LINES)):
        for i, line in enumerate(lines):
            r = await call(
                "POST", f"{API}/rooms/{room}/messages", {"content": line, "client_msg_id": f"s{i}"}, user.token
            )
            assert r.status == 201

    async def search(user: Any, q: str, mode: str, **extra: Any) -> dict[str, Any]:
        query = "&".join([f"q={quote(q)}", f"mode={mode}", *(f"{k}={v}" for k, v in extra.items())])
        r = await call("GET", f"{API}/search?{query}", token=user.token)
        assert r.status == 200, r.body
        return r.body  # type: ignore[no-any-return]

    # the retrieval indexer embeds the assistant rooms' messages in the background: polled in Postgres until
    # every line above is (the queries below rank the users' lines), not a first hit and a sleep
    def unembedded() -> int:
        with psycopg.connect(services.database_url) as conn:
            row = conn.execute(
                "SELECT count(*) FROM messages m LEFT JOIN message_embeddings e ON e.message_id = m.id"
                " WHERE m.room_id = ANY(%s) AND m.role = 'user' AND e.message_id IS NULL",
                ([room_a, room_b],),
            ).fetchone()
        return int(row[0]) if row else -1

    deadline = time.monotonic() + 90
    while unembedded():
        assert time.monotonic() < deadline, "messages were not embedded in time"
        await asyncio.sleep(0.5)

    def user_hits(body: dict[str, Any]) -> list[dict[str, Any]]:
        return [h for h in body["hits"] if h["role"] == "user"]  # the offline assistant echoes each line

    for mode in ("text", "semantic", "hybrid"):
        # English
        body = await search(alice, "quarterly invoice", mode)
        assert body["mode"] == mode and body["hits"], mode
        assert "quarterly invoice" in user_hits(body)[0]["snippet"], (mode, body)
        assert {h["room_id"] for h in body["hits"]} == {room_a}, (mode, body)  # never Bob's invoice
        # Korean (a particle attached: 서울에서)
        body = await search(alice, "서울 화요일 회의", mode)
        assert "서울에서" in user_hits(body)[0]["snippet"], (mode, body)
        assert {h["room_id"] for h in body["hits"]} == {room_a}, (mode, body)
        # Bob sees only his own room, whatever he asks
        body = await search(bob, "invoice 회의 서울 tomato", mode)
        assert body["hits"] and {h["room_id"] for h in body["hits"]} == {room_b}, (mode, body)

    # highlights point at the query's words inside the snippet
    hit = user_hits(await search(alice, "invoice", "text"))[0]
    assert hit["highlights"] and all(hit["snippet"][a:b].lower() == "invoice" for a, b in hit["highlights"])
    hit = user_hits(await search(alice, "서울", "text"))[0]
    assert [hit["snippet"][a:b] for a, b in hit["highlights"]] == ["서울"]
    # text mode finds substrings of 3+ characters inside words too (trigram index): 분기실적회의가 <- 실적회
    assert any("분기실적회의가" in h["snippet"] for h in (await search(alice, "실적회", "text"))["hits"])
    # ... and word prefixes of any length through full text: 화요일에 <- 화요일
    assert any("화요일에" in h["snippet"] for h in (await search(alice, "화요일", "text"))["hits"])
    # a room filter: one's own room works, someone else's is 404
    assert (await search(alice, "invoice", "text", room_id=room_a))["hits"]
    r = await call("GET", f"{API}/search?q=invoice&room_id={room_b}", token=alice.token)
    assert r.status == 404
    # paging
    first = await search(alice, "invoice 서울 tomato", "text", limit=1)
    assert len(first["hits"]) == 1 and first["next_cursor"] == 1
    second = await search(alice, "invoice 서울 tomato", "text", limit=1, cursor=1)
    assert second["hits"][0]["message_id"] != first["hits"][0]["message_id"]
    # bad input is refused, clearly
    r = await call("GET", f"{API}/search?q=x&mode=fuzzy", token=alice.token)
    assert r.status == 400 and "mode" in r.body["error"]["message"]
    assert (await call("GET", f"{API}/search", token=alice.token)).status == 400
