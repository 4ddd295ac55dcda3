"""The web app end to end: Debian's Chromium driven by Playwright against a live chatd.

Chromium comes from Debian (``make test`` installs it with apt-get when it is missing);
Playwright only drives it (``executable_path``), it never downloads a browser.  A missing
browser fails these tests: it is not a reason to skip them.
"""

from __future__ import annotations

import json
import re
import shutil
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import Browser, BrowserContext, FilePayload, Page, expect, sync_playwright

from tests.client_support import SHORT_TOKENS, refresh_counts
from tests.conftest import Services
from tests.support import ROOT, Chatd
from tests.users import PASSWORD, make_users

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# As root on a machine without a network, Chromium needs these or it hangs on first start.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ARTIFACTS = ROOT / "test-artifacts"
TIMEOUT_MS = 20_000
SEND_WINDOW_S = 6  # the module server's ws.send_rate_window_s (20 sends per window)


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if not Path(CHROMIUM).exists():
        pytest.fail(f"no Chromium at {CHROMIUM}: `make test` installs Debian's (apt-get install chromium)")
    with sync_playwright() as pw:
        # Playwright gives every launch a fresh temporary profile (user-data-dir).
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, timeout=60_000)
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture(scope="module")
def server(services: Services, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Chatd]:
    """One chatd for the tests of this module that need no settings of their own (a server costs ~2 s to
    start). Its assistant writes 8 tokens/s: an answer streams ~5 s, long enough to look at. Its send quota
    is 20 per 6 s (not 10 s): the web app paces its sends to what `hello.limits` says."""
    chatd = Chatd(
        database_url=services.database_url,
        redis_url=services.redis_url,
        log_path=tmp_path_factory.mktemp("webapp") / "chatd.log",
        env={
            "CHATD_STORAGE_REDIS_KEY_PREFIX": f"t{uuid.uuid4().hex[:8]}:",
            "CHATD_ASSISTANT_OFFLINE_TOKENS_PER_S": "8",
            "CHATD_WS_SEND_RATE_WINDOW_S": str(SEND_WINDOW_S),
            "CHATD_FILES_LOCAL_DIR": str(tmp_path_factory.mktemp("webapp-files")),
        },
    )
    chatd.start()
    try:
        yield chatd
    finally:
        chatd.stop()


class Person:
    """One user in one browser context."""

    def __init__(self, browser: Browser, base: str, name: str, **context: Any) -> None:
        context.setdefault("viewport", {"width": 1100, "height": 720})
        self.context: BrowserContext = browser.new_context(**context)
        self.context.set_default_timeout(TIMEOUT_MS)
        self.page: Page = self.context.new_page()
        self.errors: list[str] = []
        self.page.on("pageerror", lambda exc: self.errors.append(f"page error: {exc}"))
        self.page.on(
            "console",
            lambda msg: (
                self.errors.append(msg.text)
                if re.search(r"Content Security Policy|Trusted Type|Uncaught", msg.text)
                else None
            ),
        )
        self.base = base
        self.name = name
        self.email = f"{name.lower()}-{uuid.uuid4().hex[:8]}@example.com"
        self.id = 0

    def register(self) -> None:
        page = self.page
        page.goto(self.base + "/")
        page.get_by_role("button", name="Create an account instead").click()
        page.get_by_label("Email").fill(self.email)
        page.get_by_label("Password").fill("password-123")
        page.get_by_label("Display name").fill(self.name)
        page.get_by_role("button", name="Create account").click()
        expect(page.locator("#conn")).to_have_text("connected")
        self.id = int(re.findall(r"\d+", page.locator("#me-id").inner_text())[0])

    def composer(self) -> Any:
        return self.page.get_by_role("textbox", name="Message")

    def say(self, text: str) -> None:
        self.composer().fill(text)
        self.composer().press("Enter")

    def bodies(self, text: str) -> Any:
        return self.page.locator("#messages > li.msg:not(.pending) .body", has_text=re.compile(f"^{re.escape(text)}$"))

    def token(self) -> str:
        state = self.page.evaluate("localStorage.getItem('chatd.session')")
        return str(json.loads(state)["access"])


def rest(base: str, path: str, token: str, body: Any = None) -> Any:
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(base + "/api/v1" + path, data=data, headers=headers)
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.loads(resp.read())


def test_static_files_have_a_strict_csp_and_javascript_types(server: Chatd) -> None:
    with urllib.request.urlopen(server.http + "/", timeout=10) as resp:
        csp = resp.headers["Content-Security-Policy"]
        assert resp.headers["Content-Type"] == "text/html; charset=utf-8"
        assert b'<script type="module" src="/static/js/main.js">' in resp.read()
    assert "script-src 'self'" in csp and "default-src 'none'" in csp and "unsafe-inline" not in csp
    assert "require-trusted-types-for 'script'" in csp
    for path in ("/static/js/main.js", "/static/vendor/purify.es.mjs"):
        with urllib.request.urlopen(server.http + path, timeout=10) as resp:
            assert resp.headers["Content-Type"] == "text/javascript; charset=utf-8"
            assert resp.headers["Cache-Control"] == "no-cache"
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(server.http + "/static/../app.py", timeout=10)
    assert err.value.code in (403, 404)


def test_two_people_chat_with_the_assistant_and_resume_after_going_offline(
    chatd_factory: Any, browser: Browser, services: Services
) -> None:
    # 6 tokens/s: an answer (~36-40 tokens) streams ~6 s, the window in which both pages must show it streaming
    # and Alice must click Stop; at 15/s it was ~2.4 s, less than a loaded 2-core box can take to poll and click
    # (the stream then ends first and the Stop button is gone). The answers wait up to 30 s.
    server: Chatd = chatd_factory(CHATD_ASSISTANT_OFFLINE_TOKENS_PER_S="6", **SHORT_TOKENS)
    alice = Person(browser, server.http, "Alice")
    bob = Person(browser, server.http, "Bob")
    try:
        alice.register()
        bob.register()
        a, b = alice.page, bob.page

        # Alice creates a room and adds Bob by his user id; Bob's list picks it up.
        room_name = f"team-{uuid.uuid4().hex[:6]}"
        a.get_by_label("Name", exact=True).fill(room_name)
        a.get_by_role("button", name="Create room").click()
        expect(a.locator("#room-title")).to_have_text(room_name)
        a.get_by_label("Add member").fill(str(bob.id))
        a.get_by_role("button", name="Add", exact=True).click()
        expect(a.locator("#notice")).to_have_text(f"User {bob.id} added.")
        alice.say("first!")
        b.get_by_role("button", name="Refresh the room list").click()
        room_link = b.get_by_role("button", name=re.compile(f"^{room_name}"))
        expect(room_link.locator(".badge")).to_have_text("1")  # unread
        room_link.click()
        expect(b.locator("#room-title")).to_have_text(room_name)
        expect(room_link.locator(".badge")).to_have_count(0)
        expect(bob.bodies("first!")).to_have_count(1)

        # Presence both ways, typing, messages both ways with their delivery state.
        expect(a.locator("#room-online")).to_have_text("Online: You, Bob")  # names: roster and member events
        expect(b.locator("#room-online")).to_have_text("Online: You, Alice")
        alice.composer().press_sequentially("Hi B")
        expect(b.locator("#typing")).to_have_text("Alice is typing…")
        alice.composer().fill("")
        alice.say("Hi Bob, **welcome**")
        expect(bob.bodies("Hi Bob, **welcome**")).to_have_count(1)
        mine = a.locator("#messages > li.msg.mine", has_text="Hi Bob")
        expect(mine).to_have_attribute("data-state", "delivered")
        bob.say("Hi Alice")
        expect(alice.bodies("Hi Alice")).to_have_count(1)
        expect(b.locator("#typing")).to_have_text("")

        # The assistant streams an answer (sanitized Markdown) to both; one answer is stopped.
        # The offline assistant echoes the prompt: its HTML shows as text, its javascript: link goes.
        hostile = "<img src=x onerror=\"document.title='pwned'\"> [docs](javascript:document.title='pwned')"
        alice.say(f"@assistant {hostile} what is chatd?")
        streaming = a.locator("#messages > li.streaming .body")
        expect(streaming).to_contain_text("[offline assistant]")
        expect(b.locator("#messages > li.streaming .body")).to_contain_text("[offline assistant]")
        answer = a.locator("#messages > li.assistant:not(.streaming)", has_text="what is chatd?")
        expect(answer).to_have_count(1, timeout=30_000)
        expect(answer.locator(".body img, .body [onerror], .body [href^='javascript']")).to_have_count(0)
        expect(answer.locator(".body")).to_contain_text("<img src=x")
        expect(answer.locator(".body a")).to_have_text("docs")
        assert a.title() == "chatd" and b.title() == "chatd"
        alice.say("@assistant please **stop** me")
        expect(streaming).to_contain_text("please stop me")  # rendered: ** became <strong>
        expect(a.locator("#messages > li.streaming .body strong")).to_have_text("stop")
        a.locator("#messages > li.streaming").get_by_role("button", name="Stop").click()
        stopped = a.locator("#messages > li.assistant.partial")
        expect(stopped).to_have_count(1)
        expect(stopped.locator(".flag")).to_have_text("Stopped before the end.")
        stopped.get_by_role("button", name="Regenerate").click()
        # Marked once the new answer is stored (its stream ended): an answer's whole length, not expect's 5 s.
        superseded = a.locator("#messages > li.assistant.superseded")
        expect(superseded).to_contain_text("Replaced by a newer answer.", timeout=30_000)
        regenerated = a.locator("#messages > li.assistant:not(.streaming):not(.superseded)", has_text="stop me")
        expect(regenerated).to_have_count(1, timeout=30_000)

        # A reload keeps the session and finds the history.
        a.reload()
        expect(a.locator("#conn")).to_have_text("connected")
        expect(a.locator("#room-title")).to_have_text(room_name)
        for text in ("Hi Bob, **welcome**", "Hi Alice"):
            expect(alice.bodies(text)).to_have_count(1)
        expect(a.locator("#messages > li.assistant")).to_have_count(3)

        # Bob drops off the network: Alice's messages and his own pending one get through once.
        bob.context.set_offline(True)
        expect(b.locator("#conn")).to_have_text(re.compile("offline|reconnecting"))
        alice.say("while you were away 1")
        alice.say("while you were away 2")
        bob.say("sent while offline")
        expect(b.locator("#messages > li.pending", has_text="sent while offline")).to_have_attribute(
            "data-state", "pending"
        )
        expect(a.locator("#room-online")).to_have_text("Online: You", timeout=30_000)  # after the grace period
        bob.context.set_offline(False)
        expect(b.locator("#conn")).to_have_text("connected")
        for person in (alice, bob):
            for text in ("while you were away 1", "while you were away 2", "sent while offline"):
                expect(person.bodies(text)).to_have_count(1)
        expect(b.locator("#messages > li.pending")).to_have_count(0)
        expect(a.locator("#room-online")).to_have_text("Online: You, Bob")

        # What the server stored: every line once, gap-free.
        room_id = int(a.evaluate("new URLSearchParams(location.hash.slice(1)).get('room')"))
        stored = rest(server.http, f"/rooms/{room_id}/messages?limit=200", alice.token())["messages"]
        assert [m["seq"] for m in stored] == list(range(1, len(stored) + 1))
        users = [m["content"] for m in stored if m["role"] == "user"]
        assert sorted(users) == sorted(set(users)), users
        assert len(a.locator("#messages > li.msg:not(.pending)").all()) == len(stored)
        assert len(b.locator("#messages > li.msg:not(.pending)").all()) == len(stored)

        # Tokens were refreshed on `token_expiring` (30 s tokens), across the reload too, never reused.
        for person in (alice, bob):
            used, revoked = refresh_counts(services.database_url, person.id)
            assert used >= 1 and revoked == 0, (person.name, used, revoked)

        ARTIFACTS.mkdir(exist_ok=True)
        a.screenshot(path=str(ARTIFACTS / "webapp-alice.png"))
        b.screenshot(path=str(ARTIFACTS / "webapp-bob.png"))
        assert alice.errors == [] and bob.errors == []
    finally:
        alice.context.close()
        bob.context.close()


@pytest.mark.smoke
def test_room_added_member_by_email_and_an_attachment_round_trip(
    chatd_factory: Any, browser: Browser, tmp_path: Path
) -> None:
    server: Chatd = chatd_factory(CHATD_FILES_LOCAL_DIR=str(tmp_path / "files"))
    alice = Person(browser, server.http, "Alice")
    bob = Person(browser, server.http, "Bob")
    try:
        alice.register()
        bob.register()
        a, b = alice.page, bob.page
        room_name = f"files-{uuid.uuid4().hex[:6]}"
        a.get_by_label("Name", exact=True).fill(room_name)
        a.get_by_role("button", name="Create room").click()
        expect(a.locator("#room-title")).to_have_text(room_name)
        room_id = int(a.evaluate("new URLSearchParams(location.hash.slice(1)).get('room')"))
        # Alice adds Bob by email (the user directory); Bob's list shows the room without any refresh
        # (room_added: the room list is otherwise polled only every 2 minutes).
        a.get_by_label("Add member").fill(bob.email)
        a.get_by_role("button", name="Add", exact=True).click()
        expect(a.locator("#notice")).to_have_text("Bob added.")
        expect(a.locator("#messages > li.msg.system")).to_have_text(re.compile("Bob joined"))
        room_link = b.get_by_role("button", name=re.compile(f"^{room_name}"))
        expect(room_link).to_have_count(1)  # TIMEOUT_MS: far below the 2-minute poll it must not wait for
        room_link.click()
        expect(b.locator("#room-title")).to_have_text(room_name)

        # Alice attaches an image with a caption; Bob sees her name, the caption, a preview, and downloads it.
        image = _png(7, 5)
        alice.composer().fill("the plan")
        a.locator("#attach-input").set_input_files({"name": "plan.png", "mimeType": "image/png", "buffer": image})
        expect(a.locator("#notice")).to_have_text("plan.png sent.")
        file_msg = b.locator("#messages > li.file-msg")
        expect(file_msg.locator(".file-name")).to_have_text("plan.png")
        expect(file_msg.locator(".who")).to_have_text("Alice")
        expect(file_msg.locator(".body")).to_have_text("the plan")
        expect(file_msg.locator("img.preview")).to_have_attribute("src", re.compile("^blob:"))
        b.wait_for_function("document.querySelector('#messages img.preview')?.naturalWidth === 7")
        with b.expect_download() as download:
            file_msg.get_by_role("button", name="Download").click()
        assert download.value.suggested_filename == "plan.png"
        assert Path(download.value.path()).read_bytes() == image

        # A file whose bytes are not what its name says is refused, and Alice is told why.
        spoof: FilePayload = {
            "name": "evil.png",
            "mimeType": "image/png",
            "buffer": b"<html><script>alert(1)</script></html>",
        }
        a.locator("#attach-input").set_input_files(spoof)
        expect(a.locator("#alerts")).to_contain_text("Could not send evil.png: content type text/html is not allowed")

        # Removed from the room: it leaves Bob's list at once (room_removed / left).
        req = urllib.request.Request(
            f"{server.http}/api/v1/rooms/{room_id}/members/{bob.id}",
            headers={"Authorization": f"Bearer {alice.token()}"},
            method="DELETE",
        )
        with urllib.request.urlopen(req, timeout=10) as resp:
            assert resp.status == 204
        expect(room_link).to_have_count(0)
        expect(b.locator("#notice")).to_have_text("You were removed from this room.")
        expect(a.locator("#messages > li.msg.system", has_text="Bob left")).to_have_count(1)
        assert alice.errors == [] and bob.errors == []
    finally:
        alice.context.close()
        bob.context.close()


def _png(width: int, height: int) -> bytes:
    from tests.integration.test_files import png

    return png(width, height)


def test_phone_sized_dark_screen(server: Chatd, browser: Browser) -> None:
    phone = Person(
        browser,
        server.http,
        "Pat",
        viewport={"width": 390, "height": 844},
        color_scheme="dark",
        is_mobile=True,
        has_touch=True,
    )
    try:
        phone.register()
        page = phone.page
        sidebar = page.locator("#sidebar")
        expect(sidebar).to_be_hidden()  # the room list is a panel on phones
        toggle = page.get_by_role("button", name="Rooms")
        toggle.click()
        expect(toggle).to_have_attribute("aria-expanded", "true")
        page.get_by_label("Name", exact=True).fill("pocket")
        page.get_by_role("button", name="Create room").click()
        expect(sidebar).to_be_hidden()
        expect(page.locator("#room-title")).to_have_text("pocket")
        phone.say("from my phone")
        expect(phone.bodies("from my phone")).to_have_count(1)
        box = page.get_by_role("button", name="Send").bounding_box()
        assert box is not None and box["x"] + box["width"] <= 390 and box["y"] + box["height"] <= 844
        # The placeholders fit their boxes (the composer's desktop one, with the Enter hint, was clipped here).
        assert page.evaluate(FITS, "#composer-input") == [True], page.get_attribute("#composer-input", "placeholder")
        assert page.evaluate(FITS, "#add-member-id") == [True]
        background = page.evaluate("getComputedStyle(document.body).backgroundColor")
        assert background == "rgb(21, 23, 27)"  # the dark palette
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "webapp-phone-dark.png"))
        assert phone.errors == []
    finally:
        phone.context.close()


def test_history_pages_back_through_rest(chatd_factory: Any, browser: Browser, services: Services) -> None:
    server: Chatd = chatd_factory(CHATD_WS_SEND_RATE_COUNT="1000")
    [user] = make_users(services.database_url, 1)
    room = rest(server.http, "/rooms", user.token, {"name": f"long-{uuid.uuid4().hex[:6]}"})
    for i in range(1, 61):
        rest(
            server.http, f"/rooms/{room['id']}/messages", user.token, {"content": f"old {i}", "client_msg_id": f"o{i}"}
        )
    person = Person(browser, server.http, "Lee")
    try:
        page = person.page
        page.goto(server.http + "/")
        page.get_by_label("Email").fill(user.email)
        page.get_by_label("Password").fill(PASSWORD)
        page.get_by_role("button", name="Sign in").click()
        page.get_by_role("button", name=re.compile(f"^{room['name']}")).click()
        bodies = page.locator("#messages > li.msg .body")
        expect(bodies).to_have_count(50)  # the newest page
        expect(bodies.first).to_have_text("old 11")
        older = page.get_by_role("button", name="Load older messages")
        older.focus()
        page.keyboard.press("Enter")
        expect(bodies).to_have_count(60)
        expect(older).to_be_hidden()  # nothing older
        assert bodies.all_inner_texts() == [f"old {i}" for i in range(1, 61)]
        assert person.errors == []
    finally:
        person.context.close()


# Whether each text of a control (a select's options, a textarea's placeholder) fits in it on one line.
FITS = """
(selector) => {
  const node = document.querySelector(selector);
  const style = getComputedStyle(node);
  const ctx = document.createElement("canvas").getContext("2d");
  ctx.font = style.font;
  const room = node.clientWidth - parseFloat(style.paddingLeft) - parseFloat(style.paddingRight);
  const texts = node.tagName === "SELECT" ? [...node.options].map((o) => o.text) : [node.placeholder];
  const arrow = node.tagName === "SELECT" ? 20 : 0; // the select's drop-down arrow
  return texts.map((t) => ctx.measureText(t).width + arrow <= room);
}
"""
AT_BOTTOM = (
    "() => { const log = document.getElementById('log'); return log.scrollHeight - log.scrollTop - log.clientHeight; }"
)


def test_images_keep_their_size_the_view_follows_answers_keep_their_order_and_links_are_safe(
    server: Chatd, browser: Browser
) -> None:
    # Issue 22 items 3, 4, 5 and 9.
    ann = Person(browser, server.http, "Ann")
    try:
        ann.register()
        a = ann.page
        assert a.evaluate(FITS, "#create-kind") == [True, True]  # the Kind select is not truncated
        assert a.evaluate(FITS, "#composer-input") == [True]
        expect(ann.composer()).to_have_attribute("placeholder", re.compile("Enter sends"))  # where it fits
        room_id = create_room(ann, f"media-{uuid.uuid4().hex[:6]}")

        def post(content: str) -> None:  # as from another device of Ann's
            body = {"content": content, "client_msg_id": uuid.uuid4().hex}
            rest(server.http, f"/rooms/{room_id}/messages", ann.token(), body)

        post("\n".join(f"line {i}" for i in range(40)))
        expect(a.locator("#messages > li.msg")).to_have_count(1)

        # A 64x48 image is drawn at its natural size, not stretched to the bubble; its room is reserved from
        # the attachment's width and height, so the view still follows the messages that come after it.
        a.locator("#attach-input").set_input_files({"name": "dot.png", "mimeType": "image/png", "buffer": _png(64, 48)})
        preview = "document.querySelector('#messages img.preview')"
        a.wait_for_function(f"() => {preview}?.complete && {preview}.naturalWidth === 64")
        post("after the image")  # not typed here: one's own sends always scroll to the bottom
        expect(ann.bodies("after the image")).to_have_count(1)
        assert a.evaluate(AT_BOTTOM) <= 2, a.evaluate(AT_BOTTOM)
        assert a.evaluate(f"(({{width, height}}) => [width, height])({preview}.getBoundingClientRect())") == [64, 48]
        a.reload()
        expect(ann.bodies("after the image")).to_have_count(1)
        a.wait_for_function(f"() => {preview}?.complete && {preview}.naturalWidth === 64")
        assert a.evaluate(AT_BOTTOM) <= 2, a.evaluate(AT_BOTTOM)

        # Scrolled up, the view stays put when a message comes, and a marker says there is more below.
        a.evaluate("document.getElementById('log').scrollTop = 100")
        post("from my laptop")
        expect(ann.bodies("from my laptop")).to_have_count(1)
        marker = a.get_by_role("button", name="New messages ↓")
        expect(marker).to_be_visible()
        assert a.evaluate("document.getElementById('log').scrollTop") == 100
        marker.click()
        expect(marker).to_be_hidden()
        a.wait_for_function(f"() => ({AT_BOTTOM})() <= 2")

        # A user's links are links (safe ones, opened apart); their markup stays text.
        text = "see https://example.com/a?b=1&c=2. <script>document.title='pwned'</script> javascript:alert(1)"
        ann.say(text)
        body = ann.bodies(text)
        expect(body).to_have_count(1)
        link = body.locator("a")
        expect(link).to_have_count(1)
        expect(link).to_have_attribute("href", "https://example.com/a?b=1&c=2")
        expect(link).to_have_attribute("rel", "noopener noreferrer")
        expect(link).to_have_attribute("target", "_blank")
        expect(a.locator("#messages script")).to_have_count(0)
        assert a.title() == "chatd"

        # Three prompts at once: each answer (streaming or waiting) in the order of its prompt, each saying
        # which prompt it answers.
        for word in ("one", "two", "three"):
            ann.say(f"@assistant {word}")
        answers = a.locator("#messages > li.assistant")
        a.wait_for_function(  # the server streams two answers of a room at once: the third waits
            "() => document.querySelectorAll('#messages > li.assistant.streaming').length === 2"
            " && document.querySelectorAll('#messages > li.assistant.queued').length === 1"
        )
        quotes = [f"↳ You: @assistant {w}" for w in ("one", "two", "three")]
        assert answers.locator(".reply-to").all_inner_texts() == quotes
        roles = a.evaluate("[...document.querySelectorAll('#messages > li')].map((li) => li.className.split(' ')[1])")
        assert roles[-6:] == ["mine"] * 3 + ["assistant"] * 3, roles
        for word in ("three", "one", "two"):
            answers.filter(has_text=f"@assistant {word}").get_by_role("button", name="Stop").click()
        stopped = a.locator("#messages > li.assistant.partial")
        expect(stopped).to_have_count(2)
        expect(answers).to_have_count(2)
        expect(stopped.locator(".reply-to")).to_have_text(quotes[:2])
        # Regenerate is a small icon button, named for screen readers.
        regenerate = stopped.first.get_by_role("button", name="Regenerate")
        box = regenerate.bounding_box()
        assert box is not None and box["width"] <= 40 and box["height"] <= 32, box
        ARTIFACTS.mkdir(exist_ok=True)
        a.screenshot(path=str(ARTIFACTS / "webapp-answers.png"))
        assert ann.errors == []
    finally:
        ann.context.close()


# Every WebSocket the page opens, for a test to write on the app's own socket.
SOCKET_TAP = """
(() => {
  const Native = window.WebSocket;
  window.__sockets = [];
  window.WebSocket = class extends Native {
    constructor(...args) {
      super(...args);
      window.__sockets.push(this);
    }
  };
})();
"""
RAW_CODES = re.compile(r"\b(rate_limited|busy|unavailable|forbidden|not_found|conflict|bad_request|quota_exceeded)\b")


def create_room(person: Person, name: str) -> int:
    page = person.page
    page.get_by_label("Name", exact=True).fill(name)
    page.get_by_role("button", name="Create room").click()
    expect(page.locator("#room-title")).to_have_text(name)
    return int(page.evaluate("new URLSearchParams(location.hash.slice(1)).get('room')"))


def shared_room(owner: Person, member: Person, prefix: str, first: str) -> int:
    """``owner`` creates a room (named ``prefix-…``), adds ``member`` and says ``first``; ``member`` opens the
    room and sees it.  Both registered; returns the room id."""
    name = f"{prefix}-{uuid.uuid4().hex[:6]}"
    room = create_room(owner, name)
    rest(owner.base, f"/rooms/{room}/members", owner.token(), {"user_id": member.id})
    owner.say(first)
    expect(owner.bodies(first)).to_have_count(1)
    member.page.get_by_role("button", name=re.compile(f"^{name}")).click()
    expect(member.bodies(first)).to_have_count(1)
    return room


def test_fast_sending_is_paced_kept_over_a_reload_and_a_policy_close_reconnects(
    server: Chatd, browser: Browser
) -> None:
    # Issue 22: 25 messages typed within a second went over the send rate (20 per window) and the typing limit
    # (3/s: the app sent `true` and `false` for every message); the server closed with 1008, the app signed out,
    # and the messages still waiting were lost.
    ann = Person(browser, server.http, "Ann")
    ann.context.add_init_script(SOCKET_TAP)
    sent: list[dict[str, Any]] = []
    sent_at: list[float] = []

    def on_frame(data: str | bytes) -> None:
        sent.append(json.loads(data))
        sent_at.append(time.monotonic())

    ann.page.on("websocket", lambda ws: ws.on("framesent", on_frame))
    try:
        ann.register()
        a = ann.page
        room_id = create_room(ann, f"burst-{uuid.uuid4().hex[:6]}")
        for i in range(1, 26):
            ann.composer().fill(f"burst {i}")
            ann.composer().press("Enter")

        # 20 go at once (the server's send quota); the other 5 wait in the outbox, which a reload keeps.
        expect(a.locator("#messages > li.msg:not(.pending)")).to_have_count(20)
        outbox = f"JSON.parse(localStorage.getItem('chatd.outbox.{ann.id}') ?? 'null')?.entries ?? []"
        a.wait_for_function(f"() => {outbox}.length === 5")
        waiting = {e["content"]: e["clientMsgId"] for e in a.evaluate(f"() => {outbox}")}
        assert sorted(waiting) == sorted(f"burst {i}" for i in range(21, 26))
        sends = [f for f in sent if f["type"] == "send"]
        assert len(sends) == 20 and not {f["client_msg_id"] for f in sends} & set(waiting.values())
        typing = [f for f in sent if f["type"] == "typing"]
        assert len(typing) <= 2, typing  # one `true` while typing, one `false`: not one of each per message
        a.reload()
        expect(a.locator("#conn")).to_have_text("connected")
        expect(a.locator("#messages > li.pending")).to_have_count(5)  # shown as waiting after the reload too
        expect(a.locator("#messages > li.msg:not(.pending)")).to_have_count(25, timeout=30_000)

        # Each message stored once; the waiting ones with the client_msg_id they had before the reload, each
        # sent once: nothing was refused (a refusal would have been retried).
        stored = rest(server.http, f"/rooms/{room_id}/messages?limit=200", ann.token())["messages"]
        assert sorted(m["content"] for m in stored) == sorted(f"burst {i}" for i in range(1, 26))
        assert {m["content"]: m["client_msg_id"] for m in stored if m["content"] in waiting} == waiting
        ids = [f["client_msg_id"] for f in sent if f["type"] == "send"]
        assert len(ids) == 25 == len(set(ids))
        # The 21st went once the first had left the server's window (its `hello.limits`), not before.
        send_times = [at for at, f in zip(sent_at, sent, strict=True) if f["type"] == "send"]
        assert SEND_WINDOW_S <= send_times[20] - send_times[0] < SEND_WINDOW_S * 1.1 + 3
        a.wait_for_function(f"() => {outbox}.length === 0")

        # A policy close (here: the socket made to send 60 typing frames at once, 50 of them refused) is
        # explained in words and followed by a reconnect, not a sign-out.
        a.evaluate(
            "(room) => { const ws = window.__sockets.at(-1);"
            " const frame = JSON.stringify({type: 'typing', room_id: room, is_typing: true});"
            " for (let i = 0; i < 60; i++) ws.send(frame); }",
            room_id,
        )
        alert = a.locator("#alerts .notice.error")
        expect(alert).to_contain_text("closed the connection")
        expect(a.locator("#conn")).to_have_text("connected")
        expect(a.locator("#signin")).to_be_hidden()
        ann.say("still here")
        expect(ann.bodies("still here")).to_have_count(1)
        assert not RAW_CODES.search(a.locator("#app").inner_text())
        assert ann.errors == []
    finally:
        ann.context.close()


def test_members_see_only_the_controls_the_server_allows_and_notices_and_hints_guide_them(
    server: Chatd, browser: Browser
) -> None:
    alice = Person(browser, server.http, "Alice")
    bob = Person(browser, server.http, "Bob")
    try:
        alice.register()
        bob.register()
        a, b = alice.page, bob.page

        # Empty states say what to do.
        expect(a.locator("#rooms-empty")).to_have_text("No rooms yet: create one below.")
        expect(a.locator("#room-hint")).to_contain_text("Create a room on the left")
        room_name = f"group-{uuid.uuid4().hex[:6]}"
        create_room(alice, room_name)
        expect(a.locator("#rooms-empty")).to_be_hidden()
        expect(a.locator("#room-hint")).to_have_text("No messages yet — say hello.")

        # Notices: an error is announced assertively and stays; a success politely, and goes by itself.
        a.get_by_label("Add member").fill("nobody-such")
        a.get_by_role("button", name="Add", exact=True).click()
        error = a.locator("#alerts .notice.error")
        expect(error).to_have_text('Could not add the member: No one found for "nobody-such".')
        expect(a.locator("#alerts")).to_have_attribute("aria-live", "assertive")
        a.get_by_label("Add member").fill(bob.email)
        a.get_by_role("button", name="Add", exact=True).click()
        success = a.locator("#notice")
        expect(success).to_have_text("Bob added.")
        expect(success).to_have_class(re.compile(r"\bsuccess\b"))
        expect(success).to_have_attribute("aria-live", "polite")

        # Bob opens the room; Alice asks the assistant. Only she (the prompt's author, here also the owner)
        # may stop the answer (PROTOCOL.md §3 cancel): Bob sees it stream without a Stop button.
        b.get_by_role("button", name=re.compile(f"^{room_name}")).click()
        expect(b.locator("#room-title")).to_have_text(room_name)
        alice.say("@assistant say something to Bob")
        expect(bob.bodies("@assistant say something to Bob")).to_have_count(1)
        expect(b.locator("#room-hint")).to_be_hidden()
        # Read at one instant: a streaming answer with text so far, and its buttons.
        seen = b.wait_for_function(
            "() => { const li = document.querySelector('#messages > li.streaming');"
            " return li?.querySelector('.body').textContent ? {buttons: li.querySelectorAll('button').length} : null; }"
        ).json_value()
        assert seen == {"buttons": 0}
        stop = a.locator("#messages > li.streaming").get_by_role("button", name="Stop")
        expect(stop).to_be_visible()
        stop.click()
        partial = b.locator("#messages > li.assistant.partial")
        expect(partial).to_have_count(1)
        # Any member may regenerate an answer (PROTOCOL.md §3 regenerate): Bob has that button.
        expect(partial.get_by_role("button", name="Regenerate")).to_be_visible()

        expect(success).to_have_text("", timeout=10_000)  # gone by itself
        expect(error).to_be_visible()  # still there
        error.get_by_role("button", name="Dismiss").click()
        expect(error).to_have_count(0)
        for page in (a, b):
            assert not RAW_CODES.search(page.locator("#app").inner_text())
        assert alice.errors == [] and bob.errors == []
    finally:
        alice.context.close()
        bob.context.close()


# The web app's session.js is the twin of chatd/client/session.py: the same scenarios as
# tests/unit/client/test_client_session.py, run in the browser on the module the page loads.
JS_SCENARIOS = """
async () => {
  const { Session, RESUME_ID } = await import("/static/js/session.js");
  const ME = 42, BOB = 57;
  const msg = (seq, content, sender = BOB, extra = {}) => ({type: "message", room_id: 7, message_id: 9000 + seq, seq,
    sender_id: sender, role: sender === null ? "assistant" : "user", content: content ?? `m${seq}`,
    created_at: "2025-06-01T12:00:00.000Z", deleted: false, ...extra});
  const frames = (actions) => actions.filter((a) => a.kind === "send").map((a) => a.frame);
  const live = (history) => {
    const s = new Session("c");
    s.setRooms([{id: 7, name: "ops", last_seq: history, read_seq: 0}]);
    s.openRoom(7);
    s.page(7, "latest", Array.from({length: history}, (_, i) => msg(i + 1)), false);
    s.connectionOpened();
    s.receive({type: "hello", user_id: ME}, 0);
    s.receive({type: "joined", room_id: 7, last_seq: history, online: [ME]}, 0);
    s.receive({type: "pong", reply_to: RESUME_ID}, 0);
    return s;
  };
  const seqs = (s) => [...s.rooms.get(7).messages.keys()].sort((a, b) => a - b);
  const out = {};

  // Resume: join with since_seq, replay and live deduped by seq, gaps buffered.
  let s = live(3);
  s.connectionLost();
  s.connectionOpened();
  out.rejoin = frames(s.receive({type: "hello", user_id: ME}, 0));
  for (const seq of [6, 3, 4, 5, 5]) s.receive(msg(seq), 0);
  out.resumed = seqs(s);

  // A send cut before its ack: not resent when the replay shows it, resent with the same id otherwise.
  s = live(3);
  const one = frames(s.sendText(7, "one"))[0], two = frames(s.sendText(7, "two"))[0];
  s.connectionLost();
  s.connectionOpened();
  s.receive({type: "hello", user_id: ME}, 0);
  s.receive(msg(4, "one", ME, {client_msg_id: one.client_msg_id}), 0);
  out.resent = frames(s.receive({type: "pong", reply_to: RESUME_ID}, 0));
  out.two = two;

  // busy with retry_after_ms: kept pending, resent after the delay.
  s = live(0);
  const busy = frames(s.sendText(7, "a"))[0];
  s.receive({type: "error", code: "busy", message: "overloaded", reply_to: busy.id, retry_after_ms: 1500}, 10000);
  out.early = frames(s.tick(11000));
  out.retry = frames(s.tick(11500));
  out.busy = busy;

  // A stream re-announced on rejoin: the catch-up chunk rebuilds the text.
  s = live(1);
  s.receive({type: "stream_start", room_id: 7, message_id: 9100, reply_to_message_id: 9001}, 0);
  s.receive({type: "stream_chunk", room_id: 7, message_id: 9100, index: 0, content: "Hel"}, 0);
  s.receive({type: "stream_start", room_id: 7, message_id: 9100, reply_to_message_id: 9001}, 0);
  s.receive({type: "stream_chunk", room_id: 7, message_id: 9100, index: 2, content: "Hello, wor"}, 0);
  s.receive({type: "stream_chunk", room_id: 7, message_id: 9100, index: 2, content: "Hello, wor"}, 0);
  s.receive({type: "stream_chunk", room_id: 7, message_id: 9100, index: 3, content: "ld"}, 0);
  out.stream = s.rooms.get(7).streams.get(9100).text;

  // A queued answer cancelled before it started.
  s.receive({type: "queued", room_id: 7, reply_to_message_id: 9002, position: 2}, 0);
  s.receive({type: "queued", room_id: 7, reply_to_message_id: 9003, position: 3}, 0);
  s.receive({type: "cancelled", room_id: 7, reply_to_message_id: 9002}, 0);
  out.queued = [...s.rooms.get(7).queued.keys()];

  // Batched presence.
  s.receive({type: "presence", room_id: 7, online: [BOB, 61], offline: []}, 0);
  s.receive({type: "presence", room_id: 7, online: [], offline: [61]}, 0);
  out.online = [...s.rooms.get(7).online].sort();

  // Room events: added (joined at once while connected), renamed, removed; names from member events.
  s = live(0);
  const room8 = {id: 8, name: "new", kind: "group", owner_id: BOB, status: "active", last_seq: 1, read_seq: 1};
  const added = s.receive({type: "room_added", room: room8}, 0);
  out.addedJoin = frames(added);
  out.addedNotice = added.filter((a) => a.kind === "notice").map((a) => a.text);
  out.addedAgain = frames(s.receive({type: "room_added", room: room8}, 0));
  s.receive({type: "room_updated", room: {...room8, name: "renamed", status: "archived"}}, 0);
  out.updated = [s.rooms.get(8).name, s.rooms.get(8).status];
  s.receive(msg(1, "Bob joined", null, {role: "system", kind: "system",
    data: {event: "member_joined", user_id: BOB, name: "Bob", by: ME}}), 0);
  out.name = s.nameOf(BOB);
  const removed = s.receive({type: "room_removed", room_id: 8, reason: "removed"}, 0);
  out.removed = [removed.map((a) => a.kind), s.rooms.has(8)];
  out.removedTwice = s.receive({type: "room_removed", room_id: 8, reason: "removed"}, 0);

  // The epoch: sent back with since_seq; a new one drops the history of the old.
  s = live(3);
  s.receive({type: "joined", room_id: 7, last_seq: 3, epoch: "e1", online: [ME]}, 0);
  s.connectionLost();
  s.connectionOpened();
  out.epochRejoin = frames(s.receive({type: "hello", user_id: ME}, 0)).filter((f) => f.type === "join");
  const restored = s.receive({type: "joined", room_id: 7, last_seq: 2, epoch: "e2", online: [ME]}, 0);
  out.epochFetch = restored.filter((a) => a.kind === "fetch").map((a) => a.purpose);
  out.epochRoom = [s.rooms.get(7).loaded, s.rooms.get(7).messages.size, s.rooms.get(7).epoch];
  out.epochResync = s.receive({type: "resync_required", room_id: 7, last_seq: 2, epoch: "e2"}, 0)
    .filter((a) => a.kind === "fetch").length;
  return out;
}
"""


def test_the_web_apps_session_module_follows_the_resume_rules(server: Chatd, browser: Browser) -> None:
    context = browser.new_context()
    try:
        page = context.new_page()
        page.goto(server.http + "/")
        out = page.evaluate(JS_SCENARIOS)
    finally:
        context.close()
    assert out["rejoin"] == [
        {"type": "join", "id": "j:7", "room_id": 7, "since_seq": 3},
        {"type": "ping", "id": "resume"},
    ]
    assert out["resumed"] == [1, 2, 3, 4, 5, 6]
    assert out["resent"] == [out["two"]]
    assert out["early"] == [] and out["retry"] == [out["busy"]]
    assert out["stream"] == "Hello, world"
    assert out["queued"] == [9003]
    assert out["online"] == [42, 57]
    assert out["addedJoin"] == [{"type": "join", "id": "j:8", "room_id": 8}]
    assert out["addedNotice"] == ["You were added to new."]
    assert out["addedAgain"] == []
    assert out["updated"] == ["renamed", "archived"]
    assert out["name"] == "Bob"
    assert out["removed"] == [["removed", "notice", "redraw"], False]
    assert out["removedTwice"] == []
    assert out["epochRejoin"] == [{"type": "join", "id": "j:7", "room_id": 7, "since_seq": 3, "epoch": "e1"}]
    assert out["epochFetch"] == ["latest"]
    assert out["epochRoom"] == [False, 0, "e2"]
    assert out["epochResync"] == 0
