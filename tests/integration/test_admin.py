"""Issue 11: admin API (role admin, every call audited), announcements and broadcasts, own usage."""

from __future__ import annotations

import asyncio
import datetime as dt
import time
from typing import Any

import psycopg

from tests.chat import API, connect, join, make_room, send
from tests.openapi_check import Api, contract_for
from tests.users import make_users


def audit_rows(url: str, actor: int) -> list[tuple[Any, ...]]:
    with psycopg.connect(url) as conn:
        return conn.execute(
            "SELECT action, target, status, ip, details FROM audit_log WHERE actor_id = %s ORDER BY id", (actor,)
        ).fetchall()


async def wait_audit(url: str, actor: int, count: int) -> list[tuple[Any, ...]]:
    deadline = time.monotonic() + 10
    while len(rows := audit_rows(url, actor)) < count and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    return rows


async def test_admin_routes(chatd_factory: Any, services: Any) -> None:
    server = chatd_factory()
    call = Api(server.http, await contract_for(server.http))
    [admin] = make_users(services.database_url, 1, role="admin")
    user, other = make_users(services.database_url, 2)
    url = services.database_url

    # non-admins are refused on every admin route, and the attempt is audited
    for method, path in (
        ("GET", "/admin/stats"),
        ("GET", "/admin/users"),
        ("POST", f"/admin/users/{other.id}/unban"),
        ("GET", "/admin/audit"),
        ("POST", "/admin/broadcast"),
    ):
        r = await call(
            method, API + path, {"target": "users", "content": "x"} if method == "POST" else None, user.token
        )
        assert r.status == 403, (path, r.body)
    rows = await wait_audit(url, user.id, 5)
    # Each audit row is written by a task spawned once its response is sent: their ids need not follow
    # the calls' order, so the rows are compared as a multiset (each attempt once, with its 403).
    assert sorted((a, s) for a, _, s, _, _ in rows) == sorted(
        [
            ("GET /api/v1/admin/stats", 403),
            ("GET /api/v1/admin/users", 403),
            (f"POST /api/v1/admin/users/{other.id}/unban", 403),
            ("GET /api/v1/admin/audit", 403),
            ("POST /api/v1/admin/broadcast", 403),
        ]
    )
    assert {row[3] for row in rows} == {"127.0.0.1"}
    assert (await call("GET", f"{API}/admin/stats")).status == 401

    room = await make_room(server, user, [other])
    ws_user, ws_other = await connect(server, user), await connect(server, other)
    await join(ws_user, room)
    await join(ws_other, room)
    sent = await send(ws_user, room, "to be deleted")
    await ws_user.send({"type": "delete", "id": "d", "message_id": sent["message_id"]})
    await ws_other.expect("message_deleted", message_id=sent["message_id"])

    since = (dt.datetime.now(dt.UTC) - dt.timedelta(days=2)).date().isoformat()
    stats = await call("GET", f"{API}/admin/stats?from={since}", token=admin.token)
    assert stats.status == 200
    assert stats.body["users"]["total"] >= 3 and stats.body["rooms"]["total"] >= 1
    assert sum(d["messages"] for d in stats.body["messages_per_day"]) >= 1
    assert stats.body["active_users"] >= 1
    assert stats.body["live_connections"]["per_worker"], stats.body["live_connections"]
    assert set(stats.body["assistant"]) >= {"answers", "first_token_ms_p50", "first_token_ms_p95", "tokens_by_model"}
    assert (await call("GET", f"{API}/admin/stats?from=yesterday", token=admin.token)).status == 400

    found = await call("GET", f"{API}/admin/users?q={user.email}", token=admin.token)
    assert [u["id"] for u in found.body["users"]] == [user.id]

    # ban, then unban; role change takes effect on the next request
    assert (await call("POST", f"{API}/admin/users/{other.id}/ban", token=admin.token)).status == 200
    await ws_other.closed()
    banned = await call("GET", f"{API}/admin/users?status=banned&q={other.email}", token=admin.token)
    assert [u["id"] for u in banned.body["users"]] == [other.id]
    r = await call("POST", f"{API}/admin/users/{other.id}/unban", token=admin.token)
    assert r.status == 200 and r.body["status"] == "active"
    assert (await call("POST", f"{API}/admin/users/{user.id}/role", {"role": "root"}, admin.token)).status == 400
    r = await call("POST", f"{API}/admin/users/{user.id}/role", {"role": "admin"}, admin.token)
    assert r.status == 200 and r.body["role"] == "admin"
    assert (await call("GET", f"{API}/admin/audit", token=user.token)).status == 200  # now an admin

    # room log, deleted messages included with who deleted them
    log = await call("GET", f"{API}/admin/rooms/{room}/messages", token=admin.token)
    deleted = [m for m in log.body["messages"] if m["message"]["message_id"] == sent["message_id"]]
    assert deleted and deleted[0]["deleted_by"] == user.id and deleted[0]["deleted_at"] is not None

    # announcement: a durable system message in the room
    r = await call("POST", f"{API}/admin/rooms/{room}/messages", {"content": "maintenance at 22:00"}, admin.token)
    assert r.status == 201 and r.body["kind"] == "system" and r.body["role"] == "system"
    live = await ws_user.expect("message", room_id=room, kind="system")
    assert live["content"] == "maintenance at 22:00" and live["data"] == {"event": "announcement", "by": admin.id}
    # broadcast to every connected user, and to every room
    r = await call("POST", f"{API}/admin/broadcast", {"target": "users", "content": "hello all"}, admin.token)
    assert r.status == 200 and r.body["count"] >= 3
    ann = await ws_user.expect("announcement")
    assert ann["content"] == "hello all" and ann["by"] == admin.id
    r = await call("POST", f"{API}/admin/broadcast", {"target": "rooms", "content": "to every room"}, admin.token)
    assert r.status == 200 and r.body["count"] >= 1
    await ws_user.expect("message", room_id=room, kind="system", where=lambda f: f["content"] == "to every room")
    assert (await call("POST", f"{API}/admin/broadcast", {"target": "moon", "content": "x"}, admin.token)).status == 400

    # the admin's own calls, with targets, are in the log (and readable through the API)
    rows = await wait_audit(url, admin.id, 13)
    targets = {(a, t, s) for a, t, s, _, _ in rows}
    assert (f"POST /api/v1/admin/users/{other.id}/unban", f"user:{other.id}", 200) in targets
    assert (f"POST /api/v1/admin/users/{user.id}/role", f"user:{user.id}", 200) in targets
    assert (f"POST /api/v1/admin/rooms/{room}/messages", f"room:{room}", 201) in targets
    page = await call("GET", f"{API}/admin/audit?limit=200", token=admin.token)
    assert any(e["action"] == "GET /api/v1/admin/stats" and e["actor_id"] == admin.id for e in page.body["entries"])


async def test_own_usage(chatd_factory: Any, services: Any) -> None:
    server = chatd_factory(CHATD_ASSISTANT_DAILY_TOKEN_BUDGET="100000")
    call = Api(server.http, await contract_for(server.http))
    [user] = make_users(services.database_url, 1)
    room = await make_room(server, user, [], kind="assistant")
    ws = await connect(server, user)
    await join(ws, room)
    await send(ws, room, "hello assistant")
    await ws.expect("stream_end", timeout_s=30)
    usage = await call("GET", f"{API}/me/usage", token=user.token)
    assert usage.status == 200
    assert usage.body["daily_token_budget"] == 100000 and usage.body["tokens_today"] > 0
    assert usage.body["remaining_today"] == 100000 - usage.body["tokens_today"]
    assert usage.body["days"][0]["answers"] == 1


async def test_load_test_users_need_dev_mode_or_an_admin(chatd_factory: Any, services: Any) -> None:
    """POST /admin/load-test-users: users with access tokens in bulk, no registration limit; outside dev mode
    only for an admin (audited), in dev mode (``make run``) for anyone who can reach the server."""
    path = f"{API}/admin/load-test-users"
    server = chatd_factory()  # not dev mode
    call = Api(server.http, await contract_for(server.http))
    [admin] = make_users(services.database_url, 1, role="admin")
    [user] = make_users(services.database_url, 1)
    assert (await call("POST", path, {"count": 3})).status == 401
    assert (await call("POST", path, {"count": 3}, user.token)).status == 403
    made = await call("POST", path, {"count": 3}, admin.token)
    assert made.status == 201, made.body
    assert made.body["expires_in"] == 900 and len(made.body["users"]) == 3
    assert len({u["user"]["email"] for u in made.body["users"]}) == 3
    for u in made.body["users"]:
        me = await call("GET", f"{API}/me", token=u["access_token"])
        assert me.status == 200 and me.body["id"] == u["user"]["id"] and me.body["role"] == "user"
    rows = await wait_audit(services.database_url, admin.id, 1)
    assert [(a, s, d) for a, _, s, _, d in rows] == [("POST /api/v1/admin/load-test-users", 201, {"count": 3})]
    for bad in ({"count": 0}, {"count": 1001}, {"count": 1, "access_ttl_s": 10}):
        assert (await call("POST", path, bad, admin.token)).status == 400, bad

    dev = chatd_factory(CHATD_SERVER_DEV_MODE="true")
    call = Api(dev.http, await contract_for(dev.http))
    made = await call("POST", path, {"count": 2, "password": "load-test-password", "access_ttl_s": 7200})
    assert made.status == 201 and made.body["expires_in"] == 7200 and len(made.body["users"]) == 2
    email = made.body["users"][1]["user"]["email"]
    login = await call("POST", f"{API}/auth/login", {"email": email, "password": "load-test-password"})
    assert login.status == 200 and login.body["user"]["id"] == made.body["users"][1]["user"]["id"]
