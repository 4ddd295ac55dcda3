"""Issue 11: roster, user directory, room events on every device, account basics, OpenAPI, CORS."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import psycopg
import pytest

from chatd.api import openapi
from chatd.api import routes as api
from chatd.api.web import BaseHandler
from tests.chat import API, connect, join, make_room, send
from tests.openapi_check import Api, contract_for
from tests.support import WS, Response, request, wait_user_channel
from tests.users import PASSWORD, make_users

ORIGIN = "https://app.example.com"


async def test_room_events_reach_every_device_on_two_instances(chatd_factory: Any, services: Any) -> None:
    a_srv = chatd_factory(CHATD_SERVER_ALLOWED_ORIGINS=ORIGIN)
    b_srv = chatd_factory(CHATD_SERVER_ALLOWED_ORIGINS=ORIGIN)
    call = Api(a_srv.http, await contract_for(a_srv.http))
    owner, bob = make_users(services.database_url, 2)
    room = await make_room(a_srv, owner, [])
    ws_owner = await connect(a_srv, owner)
    await join(ws_owner, room)
    bob_a, bob_b = await connect(a_srv, bob), await connect(b_srv, bob)  # two devices, two instances
    await wait_user_channel(a_srv, bob.id, subscribers=2)  # hello came after the SUBSCRIBE: both listen

    r = await call("POST", f"{API}/rooms/{room}/members", {"user_id": bob.id}, owner.token)
    assert r.status == 201 and r.body["added"] is True
    for ws in (bob_a, bob_b):
        added = await ws.expect("room_added")
        assert added["room"]["id"] == room and added["room"]["read_seq"] == added["room"]["last_seq"] == 1
    joined_msg = await ws_owner.expect("message", room_id=room, kind="system")
    assert joined_msg["role"] == "system" and joined_msg.get("sender_id") is None and joined_msg["seq"] >= 1
    assert joined_msg["data"] == {
        "event": "member_joined",
        "user_id": bob.id,
        "name": joined_msg["data"]["name"],
        "by": owner.id,
    }
    # the system message is durable: history has it, with its seq
    page = await call("GET", f"{API}/rooms/{room}/messages", token=bob.token)
    assert [m["kind"] for m in page.body["messages"]] == ["system"]

    # roster: names, roles, presence, read positions; paged by user id
    await join(bob_b, room)
    await send(bob_b, room, "hi")
    roster = await call("GET", f"{API}/rooms/{room}/members?limit=1", token=bob.token)
    assert [m["id"] for m in roster.body["members"]] == [owner.id] and roster.body["next_cursor"] == owner.id
    deadline = time.monotonic() + 10  # presence is applied per tick (100 ms): polled, not slept on
    while True:
        rest = await call("GET", f"{API}/rooms/{room}/members?cursor={owner.id}", token=bob.token)
        if rest.body["members"][0]["online"] or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.1)
    assert [m["id"] for m in rest.body["members"]] == [bob.id] and rest.body["next_cursor"] is None
    assert rest.body["members"][0]["online"] is True and rest.body["members"][0]["role"] == "member"
    assert roster.body["members"][0]["role"] == "owner"
    outsider = make_users(services.database_url, 1)[0]
    assert (await call("GET", f"{API}/rooms/{room}/members", token=outsider.token)).status == 404

    # rename: room_updated to every member's devices
    r = await call("PATCH", f"{API}/rooms/{room}", {"name": "renamed"}, owner.token)
    assert r.status == 200
    for ws in (bob_a, bob_b, ws_owner):
        updated = await ws.expect("room_updated")
        assert updated["room"]["name"] == "renamed"

    # removal: room_removed to both devices, member_left in the room, the joined socket leaves
    r = await call("DELETE", f"{API}/rooms/{room}/members/{bob.id}", token=owner.token)
    assert r.status == 204
    for ws in (bob_a, bob_b):
        removed = await ws.expect("room_removed")
        assert removed == {"type": "room_removed", "room_id": room, "reason": "removed"}
    left = await ws_owner.expect(
        "message", room_id=room, kind="system", where=lambda f: f["data"]["event"] == "member_left"
    )
    assert left["data"]["user_id"] == bob.id and left["seq"] == joined_msg["seq"] + 2
    await bob_b.expect("left", room_id=room)
    await ws_owner.expect_presence(bob.id, "offline", timeout_s=15)

    # creating a room with members: room_added to each member's devices
    r = await call("POST", f"{API}/rooms", {"name": "new", "members": [bob.id]}, owner.token)
    assert r.status == 201
    for ws in (bob_a, bob_b):
        assert (await ws.expect("room_added"))["room"]["id"] == r.body["id"]


async def test_user_directory(chatd_factory: Any, services: Any) -> None:
    server = chatd_factory(CHATD_AUTH_USER_LOOKUPS_PER_MIN="5")
    call = Api(server.http, await contract_for(server.http))
    me, other = make_users(services.database_url, 2)
    with psycopg.connect(services.database_url) as conn:
        conn.execute("UPDATE users SET name = %s WHERE id = %s", (f"Zelda{other.id}", other.id))
    by_email = await call("GET", f"{API}/users?q={other.email.upper()}", token=me.token)
    assert by_email.body == {"users": [{"id": other.id, "name": f"Zelda{other.id}"}]}
    by_prefix = await call("GET", f"{API}/users?q=zelda{other.id}", token=me.token)
    assert by_prefix.body["users"] == [{"id": other.id, "name": f"Zelda{other.id}"}]
    assert (await call("GET", f"{API}/users?q=nobody-{other.id}@example.com", token=me.token)).body == {"users": []}
    assert (await call("GET", f"{API}/users?q=z", token=me.token)).status == 400
    assert (await call("GET", f"{API}/users?q=zz", token=None)).status == 401
    statuses = [(await call("GET", f"{API}/users?q=zelda", token=me.token)).status for _ in range(3)]
    assert statuses[-1] == 429  # 5 per minute: 4 above + these


@pytest.mark.smoke
async def test_account_basics(chatd_factory: Any, services: Any) -> None:
    server = chatd_factory()
    call = Api(server.http, await contract_for(server.http))
    [user] = make_users(services.database_url, 1)

    async def login() -> Response:
        return await call("POST", f"{API}/auth/login", {"email": user.email, "password": PASSWORD})

    first, second = (await login()).body, (await login()).body
    r = await call("PATCH", f"{API}/me", {"name": "  Ada  "}, first["access_token"])
    assert r.status == 200 and r.body["name"] == "Ada"
    assert (await call("PATCH", f"{API}/me", {"email": "x@y.z"}, first["access_token"])).status == 400
    other_socket = await WS.connect(server.ws, second["access_token"])
    await other_socket.expect("hello")
    await wait_user_channel(server, user.id)  # the forced close travels on it (listened to since hello)

    wrong = {"old_password": "not-it-at-all", "new_password": "brand-new-pass"}
    assert (await call("POST", f"{API}/me/password", wrong, first["access_token"])).status == 403
    ok = {"old_password": PASSWORD, "new_password": "brand-new-pass"}
    assert (await call("POST", f"{API}/me/password", ok, first["access_token"])).status == 204
    code, _ = await other_socket.closed()
    assert code == 4001
    assert (await call("GET", f"{API}/me", token=second["access_token"])).status == 401  # other session revoked
    assert (await call("GET", f"{API}/me", token=first["access_token"])).status == 200  # this one stays
    r = await call("POST", f"{API}/auth/refresh", {"refresh_token": second["refresh_token"]})
    assert r.status == 401
    assert (await call("POST", f"{API}/auth/login", {"email": user.email, "password": PASSWORD})).status == 401
    relog = await call("POST", f"{API}/auth/login", {"email": user.email, "password": "brand-new-pass"})
    assert relog.status == 200

    # deactivate: sockets closed, sign-in refused, messages stay (sender shown with status deleted)
    owner = make_users(services.database_url, 1)[0]
    room = await make_room(server, owner, [user])
    sock = await WS.connect(server.ws, relog.body["access_token"])
    await sock.expect("hello")
    await wait_user_channel(server, user.id)
    await send(sock, room, "my last words")
    assert (await call("DELETE", f"{API}/me", token=relog.body["access_token"])).status == 204
    code, _ = await sock.closed()
    assert code == 4001
    assert (await call("POST", f"{API}/auth/login", {"email": user.email, "password": "brand-new-pass"})).status == 401
    history = await call("GET", f"{API}/rooms/{room}/messages", token=owner.token)
    assert [m["content"] for m in history.body["messages"]] == ["my last words"]
    roster = await call("GET", f"{API}/rooms/{room}/members", token=owner.token)
    assert {m["id"]: m["status"] for m in roster.body["members"]}[user.id] == "deleted"


@pytest.mark.smoke
async def test_openapi_covers_every_route(chatd: Any) -> None:
    r = await request("GET", chatd.http + f"{API}/openapi.json")
    assert r.status == 200 and r.body["openapi"].startswith("3.1")
    spec = r.body
    # Every route the application registers (but the socket and the web app's files) is described,
    # with every method its handler implements.
    deps: dict[str, Any] = {}
    registered = [
        ("/health/live", BaseHandler, None),
        *api.routes(None, None, None, None, None, None, None, None, deps),  # type: ignore[arg-type]
    ]
    from chatd.api.web import LiveHandler, MetricsHandler, ReadyHandler

    registered = [
        ("/health/live", LiveHandler, {}),
        ("/health/ready", ReadyHandler, {}),
        ("/metrics", MetricsHandler, {}),
        *registered[1:],
    ]
    ops = openapi.operations(registered)
    assert len(ops) >= 35
    for path, method, handler, decl in ops:
        assert decl is not None, f"{handler.__name__}.{method} undeclared"
        assert method in spec["paths"].get(path, {}), f"{method.upper()} {path} missing from openapi.json"
    assert sum(len(v) for v in spec["paths"].values()) == len(ops)
    from jsonschema import Draft202012Validator

    for name, schema in spec["components"]["schemas"].items():
        Draft202012Validator.check_schema(schema), name


async def test_cors_and_security_headers(chatd_factory: Any, services: Any) -> None:
    server = chatd_factory(CHATD_SERVER_ALLOWED_ORIGINS=ORIGIN)
    [user] = make_users(services.database_url, 1)
    pre = {
        "Origin": ORIGIN,
        "Access-Control-Request-Method": "PATCH",
        "Access-Control-Request-Headers": "authorization, content-type",
    }
    r = await request("OPTIONS", server.http + f"{API}/me", headers=pre)
    assert r.status == 204
    assert r.headers["Access-Control-Allow-Origin"] == ORIGIN
    assert "PATCH" in r.headers["Access-Control-Allow-Methods"].split(", ")
    assert "Authorization" in r.headers["Access-Control-Allow-Headers"]
    assert "Access-Control-Allow-Credentials" not in r.headers
    foreign = await request("OPTIONS", server.http + f"{API}/me", headers=pre | {"Origin": "https://evil.example"})
    assert foreign.status == 403 and "Access-Control-Allow-Origin" not in foreign.headers
    # the actual request: allowed origin echoed, foreign origin gets no CORS header
    got = await request("GET", server.http + f"{API}/me", token=user.token, headers={"Origin": ORIGIN})
    assert got.status == 200 and got.headers["Access-Control-Allow-Origin"] == ORIGIN
    assert "Origin" in got.headers.get("Vary", "")
    bad = await request("GET", server.http + f"{API}/me", token=user.token, headers={"Origin": "https://evil.example"})
    assert "Access-Control-Allow-Origin" not in bad.headers
    # security headers on every response: success, error, unknown route, health
    for resp in (
        got,
        await request("GET", server.http + f"{API}/nope"),
        await request("GET", server.http + f"{API}/me"),
        await request("GET", server.http + "/health/live"),
    ):
        assert resp.headers["X-Content-Type-Options"] == "nosniff"
        assert resp.headers["X-Frame-Options"] == "DENY"
        assert "frame-ancestors 'none'" in resp.headers["Content-Security-Policy"]
        assert resp.headers["Referrer-Policy"] == "no-referrer"
        assert "Strict-Transport-Security" not in resp.headers  # plain HTTP
    # HSTS when the request came over TLS (behind a proxy that says so)
    tls = chatd_factory(CHATD_SERVER_HSTS_MAX_AGE_S="31536000", CHATD_SERVER_TRUSTED_PROXIES="127.0.0.1")
    r = await request("GET", tls.http + "/health/live", headers={"X-Forwarded-Proto": "https"})
    assert r.headers["Strict-Transport-Security"] == "max-age=31536000"
    r = await request("GET", tls.http + "/health/live")
    assert "Strict-Transport-Security" not in r.headers
