"""The web app's mention badge and "seen by" (issue 20), in Chromium against a real chatd."""

from __future__ import annotations

import re
from typing import Any

from playwright.sync_api import Browser, expect

from tests.integration.test_webapp import Person, browser  # noqa: F401  (browser: the module's fixture)
from tests.support import Chatd


def test_mention_badge_and_seen_by(chatd_factory: Any, browser: Browser) -> None:  # noqa: F811
    server: Chatd = chatd_factory()
    alice = Person(browser, server.http, "Alice")
    bob = Person(browser, server.http, "Bob")
    try:
        alice.register()
        bob.register()
        a, b = alice.page, bob.page
        a.get_by_label("Name", exact=True).fill("receipts")
        a.get_by_role("button", name="Create room").click()
        expect(a.locator("#room-title")).to_have_text("receipts")
        a.get_by_label("Add member").fill(str(bob.id))
        a.get_by_role("button", name="Add", exact=True).click()
        expect(a.locator("#notice")).to_have_text(f"User {bob.id} added.")
        alice.say("hello @bob, and @room")  # one message: one mention, however many ways
        mine = a.locator("#messages > li.msg.mine", has_text="hello @bob")
        expect(mine.locator(".state")).to_have_text("✓ delivered")

        b.get_by_role("button", name="Refresh the room list").click()
        room_link = b.get_by_role("button", name=re.compile("^receipts"))
        expect(room_link.locator(".badge.mention")).to_have_text("@1")
        room_link.click()  # open and read it: Alice's page hears of it in a batched receipts frame
        expect(bob.bodies("hello @bob, and @room")).to_have_count(1)
        expect(mine.locator(".state")).to_have_text("✓ seen by 1")
        assert alice.errors == [] and bob.errors == []
    finally:
        alice.context.close()
        bob.context.close()
