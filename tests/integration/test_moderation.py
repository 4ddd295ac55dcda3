"""Moderation against real chatd processes, Postgres and Valkey: reports and their queue, content rules across
instances (block, mask, flag; edits; the assistant's input), and bulk redaction seen live and on resume.

Content rules are global to the shared test database, so every rule here matches only a random token of its
own test: other tests running at the same time never send it.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from tests.chat import API, connect, join, make_room, send, send_many
from tests.conftest import Services
from tests.fake_anthropic import FakeLLM
from tests.openapi_check import Api, contract_for
from tests.support import WS, Chatd, request
from tests.users import User, make_users


def token() -> str:
    return "zq" + uuid.uuid4().hex[:10]


async def api_for(server: Chatd) -> Api:
    return Api(server.http, await contract_for(server.http))


def row_of(database_url: str, query: str, params: tuple[Any, ...]) -> Any:
    with psycopg.connect(database_url) as conn:
        return conn.execute(query, params).fetchone()


async def audit_rows(database_url: str, action: str, target: str, want: int = 1) -> list[Any]:
    """The audit rows of an action (written just after the response): polled briefly."""
    deadline = time.monotonic() + 10
    while True:
        with psycopg.connect(database_url) as conn:
            rows = conn.execute(
                "SELECT actor_id, action, target, details, status FROM audit_log WHERE action = %s AND target = %s",
                (action, target),
            ).fetchall()
        if len(rows) >= want or time.monotonic() > deadline:
            return rows
        await asyncio.sleep(0.1)


async def add_rule(api: Api, admin: User, kind: str, pattern: str, action: str) -> dict[str, Any]:
    r = await api(
        "POST", f"{API}/admin/content-rules", {"kind": kind, "pattern": pattern, "action": action}, admin.token
    )
    assert r.status == 201, r.body
    return dict(r.body)


async def send_until(ws: WS, room: int, content: str, code: str | None, timeout_s: float = 10) -> dict[str, Any]:
    """Send until the reply is the error ``code`` (None: an ack): a rule reaches the other instance within moments."""
    deadline = time.monotonic() + timeout_s
    while True:
        reply = await send(ws, room, content)
        got = reply.get("code") if reply["type"] == "error" else None
        if got == code or time.monotonic() > deadline:
            return reply
        await asyncio.sleep(0.1)


# -- reports ---------------------------------------------------------------------------------------------------


async def test_reports_are_idempotent_rate_limited_and_worked_by_owner_and_admin(
    chatd_factory: Any, services: Services
) -> None:
    server = chatd_factory(CHATD_MODERATION_REPORTS_PER_WINDOW="4")
    owner, bob, carol, mallory = make_users(services.database_url, 4)
    (admin,) = make_users(services.database_url, 1, role="admin")
    room = await make_room(server, owner, [bob, carol])
    api = await api_for(server)
    b, o = await connect(server, bob), await connect(server, owner)
    for ws in (b, o):
        await join(ws, room)
    first, second, third = [(await send(b, room, f"bad {i}"))["message_id"] for i in range(3)]
    path = f"{API}/rooms/{room}/messages/{first}/reports"

    r = await api("POST", path, {"reason": "spam"}, carol.token)
    assert r.status == 201 and r.body["status"] == "open" and r.body["reporter_id"] == carol.id, r.body
    again = await api("POST", path, {"reason": "spam, really"}, carol.token)
    assert again.status == 200 and again.body["id"] == r.body["id"] and again.body["reason"] == "spam"
    # Bad input: nothing is filed.
    own = await api("POST", f"{API}/rooms/{room}/messages/{first}/reports", {"reason": "me"}, bob.token)
    assert own.status == 400 and own.body["error"]["code"] == "bad_request"
    blank = await api("POST", path, {"reason": "   "}, owner.token)
    assert blank.status == 400
    outsider = await api("POST", path, {"reason": "x"}, mallory.token)
    assert outsider.status == 404 and outsider.body["error"]["code"] == "not_found"
    wrong_room = await api(
        "POST", f"{API}/rooms/{room + 10_000}/messages/{first}/reports", {"reason": "x"}, carol.token
    )
    assert wrong_room.status == 404
    assert row_of(services.database_url, "SELECT count(*) FROM message_reports WHERE message_id = %s", (first,))[0] == 1

    # Rate limit: 4 per window per user (the duplicate above counted too).
    assert (
        await api("POST", f"{API}/rooms/{room}/messages/{second}/reports", {"reason": "a"}, carol.token)
    ).status == 201
    assert (
        await api("POST", f"{API}/rooms/{room}/messages/{third}/reports", {"reason": "b"}, carol.token)
    ).status == 201
    limited = await api("POST", f"{API}/rooms/{room}/messages/{third}/reports", {"reason": "c"}, carol.token)
    assert limited.status == 429 and limited.body["error"]["code"] == "rate_limited"
    assert limited.body["error"]["retry_after_ms"] > 0

    # The owner's queue has the room's reports; someone else's queue has none of them and cannot act on them.
    queue = await api("GET", f"{API}/moderation/reports?status=open&room_id={room}", token=owner.token)
    assert queue.status == 200 and len(queue.body["reports"]) == 3
    assert queue.body["reports"][-1]["message"] == {"seq": 1, "content": "bad 0", "deleted": False}
    theirs = await api("GET", f"{API}/moderation/reports?room_id={room}", token=mallory.token)
    assert theirs.status == 200 and theirs.body["reports"] == []
    report_id = r.body["id"]
    denied = await api("POST", f"{API}/moderation/reports/{report_id}", {"action": "dismiss"}, mallory.token)
    assert denied.status == 404

    # delete: the message is tombstoned live, the report closed, the action audited.
    done = await api("POST", f"{API}/moderation/reports/{report_id}", {"action": "delete"}, owner.token)
    assert done.status == 200 and done.body["status"] == "deleted" and done.body["handled_by"] == owner.id
    assert done.body["message"]["deleted"] is True
    for ws in (b, o):
        await ws.expect("message_deleted", message_id=first)
    twice = await api("POST", f"{API}/moderation/reports/{report_id}", {"action": "resolve"}, owner.token)
    assert twice.status == 409 and twice.body["error"]["code"] == "conflict"
    (audit,) = await audit_rows(services.database_url, "report.delete", f"report:{report_id}")
    assert audit[0] == owner.id and audit[3]["message_id"] == first and audit[3]["sender_id"] == bob.id

    # dismiss by the owner; the admin sees every room's reports and bans the sender: account banned, socket closed.
    second_report = (await api("GET", f"{API}/moderation/reports?status=open&room_id={room}", token=admin.token)).body
    ids = {x["message_id"]: x["id"] for x in second_report["reports"]}
    assert set(ids) == {second, third}
    dismissed = await api("POST", f"{API}/moderation/reports/{ids[second]}", {"action": "dismiss"}, owner.token)
    assert dismissed.status == 200 and dismissed.body["status"] == "dismissed"
    banned = await api("POST", f"{API}/moderation/reports/{ids[third]}", {"action": "ban"}, admin.token)
    assert banned.status == 200 and banned.body["status"] == "banned", banned.body
    code, _ = await b.closed(timeout_s=10)
    assert code == 1008
    status = row_of(services.database_url, "SELECT status FROM users WHERE id = %s", (bob.id,))[0]
    assert status == "banned"
    (audit,) = await audit_rows(services.database_url, "report.ban", f"report:{ids[third]}")
    assert audit[0] == admin.id and audit[3]["scope"] == "account"
    assert await audit_rows(services.database_url, "report.dismiss", f"report:{ids[second]}")


async def test_a_room_owner_bans_from_the_room_only(chatd_factory: Any, services: Services) -> None:
    server = chatd_factory()
    owner, bob, carol = make_users(services.database_url, 3)
    room = await make_room(server, owner, [bob, carol])
    api = await api_for(server)
    b = await connect(server, bob)
    await join(b, room)
    msg = (await send(b, room, "rude"))["message_id"]
    report = (await api("POST", f"{API}/rooms/{room}/messages/{msg}/reports", {"reason": "rude"}, carol.token)).body
    r = await api("POST", f"{API}/moderation/reports/{report['id']}", {"action": "ban"}, owner.token)
    assert r.status == 200 and r.body["status"] == "banned"
    await b.expect("room_removed", room_id=room)
    assert row_of(services.database_url, "SELECT status FROM users WHERE id = %s", (bob.id,))[0] == "active"
    member = row_of(
        services.database_url, "SELECT 1 FROM room_members WHERE room_id = %s AND user_id = %s", (room, bob.id)
    )
    assert member is None


# -- content rules -------------------------------------------------------------------------------------------


async def test_content_rules_block_mask_and_flag_on_every_instance(chatd_factory: Any, services: Services) -> None:
    a_srv, b_srv = chatd_factory(), chatd_factory(workers=2)
    owner, bob = make_users(services.database_url, 2)
    (admin,) = make_users(services.database_url, 1, role="admin")
    room = await make_room(a_srv, owner, [bob])
    api_a, api_b = await api_for(a_srv), await api_for(b_srv)
    o, b = await connect(a_srv, owner), await connect(b_srv, bob)
    for ws in (o, b):
        await join(ws, room)
    blocked, masked, flagged = token(), token(), token()

    # Rules made on instance A apply to sends on instance B (both workers).
    block = await add_rule(api_a, admin, "word", blocked, "block")
    mask = await add_rule(api_a, admin, "regex", masked + r"\d+", "mask")
    flag = await add_rule(api_a, admin, "word", flagged, "flag")
    assert mask["version"] > block["version"]
    before = row_of(services.database_url, "SELECT last_seq FROM rooms WHERE id = %s", (room,))[0]
    refused = await send_until(b, room, f"say {blocked.upper()} now", "content_blocked")
    assert refused["type"] == "error" and refused["code"] == "content_blocked", refused
    assert refused["details"]["rules"] == [block["id"]]
    # Nothing half-stored: no seq used, no row.
    assert row_of(services.database_url, "SELECT last_seq FROM rooms WHERE id = %s", (room,))[0] == before
    stored = row_of(services.database_url, "SELECT count(*) FROM messages WHERE content ILIKE %s", (f"%{blocked}%",))
    assert stored[0] == 0
    rest = await api_b(
        "POST", f"{API}/rooms/{room}/messages", {"content": blocked, "client_msg_id": token()}, bob.token
    )
    assert rest.status == 422 and rest.body["error"]["code"] == "content_blocked"
    # A word is a whole word: inside another word it does not match.
    assert (await send(b, room, f"x{blocked}x"))["type"] == "ack"

    ack = await send_until(b, room, f"a {masked}123 b {masked}9", None)
    await o.expect("message", message_id=ack["message_id"], content="a *** b ***")
    assert (await send(b, room, f"{masked} without digits"))["type"] == "ack"  # the regex needs the digits

    ack = await send_until(b, room, f"hello {flagged}", None)
    deadline = time.monotonic() + 10
    while True:
        queue = await api_a("GET", f"{API}/moderation/reports?room_id={room}", token=owner.token)
        reports = [x for x in queue.body["reports"] if x["message_id"] == ack["message_id"]]
        if reports or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.1)
    assert len(reports) == 1 and reports[0]["reporter_id"] is None and f"#{flag['id']}" in reports[0]["reason"]

    # Edits follow the same rules: a blocked edit changes nothing, a masked one is stored masked.
    mine = (await send(b, room, "clean"))["message_id"]
    rid = uuid.uuid4().hex[:8]
    await b.send({"type": "edit", "id": rid, "message_id": mine, "content": f"now {blocked}"})
    err = await b.expect("error", reply_to=rid)
    assert err["code"] == "content_blocked"
    assert row_of(services.database_url, "SELECT content FROM messages WHERE id = %s", (mine,))[0] == "clean"
    await b.send({"type": "edit", "id": token(), "message_id": mine, "content": f"now {masked}42"})
    await o.expect("message_updated", message_id=mine, content="now ***")
    await b.send({"type": "edit", "id": token(), "message_id": mine, "content": f"then {flagged}"})
    await o.expect("message_updated", message_id=mine, content=f"then {flagged}")
    deadline = time.monotonic() + 10  # filed just after the edit is published: polled briefly
    while True:
        flags = row_of(
            services.database_url,
            "SELECT count(*) FROM message_reports WHERE message_id = %s AND reporter_id IS NULL",
            (mine,),
        )[0]
        if flags or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.1)
    assert flags == 1  # an edit is flagged as a send is

    # Bad rules: a clear 400, nothing stored.
    count = row_of(services.database_url, "SELECT count(*) FROM content_rules", ())[0]
    for kind, pattern in (("regex", r"(a)\1"), ("regex", "a*"), ("regex", "(unclosed"), ("word", "x" * 201)):
        r = await api_a(
            "POST", f"{API}/admin/content-rules", {"kind": kind, "pattern": pattern, "action": "block"}, admin.token
        )
        assert r.status == 400 and r.body["error"]["code"] == "bad_request", (pattern, r.body)
    user_try = await api_a(
        "POST", f"{API}/admin/content-rules", {"kind": "word", "pattern": "x", "action": "block"}, bob.token
    )
    assert user_try.status == 403
    assert row_of(services.database_url, "SELECT count(*) FROM content_rules", ())[0] == count
    # A pathological regex for a backtracking engine (minutes with Python's re on this message) costs RE2
    # nothing: the send is answered as usual (send's reply wait would fail the test otherwise).
    slow = await add_rule(api_a, admin, "regex", r"\w*\w*\w*" + token(), "block")
    assert (await send_until(b, room, "a" * 3900, None))["type"] == "ack"

    listed = await api_a("GET", f"{API}/admin/content-rules", token=admin.token)
    assert {block["id"], mask["id"], flag["id"], slow["id"]} <= {x["id"] for x in listed.body["rules"]}
    # Removing the rule lets the word through again, on the other instance too.
    for rule in (block, mask, flag, slow):
        gone = await api_a("DELETE", f"{API}/admin/content-rules/{rule['id']}", token=admin.token)
        assert gone.status == 200 and gone.body["id"] == rule["id"]
    assert (await api_a("DELETE", f"{API}/admin/content-rules/{block['id']}", token=admin.token)).status == 404
    assert (await send_until(b, room, f"say {blocked}", None))["type"] == "ack"
    assert await audit_rows(services.database_url, "POST /api/v1/admin/content-rules", f"content_rule:{block['id']}")


@pytest.fixture
def fake_llm() -> Iterator[FakeLLM]:
    llm = FakeLLM()
    yield llm
    llm.stop()


async def test_the_assistant_sees_masked_content_and_nothing_of_a_blocked_prompt(
    chatd_factory: Any, fake_llm: FakeLLM, services: Services
) -> None:
    server: Chatd = chatd_factory(
        ANTHROPIC_API_KEY="sk-ant-test", ANTHROPIC_BASE_URL=fake_llm.url, CHATD_ASSISTANT_MODEL="claude-test"
    )
    fake_llm.script(reply="noted", tokens_per_s=500)
    (alice,) = make_users(services.database_url, 1)
    (admin,) = make_users(services.database_url, 1, role="admin")
    api = await api_for(server)
    room = await make_room(server, alice, [], kind="assistant")
    a = await connect(server, alice)
    await join(a, room)
    secret, blocked = token(), token()
    await add_rule(api, admin, "word", secret, "mask")
    await add_rule(api, admin, "word", blocked, "block")
    reply = await send_until(a, room, f"my password is {blocked}", "content_blocked")
    assert reply["code"] == "content_blocked"
    ack = await send(a, room, f"my key is {secret} ok")
    assert ack["type"] == "ack"
    await a.expect("stream_end", timeout_s=30, room_id=room)
    prompts = [str(m["content"]) for req in fake_llm.requests() for m in req["messages"]]
    assert any("my key is *** ok" in p for p in prompts), prompts
    assert not any(secret in p or blocked in p for p in prompts)
    owed = row_of(services.database_url, "SELECT count(*) FROM generations WHERE room_id = %s", (room,))[0]
    assert owed == 1  # the blocked prompt queued no answer


# -- bulk redaction ------------------------------------------------------------------------------------------


async def test_bulk_redaction_is_live_on_two_instances_and_repaired_on_resume(
    chatd_factory: Any, services: Services
) -> None:
    a_srv = chatd_factory(CHATD_MODERATION_REDACT_BATCH="7")
    b_srv = chatd_factory(workers=2, CHATD_MODERATION_REDACT_BATCH="7", CHATD_WS_SEND_RATE_COUNT="200")
    owner, victim, bob, carol = make_users(services.database_url, 4)
    (admin,) = make_users(services.database_url, 1, role="admin")
    room = await make_room(a_srv, owner, [victim, bob, carol])
    other = await make_room(a_srv, victim, [bob])
    api = await api_for(a_srv)
    v, b, c = await connect(b_srv, victim), await connect(a_srv, bob), await connect(b_srv, carol)
    for ws in (v, b, c):
        await join(ws, room)
    await join(v, other)
    mine = [r["message_id"] for r in await send_many(v, room, [f"v{i}" for i in range(30)])]
    kept = (await send(b, room, "bob stays"))["message_id"]
    elsewhere = [r["message_id"] for r in await send_many(v, other, ["o1", "o2"])]
    joined = await join(c, room)
    last_seq, rev = joined["last_seq"], joined["edit_rev"]
    c.close()  # carol is away during the redaction

    r = await api("POST", f"{API}/admin/users/{victim.id}/redact", {"room_id": room}, admin.token)
    assert r.status == 200 and r.body == {"user_id": victim.id, "room_id": room, "messages": 30, "rooms": [room]}
    # Live, on the other instance: a tombstone per message, in order, each with its own revision.
    deleted = [await b.expect("message_deleted", timeout_s=15, room_id=room) for _ in mine]
    assert [f["message_id"] for f in deleted] == mine
    assert [f["rev"] for f in deleted] == list(range(rev + 1, rev + 31))
    rows = row_of(
        services.database_url,
        "SELECT count(*) FILTER (WHERE deleted_at IS NOT NULL AND content = ''), count(*) FILTER (WHERE id = %s"
        " AND deleted_at IS NULL) FROM messages WHERE room_id = %s",
        (kept, room),
    )
    assert rows == (30, 1)
    assert row_of(services.database_url, "SELECT edit_rev FROM rooms WHERE id = %s", (room,))[0] == rev + 30
    # The other room was not touched.
    assert (
        row_of(
            services.database_url,
            "SELECT count(*) FROM messages WHERE id = ANY(%s) AND deleted_at IS NULL",
            (elsewhere,),
        )[0]
        == 2
    )
    (audit,) = await audit_rows(
        services.database_url, f"POST /api/v1/admin/users/{victim.id}/redact", f"user:{victim.id}"
    )
    assert audit[0] == admin.id and audit[3] == {"room_id": room, "messages": 30, "rooms": [room]}

    # Carol comes back on instance B: her join with since_rev gets every tombstone before `joined`.
    c2 = await connect(b_srv, carol)
    rid = uuid.uuid4().hex[:8]
    await c2.send({"type": "join", "room_id": room, "id": rid, "since_seq": last_seq, "since_rev": rev})
    frames = []
    while True:
        f = await c2.expect_any(("message_deleted", "joined"), timeout_s=15, room_id=room)
        if f["type"] == "joined":
            break
        frames.append(f)
    assert sorted(f["message_id"] for f in frames) == mine

    # Everywhere: the rest of the victim's messages, in every room, one audited action.
    r = await api("POST", f"{API}/admin/users/{victim.id}/redact", None, admin.token)
    assert r.status == 200 and r.body["messages"] == 2 and r.body["rooms"] == [other], r.body
    for mid in elsewhere:
        await v.expect("message_deleted", message_id=mid, room_id=other)
    again = await api("POST", f"{API}/admin/users/{victim.id}/redact", {}, admin.token)
    assert again.status == 200 and again.body["messages"] == 0
    assert (await api("POST", f"{API}/admin/users/{victim.id}/redact", {}, bob.token)).status == 403
    unknown = await api("POST", f"{API}/admin/users/{victim.id}/redact", {"room_id": 2**40}, admin.token)
    assert unknown.status == 404


async def test_concurrent_reports_by_one_user_are_one_report(chatd_factory: Any, services: Services) -> None:
    a_srv, b_srv = chatd_factory(), chatd_factory()
    owner, bob, carol = make_users(services.database_url, 3)
    room = await make_room(a_srv, owner, [bob, carol])
    b = await connect(a_srv, bob)
    msg = (await send(b, room, "once"))["message_id"]
    path = f"{API}/rooms/{room}/messages/{msg}/reports"
    apis = [await api_for(a_srv), await api_for(b_srv)]
    replies = await asyncio.gather(*(apis[i % 2]("POST", path, {"reason": f"r{i}"}, carol.token) for i in range(6)))
    assert sorted(r.status for r in replies) == [200] * 5 + [201]
    assert len({r.body["id"] for r in replies}) == 1
    assert row_of(services.database_url, "SELECT count(*) FROM message_reports WHERE message_id = %s", (msg,))[0] == 1


async def upload(server: Chatd, user: User, room: int, caption: str) -> Any:
    boundary = "modfixture"
    body = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="caption"\r\n\r\n{caption}\r\n'
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="note.txt"\r\n'
        f"Content-Type: text/plain\r\n\r\nhello\r\n--{boundary}--\r\n"
    ).encode()
    return await request(
        "POST",
        f"{server.http}{API}/rooms/{room}/files",
        token=user.token,
        headers={"Content-Type": f"multipart/form-data; boundary={boundary}"},
        raw_body=body,
    )


async def test_a_file_caption_follows_the_rules(chatd_factory: Any, services: Services) -> None:
    server = chatd_factory()
    (owner,) = make_users(services.database_url, 1)
    (admin,) = make_users(services.database_url, 1, role="admin")
    room = await make_room(server, owner, [])
    api = await api_for(server)
    blocked, masked = token(), token()
    rules = [await add_rule(api, admin, "word", blocked, "block"), await add_rule(api, admin, "word", masked, "mask")]
    try:
        refused = await upload(server, owner, room, f"look {blocked}")
        assert refused.status == 422 and refused.body["error"]["code"] == "content_blocked", refused.body
        files = row_of(services.database_url, "SELECT count(*) FROM files WHERE room_id = %s", (room,))[0]
        assert files == 0  # refused before the blob or its row were kept
        stored = await upload(server, owner, room, f"look {masked}")
        assert stored.status == 201 and stored.body["content"] == "look ***", stored.body
    finally:
        for rule in rules:
            await api("DELETE", f"{API}/admin/content-rules/{rule['id']}", token=admin.token)
