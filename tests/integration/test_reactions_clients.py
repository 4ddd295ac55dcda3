"""Reactions in the reference clients: ``chatd chat`` in a pseudo-terminal (``/react``, counts shown, live),
and the web app in Chromium (picker, chips, "mine")."""

from __future__ import annotations

import urllib.parse
import uuid
from typing import Any

from playwright.sync_api import Browser, Page, expect

from tests.client_support import Terminal
from tests.conftest import Services
from tests.integration.test_webapp import Person, browser, shared_room  # noqa: F401  (browser: fixture)
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


def test_web_app_reactions_picker_counts_and_toggle(chatd_factory: Any, browser: Browser) -> None:  # noqa: F811
    """Two people in two browser contexts: the picker adds, a chip toggles, counts and "mine" follow live."""
    server: Chatd = chatd_factory()
    alice = Person(browser, server.http, "Alice")
    bob = Person(browser, server.http, "Bob")
    try:
        alice.register()
        bob.register()
        a, b = alice.page, bob.page
        shared_room(alice, bob, "react", "react here")

        def chip(page: Page, emoji: str) -> Any:
            msg = page.locator("#messages > li.msg", has=page.locator(".body", has_text="react here"))
            return msg.locator("button.reaction", has_text=emoji)

        msg_b = b.locator("#messages > li.msg", has=b.locator(".body", has_text="react here"))
        msg_b.get_by_label("Add a reaction").click()
        msg_b.get_by_role("button", name="React 👍").click()
        expect(chip(b, "👍")).to_have_text("👍 1")
        expect(chip(b, "👍")).to_have_attribute("aria-pressed", "true")
        expect(chip(a, "👍")).to_have_text("👍 1")
        expect(chip(a, "👍")).to_have_attribute("aria-pressed", "false")
        chip(a, "👍").click()  # alice adds hers through the chip
        expect(chip(a, "👍")).to_have_text("👍 2")
        expect(chip(b, "👍")).to_have_text("👍 2")
        expect(chip(a, "👍")).to_have_attribute("aria-pressed", "true")
        chip(b, "👍").click()  # bob takes his back
        expect(chip(b, "👍")).to_have_text("👍 1")
        expect(chip(b, "👍")).to_have_attribute("aria-pressed", "false")
        expect(chip(a, "👍")).to_have_text("👍 1")
        # History (a reload reads REST) shows the same.
        a.reload()
        expect(chip(a, "👍")).to_have_text("👍 1")
        expect(chip(a, "👍")).to_have_attribute("aria-pressed", "true")
        assert alice.errors == [] and bob.errors == []
    finally:
        alice.context.close()
        bob.context.close()
