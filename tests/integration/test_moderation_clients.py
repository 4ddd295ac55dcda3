"""The report action in the reference clients: ``/report N REASON`` in ``chatd chat`` (a pseudo-terminal) and
the web app's "Report" form in Chromium; each lands in the owner's queue once, however often it is sent.
Also what a blocked send looks like in the web app."""

from __future__ import annotations

import uuid
from typing import Any

import psycopg
from playwright.sync_api import Browser, expect

from tests.client_support import Terminal
from tests.conftest import Services
from tests.integration.test_webapp import Person, browser, rest, shared_room  # noqa: F401  (browser: fixture)
from tests.support import Chatd, request
from tests.users import PASSWORD, make_users


def reports_of(database_url: str, message_id: int) -> list[tuple[int, str]]:
    with psycopg.connect(database_url) as conn:
        rows = conn.execute(
            "SELECT reporter_id, reason FROM message_reports WHERE message_id = %s ORDER BY id", (message_id,)
        ).fetchall()
    return [(int(r[0]), str(r[1])) for r in rows]


async def test_terminal_client_reports_a_message(chatd_factory: Any, services: Services) -> None:
    server: Chatd = chatd_factory()
    alice, bob = make_users(services.database_url, 2)
    name = f"mod-{uuid.uuid4().hex[:6]}"
    created = await request("POST", server.http + "/api/v1/rooms", {"name": name, "members": [alice.id]}, bob.token)
    room = created.body["id"]
    sent = []
    for i in (1, 2):
        r = await request(
            "POST",
            f"{server.http}/api/v1/rooms/{room}/messages",
            {"content": f"spam {i}", "client_msg_id": f"m{i}"},
            token=bob.token,
        )
        sent.append(r.body["message_id"])
    term = Terminal(
        ["chat", "--url", server.http, "--room", name], {"CHATD_EMAIL": alice.email, "CHATD_PASSWORD": PASSWORD}
    )
    try:
        await term.wait_for(lambda t: "spam 2" in t and "connected" in t)
        term.line("/report 2 selling things")  # the one before the newest
        await term.wait_for("reported message 1")
        assert reports_of(services.database_url, sent[0]) == [(alice.id, "selling things")]
        term.line("/report 2 again")  # the same message again: the first report stands
        await term.wait_for(lambda t: t.count("reported message 1") >= 2)
        assert reports_of(services.database_url, sent[0]) == [(alice.id, "selling things")]
        term.line("/report 9 nope")
        await term.wait_for("usage: /report N REASON")
        term.line("/report 1")
        await term.wait_for(lambda t: t.count("usage: /report N REASON") >= 2)
        queue = await request("GET", f"{server.http}/api/v1/moderation/reports?room_id={room}", token=bob.token)
        assert [x["message_id"] for x in queue.body["reports"]] == [sent[0]]
    finally:
        term.close()


def test_web_app_reports_a_message_and_shows_a_blocked_send(chatd_factory: Any, browser: Browser) -> None:  # noqa: F811
    server: Chatd = chatd_factory()
    alice = Person(browser, server.http, "Alice")
    bob = Person(browser, server.http, "Bob")
    try:
        alice.register()
        bob.register()
        a, b = alice.page, bob.page
        room = shared_room(alice, bob, "report", "buy cheap watches")
        # No Report on your own message.
        mine = a.locator("#messages > li.msg", has=a.locator(".body", has_text="buy cheap watches"))
        expect(mine.get_by_label("Report this message")).to_have_count(0)

        msg = b.locator("#messages > li.msg", has=b.locator(".body", has_text="buy cheap watches"))
        msg.get_by_label("Report this message").click()
        msg.get_by_label("Reason for the report").fill("spam")
        msg.get_by_role("button", name="Send report").click()
        expect(b.locator("#notice")).to_contain_text("Reported")
        queue = rest(server.http, f"/moderation/reports?room_id={room}", alice.token())
        assert [(x["reporter_id"], x["reason"]) for x in queue["reports"]] == [(bob.id, "spam")]

        # A blocked send: the rule's error in plain words, nothing shown as sent.
        (admin,) = make_users(server.database_url, 1, role="admin")
        word = "zq" + uuid.uuid4().hex[:10]
        rest(server.http, "/admin/content-rules", admin.token, {"kind": "word", "pattern": word, "action": "block"})
        bob.say(f"hello {word}")
        expect(b.locator("#messages")).to_contain_text("does not allow")
        assert alice.errors == [] and bob.errors == []
    finally:
        alice.context.close()
        bob.context.close()
