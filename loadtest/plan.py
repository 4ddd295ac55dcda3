"""The load-test plan: users, their credentials and their rooms, decided once and written to JSON.

Deterministic room assignment: user ``i`` (0-based) is in group room ``i // room_size``
(consecutive indexes share a room; the first of each room owns it).  Every
``round(1 / assistant_share)``-th user also owns a private assistant room
(kind ``assistant``, mode ``always``: every message gets a streamed answer).

Locust users read the plan and pick their index (``locustfile.py``), so any
``-u`` up to the plan size works, across any number of workers.

Three ways to create it:

* ``bulk`` (a dev-mode chatd such as ``make run``, or any chatd with an admin's token): the users from
  ``POST /api/v1/admin/load-test-users`` (up to 1,000 a call, with access tokens, one Argon2 hash a call,
  no registration limit), then the owners create the rooms with their members (``POST /api/v1/rooms``).
  1,000 users and their 200 rooms take a second or two.
* ``sql`` (needs the database and the JWT secret): rows inserted in
  Postgres, access tokens minted with ``chatd.services.tokens.TokenService``.  20,000 users
  take seconds; registering them over REST would cost 20,000 Argon2 hashes.
* ``rest`` (any reachable chatd, no database access): ``POST /auth/register``
  per user, then the rooms as with ``bulk``.  The server
  must allow it: ``CHATD_AUTH_AUTH_ATTEMPTS_PER_MIN`` well above the user count
  (the limit is per client IP).

    python loadtest/plan.py --users 1000 --via bulk --host http://127.0.0.1:8080       # make run (dev mode)
    python loadtest/plan.py --users 1000 --via sql --database-url "$DATABASE_URL" --out loadtest/results/plan.json
    python loadtest/plan.py --users 200 --via rest --host http://127.0.0.1:8080 --out plan.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import urllib.error
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parent.parent))


def layout(n_users: int, room_size: int, assistant_share: float) -> tuple[list[list[int]], list[int]]:
    """(group rooms as lists of user indexes, indexes of users that get an assistant room)."""
    groups = [list(range(i, min(i + room_size, n_users))) for i in range(0, n_users, room_size)]
    every = round(1 / assistant_share) if assistant_share > 0 else 0
    assistant_users = [i for i in range(n_users) if every and i % every == 0]
    return groups, assistant_users


def _plan(users: list[dict[str, Any]], groups: list[list[int]], group_ids: list[int], assistant_users: list[int],
          assistant_ids: list[int], room_size: int, share: float, host: str, via: str) -> dict[str, Any]:
    rooms = [{"id": rid, "kind": "group", "members": g} for rid, g in zip(group_ids, groups, strict=True)]
    rooms += [{"id": rid, "kind": "assistant", "members": [i]} for rid, i in zip(assistant_ids, assistant_users,
                                                                                   strict=True)]
    return {
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "via": via,
        "host": host,
        "room_size": room_size,
        "assistant_share": share,
        "users": users,
        "rooms": rooms,
    }


def create_sql(n: int, room_size: int, share: float, database_url: str, jwt_secret: str, host: str = "",
               ttl_s: int = 4 * 3600) -> dict[str, Any]:
    import fixtures

    made = fixtures.make_users(database_url, n, secret=jwt_secret, ttl_s=ttl_s)
    users = [{"i": i, "id": u.id, "email": u.email, "password": fixtures.PASSWORD, "token": u.token}
             for i, u in enumerate(made)]
    groups, assistant_users = layout(n, room_size, share)
    group_ids = fixtures.make_rooms(database_url, [[made[i].id for i in g] for g in groups], "group", "lt-group")
    assistant_ids = fixtures.make_rooms(database_url, [[made[i].id] for i in assistant_users], "assistant",
                                        "lt-assistant")
    return _plan(users, groups, group_ids, assistant_users, assistant_ids, room_size, share, host, "sql")


PASSWORD = "loadtest-password-1"
BULK_PATH = "/api/v1/admin/load-test-users"
BULK_MAX = 1000  # users per call (the endpoint's bound)


class BulkRefused(Exception):
    """The server does not make load-test users for this caller: not in dev mode and no admin token (401/403),
    or a chatd without the endpoint (404)."""


def _post(url: str, body: dict[str, Any], token: str | None = None, timeout_s: float = 60) -> tuple[int, Any]:
    data = json.dumps(body).encode()
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    req = urllib.request.Request(url, data=data, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as resp:
            return resp.status, json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as exc:
        try:
            return exc.code, json.loads(exc.read() or b"null")
        except ValueError:
            return exc.code, None


def create_rest(n: int, room_size: int, share: float, host: str, concurrency: int = 16) -> dict[str, Any]:
    """Register ``n`` users and create their rooms through the public API only."""
    host = host.rstrip("/")
    tag = uuid.uuid4().hex[:8]
    password = PASSWORD

    def register(i: int) -> dict[str, Any]:
        email = f"lt{i}-{tag}@example.com"
        for attempt in range(5):
            status, body = _post(f"{host}/api/v1/auth/register", {"email": email, "password": password,
                                                                  "name": f"lt{i}"})
            if status == 201:
                return {"i": i, "id": body["user"]["id"], "email": email, "password": password,
                        "token": body["access_token"]}
            if status in (429, 503) and attempt < 4:
                time.sleep(min(5.0, (body or {}).get("error", {}).get("retry_after_ms", 1000) / 1000))
                continue
            raise RuntimeError(f"register {email}: HTTP {status} {body}")
        raise RuntimeError("unreachable")

    with ThreadPoolExecutor(concurrency) as pool:
        users = list(pool.map(register, range(n)))
    return _with_rooms(users, room_size, share, host, "rest", concurrency)


def create_bulk(n: int, room_size: int, share: float, host: str, admin_token: str = "", ttl_s: int = 4 * 3600,
                concurrency: int = 16) -> dict[str, Any]:
    """``n`` users from ``POST /api/v1/admin/load-test-users`` (dev mode, or ``admin_token``), then their rooms
    through the API; ``BulkRefused`` when the server does not allow it."""
    host = host.rstrip("/")
    users: list[dict[str, Any]] = []
    while len(users) < n:
        count = min(BULK_MAX, n - len(users))
        status, body = _post(host + BULK_PATH, {"count": count, "password": PASSWORD, "access_ttl_s": ttl_s},
                             admin_token or None)
        if status in (401, 403, 404):
            reason = (body or {}).get("error", {}).get("message", "") if isinstance(body, dict) else ""
            raise BulkRefused(f"POST {BULK_PATH}: HTTP {status} {reason}".rstrip())
        if status != 201:
            raise RuntimeError(f"POST {BULK_PATH}: HTTP {status} {body}")
        users += [{"i": len(users) + k, "id": u["user"]["id"], "email": u["user"]["email"], "password": PASSWORD,
                   "token": u["access_token"]} for k, u in enumerate(body["users"])]
    return _with_rooms(users, room_size, share, host, "bulk", concurrency)


def _with_rooms(users: list[dict[str, Any]], room_size: int, share: float, host: str, via: str,
                concurrency: int) -> dict[str, Any]:
    """The plan of ``users``: their rooms created by their owners through the API."""
    n = len(users)
    groups, assistant_users = layout(n, room_size, share)

    def room(spec: tuple[list[int], str]) -> int:
        members, kind = spec
        owner = users[members[0]]
        body = {"name": f"lt-{kind}-{members[0]}", "kind": kind, "members": [users[i]["id"] for i in members[1:]]}
        status, resp = _post(f"{host}/api/v1/rooms", body, owner["token"])
        if status != 201:
            raise RuntimeError(f"create room: HTTP {status} {resp}")
        return int(resp["id"])

    with ThreadPoolExecutor(concurrency) as pool:
        group_ids = list(pool.map(room, [(g, "group") for g in groups]))
        assistant_ids = list(pool.map(room, [([i], "assistant") for i in assistant_users]))
    return _plan(users, groups, group_ids, assistant_users, assistant_ids, room_size, share, host, via)


def main() -> int:
    p = argparse.ArgumentParser(description="Create the users and rooms of a load test and write the plan JSON")
    p.add_argument("--users", type=int, required=True)
    p.add_argument("--room-size", type=int, default=10)
    p.add_argument("--assistant-share", type=float, default=0.1, help="share of users with an assistant room")
    p.add_argument("--via", choices=("bulk", "sql", "rest"), default="sql")
    p.add_argument("--admin-token", default=os.environ.get("CHATD_ADMIN_TOKEN", ""),
                   help="for --via bulk on a server not in dev mode (or CHATD_ADMIN_TOKEN)")
    p.add_argument("--database-url", default=os.environ.get("DATABASE_URL", ""))
    p.add_argument("--jwt-secret", default=os.environ.get("JWT_SECRET", ""))
    p.add_argument("--token-ttl-s", type=int, default=4 * 3600)
    p.add_argument("--host", default="http://127.0.0.1:8080")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "plan.json"))
    a = p.parse_args()
    t0 = time.perf_counter()
    if a.via == "sql":
        if not a.database_url or not a.jwt_secret:
            p.error("--via sql needs --database-url (or DATABASE_URL) and --jwt-secret (or JWT_SECRET)")
        plan = create_sql(a.users, a.room_size, a.assistant_share, a.database_url, a.jwt_secret, a.host,
                          a.token_ttl_s)
    elif a.via == "bulk":
        try:
            plan = create_bulk(a.users, a.room_size, a.assistant_share, a.host, a.admin_token, a.token_ttl_s)
        except BulkRefused as exc:
            p.error(f"{exc}: --via bulk needs a server in dev mode (make run) or --admin-token")
    else:
        plan = create_rest(a.users, a.room_size, a.assistant_share, a.host)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(plan))
    print(f"{len(plan['users'])} users, {len(plan['rooms'])} rooms via {a.via} in {time.perf_counter() - t0:.1f}s"
          f" -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
