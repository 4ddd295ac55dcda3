"""``chatd chat`` in a pseudo-terminal against a live chatd, through a proxy that cuts the connection."""

from __future__ import annotations

import asyncio
import re
import time
import uuid
from collections import Counter
from typing import Any

import pexpect

from tests.client_support import SHORT_TOKENS, CuttingProxy, Terminal, chat_lines, refresh_counts
from tests.conftest import Services
from tests.support import WS, Chatd, request
from tests.users import PASSWORD, make_users


async def test_terminal_client_resumes_after_a_cut_without_losing_or_doubling_a_line(
    chatd_factory: Any, services: Services
) -> None:
    # 10 tokens/s: the answer streams ~4 s, the window in which the live area must be seen on the screen.
    server: Chatd = chatd_factory(CHATD_ASSISTANT_OFFLINE_TOKENS_PER_S="10", **SHORT_TOKENS)
    alice, bob, carol, dave = make_users(services.database_url, 4)
    name = f"ops-{uuid.uuid4().hex[:6]}"
    created = await request(
        "POST",
        server.http + "/api/v1/rooms",
        {"name": name, "members": [bob.id], "assistant": {"mode": "mention"}},
        token=alice.token,
    )
    room = created.body["id"]
    for i in (1, 2, 3):
        r = await request(
            "POST",
            f"{server.http}/api/v1/rooms/{room}/messages",
            {"content": f"history {i}", "client_msg_id": f"h{i}"},
            token=bob.token,
        )
        assert r.status == 201

    proxy = CuttingProxy(server.port)
    term = Terminal(
        ["chat", "--url", proxy.url, "--room", name], {"CHATD_EMAIL": alice.email, "CHATD_PASSWORD": PASSWORD}
    )
    bob_label = bob.email.partition("@")[0]  # his name (make_users names users after their email)
    try:
        await term.wait_for(lambda t: "history 3" in t and "connected" in t)
        assert f"{bob_label}: history 1" in term.text()  # senders by name, already in the history
        term.line("/rooms")
        await term.wait_for(lambda t: re.search(rf"^ +{room}  {name}$", t, re.M) is not None)

        # Presence and typing of the other member.
        bob_ws = await WS.connect(server.ws, bob.token)
        await bob_ws.expect("hello")
        await bob_ws.send({"type": "join", "room_id": room})
        await bob_ws.expect("joined")
        await term.wait_for(f"online: you, {bob_label}")
        await bob_ws.send({"type": "typing", "room_id": room, "is_typing": True})
        await term.wait_for(f"{bob_label} is typing")

        # Both directions.
        term.line("line 1")
        await bob_ws.expect("message", content="line 1")
        await bob_ws.send({"type": "send", "room_id": room, "content": "bob 1", "client_msg_id": "b1"})
        await term.wait_for(f"{bob_label}: bob 1")

        # The assistant streams its answer in the live area, then the stored answer is printed.
        term.line("@assistant please summarize")
        await term.wait_for("assistant ▸ [offline assistant]")
        await term.wait_for(lambda t: any(a == "assistant" for a, _ in chat_lines(t)), timeout_s=30)

        # Cut in the middle of a send: the server stores "line 2" but its ack never arrives.
        proxy.hold()
        term.line("line 2")
        await bob_ws.expect("message", content="line 2")
        proxy.cut()
        await term.wait_for("reconnecting")
        term.line("line 3")  # typed while offline: pending
        await term.wait_for("… line 3")
        await bob_ws.send({"type": "send", "room_id": room, "content": "bob 2", "client_msg_id": "b2"})
        # bob 2's own ack (bob 1's was never read and would match any "ack"): stored while alice is offline.
        await bob_ws.expect("ack", client_msg_id="b2")
        proxy.restore()

        await term.wait_for(lambda t: "bob 2" in t and "you: line 3" in t and "… line" not in t, timeout_s=40)
        await bob_ws.expect("message", content="line 3")

        # The room holds every line once; the screen shows them once each, in seq order.
        page = await request("GET", f"{server.http}/api/v1/rooms/{room}/messages?limit=200", token=alice.token)
        stored = page.body["messages"]
        contents = Counter(m["content"] for m in stored if m["role"] == "user")
        assert all(contents[c] == 1 for c in ("line 1", "line 2", "line 3", "bob 1", "bob 2")), contents
        assert [m["seq"] for m in stored] == list(range(1, len(stored) + 1))

        def label(m: dict[str, Any]) -> str:
            if m["role"] == "assistant":
                return "assistant"
            return "you" if m["sender_id"] == alice.id else bob_label

        expected = [(label(m), m["content"]) for m in stored]
        shown = chat_lines(term.text())
        assert [a for a, _ in shown] == [a for a, _ in expected], term.text()
        for (_, got), (_, want) in zip(shown, expected, strict=True):
            assert want.startswith(got), (got, want)  # long answers wrap onto following lines

        # Tokens were refreshed on `token_expiring` (and sent with `auth`), never reused.
        deadline = time.monotonic() + 15
        while refresh_counts(services.database_url, alice.id)[0] == 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        used, revoked = refresh_counts(services.database_url, alice.id)
        assert used >= 1 and revoked == 0, (used, revoked)
        await term.wait_for("connected")

        # /add takes a name or an email, as the web app does (GET /users?q=), or an id.
        carol_name = carol.email.partition("@")[0]
        term.line(f"/add {carol_name}")
        await term.wait_for(f"{carol_name} added")
        await term.wait_for(f"system: {carol_name} joined")
        term.line(f"/add {dave.email.upper()}")
        await term.wait_for(f"{dave.email.partition('@')[0]} added")
        term.line(f"/add {carol_name}")
        await term.wait_for(f"{carol_name} is already a member")
        term.line("/add nobody-like-this")
        await term.wait_for('/add: no one found for "nobody-like-this"')
        roster = await request("GET", f"{server.http}/api/v1/rooms/{room}/members", token=alice.token)
        assert {m["id"] for m in roster.body["members"]} == {alice.id, bob.id, carol.id, dave.id}

        term.child.sendcontrol("d")
        term.child.expect(pexpect.EOF, timeout=10)
        term.child.close()
        assert term.child.exitstatus == 0
    finally:
        term.close()
        proxy.close()
