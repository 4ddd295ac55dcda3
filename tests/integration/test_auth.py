"""Accounts and auth against real chatd processes, real Postgres and real Valkey.

REST flows (register, login, refresh rotation, logout, /me, body limits), token
rejections on /me and on the WebSocket handshake (forged with PyJWT), the
socket handshake and in-band re-authentication, connection caps, forced closes
across workers, and the login rate limit shared by two instances.
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import hashlib
import hmac
import json
import os
import time
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jwt
import psycopg
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from tornado.httpclient import HTTPClientError, HTTPRequest
from tornado.websocket import websocket_connect

from chatd.process.config import AuthSettings
from chatd.services import credentials
from chatd.services.tokens import TokenService
from tests.conftest import Services
from tests.support import JWT_SECRET, WS, Chatd, Response, request

API = "/api/v1"
PASSWORD = "correct horse battery"
# Most tests register and log in more than the default 10 times a minute from 127.0.0.1.
MANY_ATTEMPTS = {"CHATD_AUTH_AUTH_ATTEMPTS_PER_MIN": "1000"}


# -- helpers ------------------------------------------------------------------------------


def new_email(domain: str = "example.com") -> str:
    return f"user-{uuid.uuid4().hex[:12]}@{domain}"


async def register(server: Chatd, email: str | None = None, name: str = "Alice") -> dict[str, Any]:
    resp = await request(
        "POST",
        server.http + API + "/auth/register",
        {"email": email or new_email(), "password": PASSWORD, "name": name},
    )
    assert resp.status == 201, resp.body
    body: dict[str, Any] = resp.body
    return body


async def login(server: Chatd, email: str, password: str = PASSWORD) -> Response:
    return await request("POST", server.http + API + "/auth/login", {"email": email, "password": password})


async def refresh(server: Chatd, refresh_token: str) -> Response:
    return await request("POST", server.http + API + "/auth/refresh", {"refresh_token": refresh_token})


async def me(server: Chatd, token: str) -> Response:
    return await request("GET", server.http + API + "/me", token=token)


async def logout(server: Chatd, token: str) -> Response:
    return await request("POST", server.http + API + "/auth/logout", token=token)


def assert_error(resp: Response, status: int, code: str) -> str:
    """The response is the one error shape with this status and code; returns the message."""
    assert resp.status == status, (resp.status, resp.body)
    assert isinstance(resp.body, dict) and set(resp.body) == {"error"}, resp.body
    error = resp.body["error"]
    assert error["code"] == code, error
    assert isinstance(error["message"], str) and error["message"], error
    return str(error["message"])


def assert_user_shape(user: Mapping[str, Any], status: str = "active") -> None:
    """The user object of docs/API.md (extra members are tolerated; a password hash is not)."""
    assert {"id", "email", "name", "role", "created_at"} <= set(user), user
    assert isinstance(user["id"], int) and user["id"] > 0
    assert user["role"] in ("user", "admin")
    assert user.get("status", status) == status
    assert not any("password" in key for key in user), user
    assert isinstance(user["created_at"], str) and user["created_at"].endswith("Z")


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def claims(sub: int, **overrides: Any) -> dict[str, Any]:
    """Claims chatd accepts on an access token; ``overrides`` set (or, with None, drop) members."""
    now = int(time.time())
    payload: dict[str, Any] = {
        "sub": str(sub),
        "jti": uuid.uuid4().hex,
        "iat": now,
        "exp": now + 600,
        "typ": "access",
        "role": "user",
        "iss": "chatd",
        "aud": "chatd",
        "fam": uuid.uuid4().hex,
    }
    for key, value in overrides.items():
        if value is None:
            payload.pop(key, None)
        else:
            payload[key] = value
    return payload


def forge(sub: int, key: Any = JWT_SECRET, alg: str = "HS256", **overrides: Any) -> str:
    return jwt.encode(claims(sub, **overrides), key, algorithm=alg, headers={"typ": "JWT"})


def forge_raw(payload: Mapping[str, Any], alg: str, sign: Any) -> str:
    """A compact JWS built by hand (PyJWT refuses some of the bad ones we need)."""
    header = b64url(json.dumps({"alg": alg, "typ": "JWT"}).encode())
    body = b64url(json.dumps(dict(payload)).encode())
    signing_input = f"{header}.{body}".encode()
    return f"{header}.{body}.{b64url(sign(signing_input))}"


def unverified(token: str) -> dict[str, Any]:
    out: dict[str, Any] = jwt.decode(token, options={"verify_signature": False})
    return out


async def ws_handshake(
    server: Chatd, token: str | None = None, origin: str | None = None, query: str = ""
) -> tuple[int, dict[str, str], bytes]:
    """A WebSocket upgrade over a raw socket: (status, lower-cased headers, body)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    try:
        lines = [
            f"GET /ws{query} HTTP/1.1",
            f"Host: 127.0.0.1:{server.port}",
            "Upgrade: websocket",
            "Connection: Upgrade",
            f"Sec-WebSocket-Key: {base64.b64encode(os.urandom(16)).decode()}",
            "Sec-WebSocket-Version: 13",
        ]
        if token is not None:
            lines.append(f"Authorization: Bearer {token}")
        if origin is not None:
            lines.append(f"Origin: {origin}")
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        status_line, *header_lines = head.decode("latin-1").rstrip("\r\n").split("\r\n")
        status = int(status_line.split()[1])
        headers = {}
        for line in header_lines:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        body = b""
        if status != 101:
            body = await asyncio.wait_for(reader.readexactly(int(headers.get("content-length", "0"))), 10)
        return status, headers, body
    finally:
        writer.close()


async def assert_ws_refused(
    server: Chatd, token: str | None, status: int = 401, code: str = "unauthorized", **kwargs: Any
) -> str:
    got, headers, body = await ws_handshake(server, token, **kwargs)
    assert got == status, (got, headers, body)
    assert "upgrade" not in headers and "sec-websocket-accept" not in headers, headers
    assert headers.get("content-type", "").startswith("application/json"), headers
    parsed = json.loads(body)
    assert set(parsed) == {"error"} and parsed["error"]["code"] == code, parsed
    return str(parsed["error"]["message"])


async def assert_token_refused(server: Chatd, token: str) -> None:
    """Refused as an access token by the REST API and by the socket handshake."""
    assert_error(await me(server, token), 401, "unauthorized")
    await assert_ws_refused(server, token)


async def assert_token_accepted(server: Chatd, token: str, user_id: int) -> None:
    resp = await me(server, token)
    assert resp.status == 200, resp.body
    assert resp.body["id"] == user_id
    ws = await WS.connect(server.ws, token)
    try:
        hello = await ws.expect("hello")
        assert hello["user_id"] == user_id
    finally:
        ws.close()


async def make_admin(services: Services, user_id: int) -> None:
    async with await psycopg.AsyncConnection.connect(services.database_url, autocommit=True) as conn:
        await conn.execute("UPDATE users SET role = 'admin' WHERE id = %s", (user_id,))


async def create_user_in_db(services: Services, email: str, password: str) -> int:
    """A user made without the REST API (so no rate-limited attempt is spent)."""
    password_hash = await asyncio.to_thread(credentials.hash_password, password)
    async with await psycopg.AsyncConnection.connect(services.database_url, autocommit=True) as conn:
        cur = await conn.execute(
            "INSERT INTO users (email, name, password_hash, role) VALUES (%s, %s, %s, 'user') RETURNING id",
            (email, "Rate", password_hash),
        )
        row = await cur.fetchone()
    assert row is not None
    return int(row[0])


async def ping(ws: WS, request_id: str) -> dict[str, Any]:
    await ws.send({"type": "ping", "id": request_id})
    return await ws.expect("pong", reply_to=request_id)


def access_log_workers(server: Chatd) -> set[str]:
    """Workers whose access log shows an accepted WebSocket upgrade."""
    return {e["worker"] for e in server.events("http_request") if e.get("route") == "ChatSocket" and e["status"] == 101}


@pytest.fixture
def server(chatd_factory: Any) -> Chatd:
    out: Chatd = chatd_factory(**MANY_ATTEMPTS)
    return out


# -- REST: register, login ------------------------------------------------------------


async def test_register_returns_user_and_token_pair(server: Chatd) -> None:
    email = new_email()
    resp = await request(
        "POST", server.http + API + "/auth/register", {"email": email, "password": PASSWORD, "name": "  Alice  "}
    )
    assert resp.status == 201, resp.body
    body = resp.body
    assert {"user", "access_token", "refresh_token", "expires_in"} <= set(body)
    assert body["expires_in"] == 900
    user = body["user"]
    assert_user_shape(user)
    assert isinstance(user["id"], int) and user["id"] > 0
    assert (user["email"], user["name"], user["role"]) == (email, "Alice", "user")
    access, refresh_claims = unverified(body["access_token"]), unverified(body["refresh_token"])
    assert access["sub"] == refresh_claims["sub"] == str(user["id"])
    assert (access["typ"], refresh_claims["typ"]) == ("access", "refresh")
    assert access["fam"] == refresh_claims["fam"]
    assert access["exp"] - access["iat"] == 900
    assert (await me(server, body["access_token"])).body["id"] == user["id"]


async def test_register_duplicate_email_is_case_insensitive(server: Chatd) -> None:
    local = f"Dup-{uuid.uuid4().hex[:10]}"
    await register(server, f"{local}@Example.COM")
    resp = await request(
        "POST",
        server.http + API + "/auth/register",
        {"email": f"{local.lower()}@example.com", "password": PASSWORD, "name": "Bob"},
    )
    assert_error(resp, 409, "conflict")


@pytest.mark.parametrize(
    "body",
    [
        pytest.param({"email": "not-an-email", "password": PASSWORD, "name": "A"}, id="bad-email"),
        pytest.param({"email": "a@b", "password": PASSWORD, "name": "A"}, id="email-without-dot"),
        pytest.param({"password": PASSWORD, "name": "A"}, id="missing-email"),
        pytest.param({"email": None, "password": "short", "name": "A"}, id="short-password"),
        pytest.param({"email": None, "password": PASSWORD}, id="missing-name"),
        pytest.param({"email": None, "password": PASSWORD, "name": "   "}, id="blank-name"),
    ],
)
async def test_register_rejects_bad_input(server: Chatd, body: dict[str, Any]) -> None:
    if "email" in body and body["email"] is None:
        body = body | {"email": new_email()}
    resp = await request("POST", server.http + API + "/auth/register", body)
    assert_error(resp, 400, "bad_request")
    if "email" in body and "@" in body["email"] and "." in body["email"].split("@")[1]:
        # Nothing was created: the same email registers fine with good input.
        await register(server, body["email"])


@pytest.mark.smoke
async def test_login_returns_a_working_pair(server: Chatd) -> None:
    email = new_email()
    user = (await register(server, email))["user"]
    resp = await login(server, email.upper())
    assert resp.status == 200, resp.body
    assert resp.body["user"] == user
    assert resp.body["expires_in"] == 900
    assert (await me(server, resp.body["access_token"])).body["id"] == user["id"]
    assert (await refresh(server, resp.body["refresh_token"])).status == 200


async def test_login_wrong_password_and_unknown_email_look_the_same(server: Chatd) -> None:
    email = new_email()
    await register(server, email)
    wrong = await login(server, email, "wrong password!")
    unknown = await login(server, new_email(), PASSWORD)
    wrong_message = assert_error(wrong, 401, "unauthorized")
    unknown_message = assert_error(unknown, 401, "unauthorized")
    assert wrong_message == unknown_message
    assert "access_token" not in json.dumps(wrong.body)


# -- REST: refresh, logout, /me --------------------------------------------------------


@pytest.mark.smoke
async def test_refresh_rotates_and_reuse_revokes_the_family(server: Chatd) -> None:
    email = new_email()
    first = await register(server, email)
    user_id = first["user"]["id"]
    other_session = (await login(server, email)).body

    second = await refresh(server, first["refresh_token"])
    assert second.status == 200, second.body
    assert second.body["refresh_token"] != first["refresh_token"]
    assert second.body["access_token"] != first["access_token"]
    assert unverified(second.body["refresh_token"])["fam"] == unverified(first["refresh_token"])["fam"]
    assert (await me(server, second.body["access_token"])).body["id"] == user_id
    third = await refresh(server, second.body["refresh_token"])  # the new refresh token works
    assert third.status == 200, third.body
    assert (await me(server, third.body["access_token"])).status == 200

    # The first refresh token again: someone holds a stolen copy.
    assert_error(await refresh(server, first["refresh_token"]), 401, "unauthorized")
    assert_error(await refresh(server, third.body["refresh_token"]), 401, "unauthorized")
    for token in (first["access_token"], second.body["access_token"], third.body["access_token"]):
        assert_error(await me(server, token), 401, "unauthorized")
    # Only that family: another login of the same user is untouched.
    assert (await me(server, other_session["access_token"])).body["id"] == user_id
    assert (await refresh(server, other_session["refresh_token"])).status == 200


async def test_refresh_rejects_an_access_token(server: Chatd) -> None:
    pair = await register(server)
    assert_error(await refresh(server, pair["access_token"]), 401, "unauthorized")
    assert (await refresh(server, pair["refresh_token"])).status == 200


async def test_logout_revokes_the_access_and_refresh_token(server: Chatd) -> None:
    email = new_email()
    pair = await register(server, email)
    other = (await login(server, email)).body
    assert (await me(server, pair["access_token"])).status == 200
    resp = await logout(server, pair["access_token"])
    assert resp.status == 204, resp.body
    assert_error(await me(server, pair["access_token"]), 401, "unauthorized")
    assert_error(await refresh(server, pair["refresh_token"]), 401, "unauthorized")
    assert (await me(server, other["access_token"])).status == 200


async def test_logout_of_a_token_without_family_uses_the_denylist(server: Chatd) -> None:
    """No refresh family to revoke: only the Redis denylist of the jti stops the token."""
    user_id = (await register(server))["user"]["id"]
    token, sibling = forge(user_id, fam=None), forge(user_id, fam=None)
    await assert_token_accepted(server, token, user_id)
    assert (await logout(server, token)).status == 204
    await assert_token_refused(server, token)
    assert (await me(server, sibling)).status == 200


async def test_me_returns_the_user(server: Chatd) -> None:
    email = new_email()
    pair = await register(server, email, name="Zoë")
    resp = await me(server, pair["access_token"])
    assert resp.status == 200, resp.body
    assert resp.body == pair["user"]
    assert_user_shape(resp.body)
    assert (resp.body["email"], resp.body["name"], resp.body["role"]) == (email, "Zoë", "user")
    created = dt.datetime.fromisoformat(resp.body["created_at"].replace("Z", "+00:00"))
    assert abs((dt.datetime.now(dt.UTC) - created).total_seconds()) < 300
    assert_error(await request("GET", server.http + API + "/me"), 401, "unauthorized")


async def test_body_over_max_body_bytes_is_413(chatd_factory: Any) -> None:
    server: Chatd = chatd_factory(CHATD_SERVER_MAX_BODY_BYTES="2048", **MANY_ATTEMPTS)
    url = server.http + API + "/auth/register"

    def body_of(size: int) -> bytes:
        base = {"email": new_email(), "password": PASSWORD, "name": "Big", "pad": ""}
        raw = json.dumps(base).encode()
        return json.dumps(base | {"pad": "x" * (size - len(raw))}).encode()

    small = body_of(2000)
    assert len(small) == 2000
    assert (await request("POST", url, raw_body=small)).status == 201
    big = body_of(3000)
    assert len(big) == 3000
    assert_error(await request("POST", url, raw_body=big), 413, "too_large")
    assert (await login(server, json.loads(big)["email"])).status == 401  # the big one was not registered


async def test_chunked_body_over_max_body_bytes_is_413(chatd_factory: Any) -> None:
    """Without Content-Length the limit must still hold (chunked transfer encoding)."""
    server: Chatd = chatd_factory(CHATD_SERVER_MAX_BODY_BYTES="2048", **MANY_ATTEMPTS)
    email = new_email()
    body = json.dumps({"email": email, "password": PASSWORD, "name": "Big", "pad": "x" * 3000}).encode()
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    try:
        head = (
            f"POST {API}/auth/register HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\n"
            "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
        )
        chunks = b"".join(b"%x\r\n%s\r\n" % (len(part), part) for part in (body[:1500], body[1500:])) + b"0\r\n\r\n"
        writer.write(head.encode() + chunks)
        await writer.drain()
        response = await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
    status = int(response.split(b" ", 2)[1])
    assert status == 413, response[:500]
    assert (await login(server, email)).status == 401


@pytest.mark.parametrize("raw", [b"{not json", b"\xff\xfe", b"[1, 2]"], ids=["syntax", "not-utf8", "not-object"])
async def test_invalid_json_body_is_400(server: Chatd, raw: bytes) -> None:
    for path in ("/auth/register", "/auth/login", "/auth/refresh"):
        assert_error(await request("POST", server.http + API + path, raw_body=raw), 400, "bad_request")


# -- token rejections on /me and /ws --------------------------------------------------


async def test_forged_token_with_the_right_key_is_accepted(server: Chatd) -> None:
    """The control for the rejections below: the claims chatd wants, signed with its key."""
    user_id = (await register(server))["user"]["id"]
    await assert_token_accepted(server, forge(user_id), user_id)


@pytest.mark.smoke
async def test_token_signed_with_another_key_is_refused(server: Chatd) -> None:
    user_id = (await register(server))["user"]["id"]
    await assert_token_refused(server, forge(user_id, key="another-secret-0123456789-0123456789-0123"))


async def test_alg_none_token_is_refused(server: Chatd) -> None:
    user_id = (await register(server))["user"]["id"]
    for alg in ("none", "None", "NONE"):
        await assert_token_refused(server, forge_raw(claims(user_id), alg, lambda _: b""))


async def test_expired_token_is_refused(server: Chatd) -> None:
    user_id = (await register(server))["user"]["id"]
    now = int(time.time())
    # Past the 10 s leeway.
    await assert_token_refused(server, forge(user_id, iat=now - 1000, exp=now - 60))


async def test_wrong_audience_and_issuer_are_refused(server: Chatd) -> None:
    user_id = (await register(server))["user"]["id"]
    await assert_token_refused(server, forge(user_id, aud="someone-else"))
    await assert_token_refused(server, forge(user_id, aud=None))
    await assert_token_refused(server, forge(user_id, iss="someone-else"))


async def test_refresh_token_is_refused_as_access_token(server: Chatd) -> None:
    pair = await register(server)
    await assert_token_refused(server, pair["refresh_token"])
    await assert_token_refused(server, forge(pair["user"]["id"], typ="refresh"))
    await assert_token_refused(server, forge(pair["user"]["id"], typ=None))


async def test_token_of_unknown_user_is_refused(server: Chatd) -> None:
    await assert_token_refused(server, forge(2**53 - 7))


async def test_token_revoked_by_logout_is_refused(server: Chatd) -> None:
    pair = await register(server)
    await assert_token_accepted(server, pair["access_token"], pair["user"]["id"])
    assert (await logout(server, pair["access_token"])).status == 204
    await assert_token_refused(server, pair["access_token"])


async def test_token_of_banned_user_is_refused(server: Chatd, services: Services) -> None:
    admin = await register(server, name="Admin")
    await make_admin(services, admin["user"]["id"])
    victim_email = new_email()
    victim = await register(server, victim_email)
    victim_id = victim["user"]["id"]
    ban_url = server.http + API + f"/admin/users/{victim_id}/ban"

    # Only an admin may ban.
    bystander = await register(server)
    assert_error(await request("POST", ban_url, token=bystander["access_token"]), 403, "forbidden")
    await assert_token_accepted(server, victim["access_token"], victim_id)

    resp = await request("POST", ban_url, token=admin["access_token"])
    assert resp.status == 200, resp.body
    assert resp.body["id"] == victim_id
    assert_user_shape(resp.body, status="banned")
    await assert_token_refused(server, victim["access_token"])
    await assert_token_refused(server, forge(victim_id))  # a fresh token of a banned user too
    assert_error(await refresh(server, victim["refresh_token"]), 401, "unauthorized")
    assert_error(await login(server, victim_email), 401, "unauthorized")
    assert (await me(server, admin["access_token"])).status == 200


@pytest.fixture
def rsa_key(tmp_path: Path) -> tuple[rsa.RSAPrivateKey, Path]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    path = tmp_path / "idp.pem"
    path.write_bytes(
        key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    return key, path


async def test_hs_rs_confusion_is_refused_and_rs256_accepted(
    chatd_factory: Any, rsa_key: tuple[rsa.RSAPrivateKey, Path]
) -> None:
    private_key, pem_path = rsa_key
    server: Chatd = chatd_factory(CHATD_AUTH_JWT_PUBLIC_KEY_FILE=str(pem_path), **MANY_ATTEMPTS)
    user_id = (await register(server))["user"]["id"]
    pem = pem_path.read_bytes()

    # The identity provider's token, signed with its private key: accepted.
    external = claims(user_id, typ=None, role=None, fam=None)
    await assert_token_accepted(server, jwt.encode(external, private_key, algorithm="RS256"), user_id)

    # The public key used as an HMAC secret: refused, whatever HS variant the header names.
    for alg, digest in (("HS256", hashlib.sha256), ("HS384", hashlib.sha384), ("HS512", hashlib.sha512)):
        for payload in (external, claims(user_id)):
            token = forge_raw(payload, alg, lambda data, d=digest: hmac.new(pem, data, d).digest())
            await assert_token_refused(server, token)
    # An RS256 token of another private key: refused.
    stranger = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    await assert_token_refused(server, jwt.encode(external, stranger, algorithm="RS256"))


# -- WebSocket handshake -------------------------------------------------------------------


async def test_ws_without_or_with_invalid_token_gets_401_and_no_upgrade(server: Chatd) -> None:
    await assert_ws_refused(server, None)
    await assert_ws_refused(server, "not-a-jwt")
    await assert_ws_refused(server, None, query="?access_token=not-a-jwt")
    with pytest.raises(HTTPClientError) as info:
        await websocket_connect(HTTPRequest(server.ws, request_timeout=10))
    assert info.value.code == 401


async def test_ws_token_in_query_parameter(server: Chatd) -> None:
    pair = await register(server)
    status, headers, _ = await ws_handshake(server, query=f"?access_token={pair['access_token']}")
    assert status == 101 and "sec-websocket-accept" in headers
    ws = await WS.connect(f"{server.ws}?access_token={pair['access_token']}")
    try:
        assert (await ws.expect("hello"))["user_id"] == pair["user"]["id"]
    finally:
        ws.close()


async def test_ws_cross_site_origin_is_403(server: Chatd) -> None:
    pair = await register(server)
    token = pair["access_token"]
    await assert_ws_refused(server, token, status=403, code="forbidden", origin="https://evil.example")
    # Default (no allowed_origins): the same host and clients without Origin are allowed.
    assert (await ws_handshake(server, token, origin=f"http://127.0.0.1:{server.port}"))[0] == 101
    assert (await ws_handshake(server, token))[0] == 101


async def test_ws_allowed_origins(chatd_factory: Any) -> None:
    server: Chatd = chatd_factory(CHATD_SERVER_ALLOWED_ORIGINS="https://chat.example", **MANY_ATTEMPTS)
    token = (await register(server))["access_token"]
    await assert_ws_refused(server, token, status=403, code="forbidden", origin="https://evil.example")
    await assert_ws_refused(server, token, status=403, code="forbidden", origin=f"http://127.0.0.1:{server.port}")
    assert (await ws_handshake(server, token, origin="https://chat.example"))[0] == 101
    assert (await ws_handshake(server, token))[0] == 101
    ws = await WS.connect(server.ws, token, headers={"Origin": "https://chat.example"})
    try:
        await ws.expect("hello")
    finally:
        ws.close()


@pytest.mark.smoke
async def test_ws_first_frame_is_hello(server: Chatd) -> None:
    pair = await register(server)
    ws = await WS.connect(server.ws, pair["access_token"])
    try:
        hello = await ws.recv()
        assert hello is not None and hello["type"] == "hello", hello
        assert hello["user_id"] == pair["user"]["id"]
        assert isinstance(hello["connection_id"], str) and hello["connection_id"]
        assert isinstance(hello["server_time"], int) and abs(hello["server_time"] - time.time() * 1000) < 60_000
        assert hello["heartbeat_ms"] == 25_000
        assert hello["protocol"] == 1
        # The limits a client keeps to (ws.* defaults): the web app paces its frames with them.
        assert hello["limits"]["send"] == {"count": 20, "window_ms": 10_000}
        assert hello["limits"]["typing"] == {"per_s": 3.0, "burst": 10}
        assert set(hello["limits"]) == {"send", "all", "join", "read", "typing", "control"}
        other = await WS.connect(server.ws, pair["access_token"])
        try:
            assert (await other.expect("hello"))["connection_id"] != hello["connection_id"]
        finally:
            other.close()
    finally:
        ws.close()


async def test_ws_in_band_refresh_keeps_the_socket_past_expiry(chatd_factory: Any) -> None:
    server: Chatd = chatd_factory(
        CHATD_AUTH_ACCESS_TTL_S="30", CHATD_AUTH_TOKEN_EXPIRING_WARNING_S="5", **MANY_ATTEMPTS
    )
    pair = await register(server)
    # The sockets' token: the session's own (its family, the server's secret), minted here with a 10 s
    # lifetime rather than the 30 s minimum of auth.access_ttl_s, so the test waits 10 s for its expiry.
    claims = unverified(pair["access_token"])
    short_lived = TokenService(AuthSettings(jwt_secret=JWT_SECRET, access_ttl_s=10))
    first, _ = short_lived.mint(int(claims["sub"]), claims["role"], "access", family=claims["fam"])
    first_exp = unverified(first)["exp"]
    renewed = await WS.connect(server.ws, first)
    lapsed = await WS.connect(server.ws, first)
    try:
        for ws in (renewed, lapsed):
            await ws.expect("hello")
            warning = await ws.expect("token_expiring", timeout_s=10)
            assert 0 < warning["expires_in_ms"] <= 5_000
        new = await refresh(server, pair["refresh_token"])
        assert new.status == 200, new.body
        new_exp = unverified(new.body["access_token"])["exp"]
        assert new_exp >= first_exp + 3

        await renewed.send({"type": "auth", "token": new.body["access_token"], "id": "a1"})
        done = await renewed.expect("authenticated", reply_to="a1")
        assert done["expires_at_ms"] == new_exp * 1000

        code, _ = await lapsed.closed(timeout_s=first_exp - time.time() + 10)
        assert code == 4001
        assert time.time() >= first_exp
        assert (await ping(renewed, "p1"))["type"] == "pong"
        assert renewed.conn.close_code is None
    finally:
        renewed.close()
        lapsed.close()


async def test_ws_auth_with_another_users_token_is_forbidden(server: Chatd) -> None:
    alice = await register(server, name="Alice")
    bob = await register(server, name="Bob")
    ws = await WS.connect(server.ws, alice["access_token"])
    try:
        await ws.expect("hello")
        await ws.send({"type": "auth", "token": bob["access_token"], "id": "a2"})
        error = await ws.expect("error", reply_to="a2")
        assert error["code"] == "forbidden"
        await ws.send({"type": "auth", "token": forge(alice["user"]["id"], key="x" * 40), "id": "a3"})
        assert (await ws.expect("error", reply_to="a3"))["code"] == "unauthorized"
        await ws.send({"type": "auth", "token": alice["access_token"], "id": "a4"})
        await ws.expect("authenticated", reply_to="a4")
        assert (await ping(ws, "p"))["type"] == "pong"
    finally:
        ws.close()


async def test_ws_connection_cap_per_user(chatd_factory: Any) -> None:
    server: Chatd = chatd_factory(CHATD_AUTH_MAX_CONNECTIONS_PER_USER="2", **MANY_ATTEMPTS)
    pair = await register(server)
    other = await register(server)
    sockets = [await WS.connect(server.ws, pair["access_token"]) for _ in range(2)]
    try:
        for ws in sockets:
            await ws.expect("hello")
        third = await WS.connect(server.ws, pair["access_token"])
        sockets.append(third)
        code, _ = await third.closed()
        assert code == 4029
        # The first two are still open, and another user is not affected.
        for i, ws in enumerate(sockets[:2]):
            await ping(ws, f"p{i}")
        someone_else = await WS.connect(server.ws, other["access_token"])
        sockets.append(someone_else)
        await someone_else.expect("hello")
    finally:
        for ws in sockets:
            ws.close()


async def test_logout_closes_the_sessions_sockets_on_every_worker(chatd_factory: Any) -> None:
    # SO_REUSEPORT: the kernel spreads connections over the workers by their address
    # (a shared listening socket often gives every connection to one worker).
    server: Chatd = chatd_factory(
        workers=2, CHATD_SERVER_REUSE_PORT="true", CHATD_AUTH_MAX_CONNECTIONS_PER_USER="20", **MANY_ATTEMPTS
    )
    assert len(server.worker_pids()) == 2
    email = new_email()
    pair = await register(server, email)
    other = (await login(server, email)).body  # another session of the same user
    sockets: list[WS] = []
    bystander = await WS.connect(server.ws, other["access_token"])
    try:
        await bystander.expect("hello")
        # Open sockets until both workers hold some (the kernel decides who accepts).
        while len(sockets) < 6 or (len(access_log_workers(server)) < 2 and len(sockets) < 18):
            batch = await asyncio.gather(*(WS.connect(server.ws, pair["access_token"]) for _ in range(3)))
            sockets.extend(batch)
            for ws in batch:
                await ws.expect("hello")
        assert access_log_workers(server) == {"w0", "w1"}

        assert (await logout(server, pair["access_token"])).status == 204
        codes = await asyncio.gather(*(ws.closed() for ws in sockets))
        assert [code for code, _ in codes] == [4001] * len(sockets)
        # The other session's socket stays open.
        assert (await ping(bystander, "p"))["type"] == "pong"
    finally:
        bystander.close()
        for ws in sockets:
            ws.close()


async def test_ban_closes_the_users_sockets_with_1008(chatd_factory: Any, services: Services) -> None:
    server: Chatd = chatd_factory(workers=2, CHATD_SERVER_REUSE_PORT="true", **MANY_ATTEMPTS)
    admin = await register(server, name="Admin")
    await make_admin(services, admin["user"]["id"])
    victim = await register(server)
    sockets = await asyncio.gather(*(WS.connect(server.ws, victim["access_token"]) for _ in range(4)))
    admin_ws = await WS.connect(server.ws, admin["access_token"])
    try:
        for ws in sockets:
            await ws.expect("hello")
        await admin_ws.expect("hello")
        resp = await request(
            "POST", server.http + API + f"/admin/users/{victim['user']['id']}/ban", token=admin["access_token"]
        )
        assert resp.status == 200, resp.body
        codes = await asyncio.gather(*(ws.closed() for ws in sockets))
        assert [code for code, _ in codes] == [1008] * len(sockets)
        assert (await ping(admin_ws, "p"))["type"] == "pong"
        await assert_ws_refused(server, victim["access_token"])
    finally:
        admin_ws.close()
        for ws in sockets:
            ws.close()


# -- rate limit across instances ---------------------------------------------------------


async def test_login_rate_limit_is_shared_by_two_instances(chatd_factory: Any, services: Services) -> None:
    first: Chatd = chatd_factory()
    second: Chatd = chatd_factory()
    email = new_email()
    await create_user_in_db(services, email, PASSWORD)
    for attempt in range(10):
        server = (first, second)[attempt % 2]
        if attempt % 3 == 0:
            assert_error(await login(server, email, "wrong password!"), 401, "unauthorized")
        else:
            resp = await login(server, email)
            assert resp.status == 200, (attempt, resp.body)
    for server in (first, second):
        resp = await login(server, email)
        assert_error(resp, 429, "rate_limited")
        retry_after = int(resp.headers["Retry-After"])
        assert 1 <= retry_after <= 60
        assert 0 < resp.body["error"]["retry_after_ms"] <= 60_000
