"""Reactions in the reference clients: ``chatd chat`` in a pseudo-terminal (``/react``, counts shown, live)."""

from __future__ import annotations

import urllib.parse
import uuid
from typing import Any

from tests.client_support import Terminal
from tests.conftest import Services
from tests.support import Chatd, request
from tests.users import PASSWORD, make_users


async def test_terminal_client_reacts_and_shows_counts(chatd_factory: Any, services: Services) -> None:
    server: Chatd = chatd_factory()
    alice, bob = make_users(services.database_url, 2)
    name = f"fun-{uuid.uuid4().hex[:6]}"
    created = await request("POST", server.http + "/api/v1/rooms", {"name": name, "members": [bob.id]}, alice.token)
    room = created.body["id"]
    sent = []
    for i in (1, 2):
        r = await request(
            "POST",
            f"{server.http}/api/v1/rooms/{room}/messages",
            {"content": f"history {i}", "client_msg_id": f"h{i}"},
            token=bob.token,
        )
        sent.append(r.body["message_id"])
    # A reaction already there is shown with the history.
    base = f"{server.http}/api/v1/rooms/{room}/messages"
    r = await request("PUT", f"{base}/{sent[0]}/reactions/{urllib.parse.quote(':eyes:')}", token=bob.token)
    assert r.status == 200, r.body

    term = Terminal(
        ["chat", "--url", server.http, "--room", name], {"CHATD_EMAIL": alice.email, "CHATD_PASSWORD": PASSWORD}
    )
    try:
        await term.wait_for(lambda t: "history 2" in t and "connected" in t)
        assert "history 1  :eyes: 1" in term.text()
        term.line("/react 1 :tada:")  # the newest message
        await term.wait_for("reactions on u")
        assert "history 2:  :tada: 1" in term.text()
        page = await request("GET", f"{base}?limit=10", token=alice.token)
        by_id = {m["message_id"]: m for m in page.body["messages"]}
        assert by_id[sent[1]]["reactions"] == [{"emoji": ":tada:", "count": 1, "users": [alice.id], "me": True}]
        # Bob's reaction arrives live; toggling alice's removes it.
        r = await request("PUT", f"{base}/{sent[1]}/reactions/{urllib.parse.quote(':tada:')}", token=bob.token)
        await term.wait_for(":tada: 2")
        term.line("/react 1 :tada:")
        await term.wait_for(lambda t: t.count(":tada: 1") >= 2)
        page = await request("GET", f"{base}?limit=10", token=alice.token)
        by_id = {m["message_id"]: m for m in page.body["messages"]}
        assert by_id[sent[1]]["reactions"] == [{"emoji": ":tada:", "count": 1, "users": [bob.id], "me": False}]
        term.line("/react 9 :tada:")
        await term.wait_for("usage: /react N EMOJI")
        term.line("/react 1 nope")
        await term.wait_for("bad_request")
    finally:
        term.close()
