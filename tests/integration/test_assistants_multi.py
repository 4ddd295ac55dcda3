"""Issue 21, first part: several assistants per room, from outside (REST, sockets, the database).

Admins define assistants (``/admin/assistants``, audited); a room owner picks some for the room; ``@name``
picks who answers, else those in mode ``always`` do; answers say who answered with which model; usage is
counted per assistant, model and user; one assistant's failure does not stop another's answer.  Providers:
the fake Anthropic API, the fake OpenAI-compatible server (``tests/fake_openai.py``) and the offline one.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from tests.chat import API, connect, join, make_room, send
from tests.conftest import Services
from tests.fake_anthropic import FakeLLM
from tests.fake_openai import FakeOpenAI
from tests.openapi_check import Api, contract_for
from tests.support import WS, Chatd, request
from tests.users import User, make_users


@pytest.fixture
def fake_llm() -> Iterator[FakeLLM]:
    llm = FakeLLM()
    yield llm
    llm.stop()


@pytest.fixture
def fake_openai() -> Iterator[FakeOpenAI]:
    server = FakeOpenAI()
    yield server
    server.stop()


def tag() -> str:
    return uuid.uuid4().hex[:8]  # assistant names are unique server-wide; the tests share a database


async def define(call: Api, admin: User, name: str, provider: str, model: str, **more: Any) -> dict[str, Any]:
    body = {"name": name, "provider": provider, "model": model} | more
    r = await call("POST", f"{API}/admin/assistants", body, token=admin.token)
    assert r.status == 201, r.body
    return dict(r.body)


async def pick(call: Api, owner: User, room: int, assistant: dict[str, Any], mode: str | None = None) -> None:
    r = await call("PUT", f"{API}/rooms/{room}/assistants/{assistant['id']}", {"mode": mode}, token=owner.token)
    assert r.status == 201, r.body


def usage_rows(url: str, user_id: int) -> list[tuple[Any, ...]]:
    with psycopg.connect(url) as conn:
        return conn.execute(
            "SELECT assistant_id, model, answers, output_tokens FROM usage_assistants WHERE user_id = %s"
            " ORDER BY assistant_id, model",
            (user_id,),
        ).fetchall()


def owed(url: str, prompt_id: int) -> list[tuple[Any, ...]]:
    with psycopg.connect(url) as conn:
        return conn.execute(
            "SELECT assistant_id FROM answers_owed WHERE prompt_id = %s UNION ALL"
            " SELECT coalesce(assistant_id, 0) FROM messages WHERE reply_to_id = %s AND role = 'assistant'",
            (prompt_id, prompt_id),
        ).fetchall()


async def streams(
    ws: WS, room: int, prompt_id: int, count: int
) -> dict[str, tuple[dict[str, Any], str, dict[str, Any]]]:
    """``count`` whole answers to ``prompt_id``, by the answering assistant's name."""
    got: dict[str, tuple[dict[str, Any], str, dict[str, Any]]] = {}
    for _ in range(count):
        start = await ws.expect("stream_start", 30, room_id=room, reply_to_message_id=prompt_id)
        chunks: list[str] = []
        while True:
            frame = await ws.expect_any(("stream_chunk", "stream_end"), 30, message_id=start["message_id"])
            if frame["type"] == "stream_end":
                break
            chunks.append(frame["content"])
        got[start["answered_by"]["name"]] = (start, "".join(chunks), frame)
    return got


async def test_mentions_pick_the_assistant_across_two_instances(
    chatd_factory: Any, fake_llm: FakeLLM, fake_openai: FakeOpenAI, services: Services
) -> None:
    env = {
        "ANTHROPIC_API_KEY": "sk-ant-test",
        "ANTHROPIC_BASE_URL": fake_llm.url,
        "CHATD_ASSISTANT_OPENAI_BASE_URL": fake_openai.base_url,
        "CHATD_ASSISTANT_MODEL": "claude-default",
    }
    a_srv: Chatd = chatd_factory(**env)
    b_srv: Chatd = chatd_factory(**env)
    call = Api(a_srv.http, await contract_for(a_srv.http))
    [admin] = make_users(services.database_url, 1, role="admin")
    alice, bob = make_users(services.database_url, 2)
    t = tag()
    claude = await define(call, admin, f"claude_{t}", "anthropic", "claude-test", system_prompt="You are Claude.")
    gpt = await define(call, admin, f"gpt_{t}", "openai", "gpt-test", system_prompt="You are GPT.")
    room = await make_room(a_srv, alice, [bob])
    await pick(call, alice, room, claude)
    await pick(call, alice, room, gpt)
    listed = await call("GET", f"{API}/rooms/{room}/assistants", token=bob.token)
    assert [(x["name"], x["mode"]) for x in listed.body["assistants"]] == [(claude["name"], "mention")] * 1 + [
        (gpt["name"], "mention")
    ]
    fake_llm.script(reply="Claude says hello.")
    fake_openai.script(reply="GPT says four.")
    a, b = await connect(a_srv, alice), await connect(b_srv, bob)
    await join(a, room)
    await join(b, room)

    # Mode mention, nobody mentioned: no answer is owed at all.
    quiet = await send(a, room, "just chatting, no assistant here")
    ask_gpt = await send(a, room, f"@{gpt['name']} what is 2+2?")
    start, text, end = (await streams(b, room, ask_gpt["message_id"], 1))[gpt["name"]]  # seen on the other instance
    assert start["reply_to_message_id"] == ask_gpt["message_id"]
    assert start["answered_by"] == {"id": gpt["id"], "name": gpt["name"], "model": "gpt-test"}
    assert start["model"] == "gpt-test" and text == "GPT says four." and end["stop_reason"] == "end_turn"
    message = await b.expect("message", room_id=room, message_id=start["message_id"])
    assert message["answered_by"]["name"] == gpt["name"] and message["content"] == "GPT says four."
    sent = fake_openai.completions()[-1]
    assert sent["model"] == "gpt-test" and sent["messages"][0] == {"role": "system", "content": "You are GPT."}
    assert sent["messages"][-1]["content"].endswith("what is 2+2?")
    assert fake_llm.requests() == []  # Claude was not asked
    assert owed(services.database_url, quiet["message_id"]) == []

    # @claude: Claude answers, with its own system prompt, and reads GPT's answer as someone else's words.
    ask_claude = await send(b, room, f"@{claude['name']}, do you agree?")
    start, text, end = (await streams(a, room, ask_claude["message_id"], 1))[claude["name"]]
    assert start["reply_to_message_id"] == ask_claude["message_id"] and text == "Claude says hello."
    assert start["answered_by"]["model"] == "claude-test"
    sent = fake_llm.requests()[-1]
    assert sent["model"] == "claude-test" and sent["system"] == "You are Claude."
    said = " ".join(m["content"] for m in sent["messages"])
    assert f"[@{gpt['name']} answered:] GPT says four." in said
    assert all(m["role"] == "user" for m in sent["messages"])  # no assistant turn of Claude's own yet

    # Both mentioned: both answer the one prompt.
    both = await send(a, room, f"@{claude['name']} and @{gpt['name']}: one word each")
    got = await streams(a, room, both["message_id"], 2)
    assert len(got) == 2
    assert sorted(x[0] for x in owed(services.database_url, both["message_id"])) == sorted([claude["id"], gpt["id"]])

    # History carries who answered; usage is per assistant, model and user.
    page = await call("GET", f"{API}/rooms/{room}/messages?limit=20", token=bob.token)
    by = [m["answered_by"]["name"] for m in page.body["messages"] if m["role"] == "assistant"]
    assert sorted(by) == sorted([gpt["name"], claude["name"], claude["name"], gpt["name"]])
    rows = usage_rows(services.database_url, alice.id)
    assert rows == sorted([(claude["id"], "claude-test", 1, 3), (gpt["id"], "gpt-test", 2, 6)])
    assert [r[:3] for r in usage_rows(services.database_url, bob.id)] == [(claude["id"], "claude-test", 1)]
    usage = await call("GET", f"{API}/admin/assistants/usage?days=1", token=admin.token)
    assert {(u["assistant"], u["user_id"]) for u in usage.body["usage"]} >= {
        (claude["name"], alice.id),
        (gpt["name"], alice.id),
        (claude["name"], bob.id),
    }


async def test_every_message_mode_and_one_failing_assistant(
    chatd_factory: Any, fake_openai: FakeOpenAI, services: Services
) -> None:
    server: Chatd = chatd_factory(
        CHATD_ASSISTANT_PROVIDER="offline",
        CHATD_ASSISTANT_OPENAI_BASE_URL=fake_openai.base_url,
        CHATD_ASSISTANT_PROVIDER_RETRIES="1",
    )
    call = Api(server.http, await contract_for(server.http))
    [admin] = make_users(services.database_url, 1, role="admin")
    (alice,) = make_users(services.database_url, 1)
    t = tag()
    echo = await define(call, admin, f"echo_{t}", "offline", "any", mode="always")
    gpt = await define(call, admin, f"gpt_{t}", "openai", "gpt-test")
    room = await make_room(server, alice, [])
    await pick(call, alice, room, echo)  # its default mode: always
    await pick(call, alice, room, gpt, mode="always")
    fake_openai.script(fail_status=500, fail_count=1000)
    a = await connect(server, alice)
    await join(a, room)

    # Every message: both answer; the failing one ends with a clear error, the other answers in full.
    hi = await send(a, room, "hello both")
    got = await streams(a, room, hi["message_id"], 2)
    start, text, end = got[echo["name"]]
    assert start["model"] == "offline" and end["stop_reason"] == "end_turn" and "hello both" in text
    start, text, end = got[gpt["name"]]
    assert end["stop_reason"] == "error" and text == ""
    assert end["error"]["code"] == "llm_unavailable" and f"@{gpt['name']}" in end["error"]["message"]
    failed = await a.expect("message", room_id=room, message_id=start["message_id"])
    assert failed["status"] == "error" and failed["error"]["code"] == "llm_unavailable"
    assert len(fake_openai.completions()) == 2  # one retry, before any token
    assert sorted(x[0] for x in owed(services.database_url, hi["message_id"])) == sorted([echo["id"], gpt["id"]])

    # A mention narrows "every message" down to the one named.
    only = await send(a, room, f"@{echo['name']} only you")
    start, _, _ = (await streams(a, room, only["message_id"], 1))[echo["name"]]
    assert start["reply_to_message_id"] == only["message_id"]
    sentinel = await send(a, room, "and now both again")
    later = await streams(a, room, sentinel["message_id"], 2)
    assert len(later) == 2
    assert [x[0] for x in owed(services.database_url, only["message_id"])] == [echo["id"]]

    # Dropped from the room: it answers no more (the room then has one assistant left).
    r = await call("DELETE", f"{API}/rooms/{room}/assistants/{gpt['id']}", token=alice.token)
    assert r.status == 204
    last = await send(a, room, "after the drop")
    ((name, (first, _, _)),) = (await streams(a, room, last["message_id"], 1)).items()
    assert name == echo["name"]
    await asyncio.sleep(0.3)
    assert [x[0] for x in owed(services.database_url, last["message_id"])] == [echo["id"]]

    # Regenerate asks the same assistant again; the old answer is superseded.
    await a.send({"type": "regenerate", "message_id": first["message_id"], "id": "r1"})
    again, _, end = (await streams(a, room, last["message_id"], 1))[echo["name"]]
    assert again["message_id"] != first["message_id"] and end["stop_reason"] == "end_turn"
    with psycopg.connect(services.database_url) as conn:
        rows = conn.execute(
            "SELECT id, assistant_id, superseded_at IS NOT NULL FROM messages WHERE reply_to_id = %s ORDER BY id",
            (last["message_id"],),
        ).fetchall()
    assert rows == [(first["message_id"], echo["id"], True), (again["message_id"], echo["id"], False)]


async def test_owners_pick_only_defined_assistants_and_admins_define_them(
    chatd_factory: Any, services: Services
) -> None:
    server: Chatd = chatd_factory(CHATD_ASSISTANT_PROVIDER="offline")
    call = Api(server.http, await contract_for(server.http))
    [admin] = make_users(services.database_url, 1, role="admin")
    alice, bob = make_users(services.database_url, 2)
    t = tag()
    room = await make_room(server, alice, [bob])

    # Only admins define assistants; every call is audited.
    body = {"name": f"helper_{t}", "provider": "offline", "model": "m"}
    assert (await call("POST", f"{API}/admin/assistants", body, token=alice.token)).status == 403
    helper = await define(call, admin, f"helper_{t}", "offline", "m", system_prompt="Be brief.")
    assert helper["mode"] == "mention" and helper["status"] == "active"
    r = await call("POST", f"{API}/admin/assistants", body, token=admin.token)
    assert r.status == 409 and r.body["error"]["code"] == "conflict"
    bad = await call("POST", f"{API}/admin/assistants", body | {"name": "Has Space"}, token=admin.token)
    assert bad.status == 400 and bad.body["error"]["message"].startswith("name: ")
    no_key = await call(
        "POST", f"{API}/admin/assistants", body | {"name": f"c_{t}", "provider": "anthropic"}, token=admin.token
    )
    assert no_key.status == 409 and "anthropic" in no_key.body["error"]["message"]

    # Users see what is offered, without system prompts.
    offered = await call("GET", f"{API}/assistants", token=bob.token)
    mine = [x for x in offered.body["assistants"] if x["id"] == helper["id"]]
    assert mine and "system_prompt" not in mine[0]

    # A member who is not the owner cannot pick; the owner cannot pick what the server does not offer.
    r = await call("PUT", f"{API}/rooms/{room}/assistants/{helper['id']}", token=bob.token)
    assert r.status == 403 and r.body["error"]["code"] == "forbidden"
    r = await call("PUT", f"{API}/rooms/{room}/assistants/999999999", token=alice.token)
    assert r.status == 404 and r.body["error"]["code"] == "unknown_assistant"
    r = await call("PUT", f"{API}/rooms/{room}/assistants/{helper['id']}", token=alice.token)
    assert r.status == 201 and r.body["assistants"][0]["mode"] == "mention"
    r = await call("PUT", f"{API}/rooms/{room}/assistants/{helper['id']}", {"mode": "always"}, token=alice.token)
    assert r.status == 200 and r.body["assistants"][0]["mode"] == "always"
    r = await call("DELETE", f"{API}/rooms/{room}/assistants/{helper['id']}", token=bob.token)
    assert r.status == 403

    # Retired: gone from the offer and from rooms, and cannot be picked again.
    r = await call("PATCH", f"{API}/admin/assistants/{helper['id']}", {"status": "retired"}, token=admin.token)
    assert r.status == 200 and r.body["status"] == "retired"
    assert (await call("GET", f"{API}/rooms/{room}/assistants", token=alice.token)).body["assistants"] == []
    r = await call("PUT", f"{API}/rooms/{room}/assistants/{helper['id']}", token=alice.token)
    assert r.status == 404 and r.body["error"]["code"] == "unknown_assistant"

    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with psycopg.connect(services.database_url) as conn:
            actions = [
                row[0]
                for row in conn.execute(
                    "SELECT action FROM audit_log WHERE actor_id = %s ORDER BY id", (admin.id,)
                ).fetchall()
            ]
        if len(actions) >= 5:
            break
        await asyncio.sleep(0.1)
    assert actions.count("POST /api/v1/admin/assistants") == 4
    assert f"PATCH /api/v1/admin/assistants/{helper['id']}" in actions


async def test_sse_follows_one_answer_and_a_late_joiner_sees_who_is_answering(
    chatd_factory: Any, services: Services
) -> None:
    server: Chatd = chatd_factory(CHATD_ASSISTANT_PROVIDER="offline", CHATD_ASSISTANT_OFFLINE_TOKENS_PER_S="10")
    call = Api(server.http, await contract_for(server.http))
    [admin] = make_users(services.database_url, 1, role="admin")
    alice, bob = make_users(services.database_url, 2)
    t = tag()
    one = await define(call, admin, f"one_{t}", "offline", "m", mode="always")
    two = await define(call, admin, f"two_{t}", "offline", "m", mode="always")
    room = await make_room(server, alice, [bob])
    await pick(call, alice, room, one)
    await pick(call, alice, room, two)
    sse = asyncio.ensure_future(
        request(
            "POST",
            f"{server.http}{API}/rooms/{room}/messages/stream",
            {"content": "two answers", "client_msg_id": "sse-1"},
            alice.token,
        )
    )
    # Bob joins while both answers stream: the catch-up names each one's assistant.
    b = await connect(server, bob)
    await asyncio.sleep(1.0)
    await join(b, room)
    starts = [await b.expect("stream_start", 15, room_id=room) for _ in range(2)]
    assert sorted(s["answered_by"]["name"] for s in starts) == sorted([one["name"], two["name"]])
    r = await sse
    assert r.status == 200
    events = [
        (block.split("\n")[0][len("event: ") :], json.loads(block.split("\n")[1][len("data: ") :]))
        for block in r.body.decode().strip().split("\n\n")
    ]
    followed = [d for e, d in events if e == "stream_start"]
    assert len(followed) == 1 and followed[0]["answered_by"]["name"] in (one["name"], two["name"])
    ids = {d["message_id"] for e, d in events if e in ("stream_chunk", "stream_end")}
    assert ids == {followed[0]["message_id"]} and events[-1][0] == "stream_end"


@pytest.mark.parametrize(
    ("content", "mentioned"),
    [
        ("@gpt hi", True),
        ("hi @GPT", True),
        ("@gpt, and you?", True),
        ("ask @gpt.", True),
        ("(@gpt)", True),
        ("mail x@gpt.io", False),
        ("a@gpt", False),
        ("@gpt_2 hi", False),
        ("@gpt2", False),
        ("@gp", False),
        ("gpt", False),
    ],
)
def test_a_mention_is_the_name_as_a_word(services: Services, content: str, mentioned: bool) -> None:
    with psycopg.connect(services.database_url) as conn:
        row = conn.execute("SELECT chatd_mentions(%s, 'gpt')", (content,)).fetchone()
    assert row is not None and row[0] is mentioned


async def test_cancel_while_queued_cancels_every_assistants_answer(chatd_factory: Any, services: Services) -> None:
    server: Chatd = chatd_factory(
        CHATD_ASSISTANT_PROVIDER="offline",
        CHATD_ASSISTANT_OFFLINE_TOKENS_PER_S="10",
        CHATD_ASSISTANT_PER_USER_CONCURRENCY="1",
    )
    call = Api(server.http, await contract_for(server.http))
    [admin] = make_users(services.database_url, 1, role="admin")
    (alice,) = make_users(services.database_url, 1)
    t = tag()
    one = await define(call, admin, f"one_{t}", "offline", "m", mode="always")
    two = await define(call, admin, f"two_{t}", "offline", "m", mode="always")
    room = await make_room(server, alice, [])
    await pick(call, alice, room, one)
    await pick(call, alice, room, two)
    a = await connect(server, alice)
    await join(a, room)
    first = await send(a, room, "first")
    second = await send(a, room, "second")  # both its answers wait behind the first prompt's (one at a time)
    await a.expect("queued", room_id=room, reply_to_message_id=second["message_id"])
    await a.send({"type": "cancel", "message_id": second["message_id"], "id": "c"})
    gone = await a.expect("cancelled", room_id=room)
    assert gone["reply_to_message_id"] == second["message_id"]
    assert len(await streams(a, room, first["message_id"], 2)) == 2
    with pytest.raises(asyncio.TimeoutError):
        await a.expect("stream_start", room_id=room, timeout_s=2)
    assert owed(services.database_url, second["message_id"]) == []
