"""config/nginx/chatd.conf, run by a real nginx in front of two chatd instances (one Postgres, one Valkey).

Clients use their own loopback addresses (127.0.0.2, 127.0.0.3) so that the
address chatd logs is visibly the client's, not nginx's (127.0.0.1).
"""

from __future__ import annotations

import asyncio
import datetime
import json
import os
import re
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from tornado.httpclient import AsyncHTTPClient, HTTPRequest
from tornado.websocket import websocket_connect

from tests.conftest import Services
from tests.support import ROOT, WS, Chatd, free_port, http_get
from tests.system_packages import ensure_binary
from tests.users import User, make_users

CONF = ROOT / "config" / "nginx" / "chatd.conf"
API = "/api/v1"
ALICE_IP, BOB_IP = "127.0.0.2", "127.0.0.3"


def self_signed(directory: Path) -> tuple[Path, Path]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "chat.example.com")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert_path, key_path


def substitute(text: str, pattern: str, replacement: str, count: int) -> str:
    """re.sub that insists on ``count`` matches: a drift of the shipped file fails loudly here."""
    new, n = re.subn(pattern, replacement, text, flags=re.MULTILINE)
    assert n == count, f"{pattern!r} matched {n} times in {CONF}, expected {count}"
    return new


@dataclass
class Nginx:
    port: int
    proc: subprocess.Popen[bytes]
    prefix: Path

    @property
    def https(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    @property
    def wss(self) -> str:
        return f"wss://127.0.0.1:{self.port}/ws"

    def error_log(self) -> str:
        return (self.prefix / "error.log").read_text(errors="replace")


def start_nginx(tmp_path: Path, upstreams: list[int]) -> Nginx:
    nginx = ensure_binary("nginx", "nginx")
    prefix = tmp_path / "nginx"
    prefix.mkdir()
    cert, key = self_signed(prefix)
    port, plain_port = free_port(), free_port()
    conf = CONF.read_text()
    servers = "".join(f"    server 127.0.0.1:{p} max_fails=1 fail_timeout=5s;\n" for p in upstreams)
    conf = substitute(conf, r"^    server \S+:8080 [^\n]*\n", "", 2)
    conf = substitute(conf, r"^(upstream chatd \{\n(?:    #[^\n]*\n)*)", r"\g<1>" + servers, 1)
    conf = substitute(conf, r"^    listen 443 ssl;", f"    listen 127.0.0.1:{port} ssl;", 1)
    conf = substitute(conf, r"^    listen 80;", f"    listen 127.0.0.1:{plain_port};", 1)
    conf = substitute(conf, r"ssl_certificate     \S+;", f"ssl_certificate     {cert};", 1)
    conf = substitute(conf, r"ssl_certificate_key \S+;", f"ssl_certificate_key {key};", 1)
    conf = substitute(conf, r"access_log \S+ chatd;", f"access_log {prefix}/access.log chatd;", 1)
    (prefix / "chatd.conf").write_text(conf)
    temp = "".join(
        f"    {kind}_temp_path {prefix}/{kind}_temp;\n" for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    (prefix / "nginx.conf").write_text(
        f"""daemon off;
{"user root;" if os.geteuid() == 0 else ""}
worker_processes 1;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log info;
events {{ worker_connections 1024; }}
http {{
{temp}    include {prefix}/chatd.conf;
}}
"""
    )
    test = subprocess.run(
        [nginx, "-e", "stderr", "-t", "-p", str(prefix), "-c", str(prefix / "nginx.conf")],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert test.returncode == 0, test.stderr
    proc = subprocess.Popen(
        [nginx, "-e", "stderr", "-p", str(prefix), "-c", str(prefix / "nginx.conf")],
        stdout=subprocess.DEVNULL,
        stderr=(prefix / "stderr.log").open("wb"),
    )
    deadline = time.monotonic() + 20
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            assert proc.poll() is None, (prefix / "stderr.log").read_text()
            assert time.monotonic() < deadline, "nginx did not listen"
            time.sleep(0.05)
    return Nginx(port, proc, prefix)


@pytest.fixture
def cluster(chatd_factory: Any, tmp_path: Path) -> Iterator[tuple[Nginx, Chatd, Chatd]]:
    env = {
        "CHATD_SERVER_TRUSTED_PROXIES": "127.0.0.1",
        "CHATD_ASSISTANT_PROVIDER": "offline",
        "CHATD_ASSISTANT_OFFLINE_TOKENS_PER_S": "6",
        "CHATD_SERVER_SSE_KEEPALIVE_S": "0.3",
    }
    one, two = chatd_factory(**env), chatd_factory(**env)
    nginx = start_nginx(tmp_path, [one.port, two.port])
    yield nginx, one, two
    nginx.proc.send_signal(signal.SIGQUIT)  # graceful: let open sockets go first
    try:
        nginx.proc.wait(10)
    except subprocess.TimeoutExpired:
        nginx.proc.kill()
        nginx.proc.wait()


async def fetch(
    url: str,
    method: str = "GET",
    body: Any = None,
    token: str | None = None,
    source_ip: str = ALICE_IP,
    headers: dict[str, str] | None = None,
    **kw: Any,
) -> Any:
    headers = {"Content-Type": "application/json", **(headers or {})}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    data = json.dumps(body).encode() if body is not None else (b"" if method == "POST" else None)
    req = HTTPRequest(
        url,
        method=method,
        body=data,
        headers=headers,
        validate_cert=False,
        network_interface=source_ip,
        request_timeout=30,
        **kw,
    )
    return await AsyncHTTPClient().fetch(req, raise_error=False)


async def connect_via(nginx: Nginx, user: User, source_ip: str) -> WS:
    conn = await websocket_connect(
        HTTPRequest(
            nginx.wss,
            headers={"Authorization": f"Bearer {user.token}"},
            validate_cert=False,
            network_interface=source_ip,
            request_timeout=20,
        )
    )
    ws = WS(conn)
    await ws.expect("hello")
    return ws


async def logged(server: Chatd, route: str, also: Chatd | None = None) -> list[dict[str, Any]]:
    """Access lines of ``route`` (written just after the response: poll a moment)."""
    for _ in range(100):
        lines = [e for s in (server, also) if s for e in s.events("http_request") if e.get("route") == route]
        if lines:
            return lines
        await asyncio.sleep(0.05)
    raise AssertionError(f"no {route} access line")


def handshakes_from(server: Chatd, ip: str) -> int:
    return sum(1 for e in server.events("http_request") if e.get("route") == "ChatSocket" and e["remote_ip"] == ip)


async def which_instance(servers: tuple[Chatd, Chatd], ip: str, before: list[int]) -> Chatd:
    """The instance that logged a new handshake from ``ip`` (the access line follows the 101)."""
    for _ in range(100):
        for server, count in zip(servers, before, strict=True):
            if handshakes_from(server, ip) > count:
                return server
        await asyncio.sleep(0.05)
    raise AssertionError(f"no instance logged a WebSocket from {ip}")


async def join(ws: WS, room: int, since_seq: int | None = None) -> dict[str, Any]:
    rid = uuid.uuid4().hex[:8]
    frame: dict[str, Any] = {"type": "join", "room_id": room, "id": rid}
    if since_seq is not None:
        frame["since_seq"] = since_seq
    await ws.send(frame)
    return await ws.expect("joined", reply_to=rid)


async def send(ws: WS, room: int, content: str) -> dict[str, Any]:
    cmid = uuid.uuid4().hex
    await ws.send({"type": "send", "room_id": room, "content": content, "client_msg_id": cmid, "id": cmid})
    reply = await ws.expect("ack", reply_to=cmid)
    return reply


async def test_two_instances_behind_nginx(cluster: tuple[Nginx, Chatd, Chatd], services: Services) -> None:
    nginx, one, two = cluster
    servers = (one, two)
    alice, bob = make_users(services.database_url, 2)
    r = await fetch(
        nginx.https + API + "/rooms", "POST", {"name": "r", "kind": "group", "members": [bob.id]}, alice.token
    )
    assert r.code == 201, r.body
    room = json.loads(r.body)["id"]

    # chatd logs the client's address, not nginx's, because nginx is a trusted proxy...
    rest = await logged(one, "RoomsHandler", also=two)
    assert [e["remote_ip"] for e in rest] == [ALICE_IP]
    # ...and only nginx: the same header sent straight to chatd is ignored.
    direct = await fetch(one.http + "/health/live", headers={"X-Forwarded-For": "198.51.100.1"}, source_ip=BOB_IP)
    assert direct.code == 200
    live = await logged(one, "LiveHandler")
    assert live[-1]["remote_ip"] == BOB_IP

    # Alice and Bob on different instances (round robin; retry until it is so).
    before = [handshakes_from(s, ALICE_IP) for s in servers]
    a = await connect_via(nginx, alice, ALICE_IP)
    a_home = await which_instance(servers, ALICE_IP, before)
    for _ in range(6):
        before = [handshakes_from(s, BOB_IP) for s in servers]
        b = await connect_via(nginx, bob, BOB_IP)
        b_home = await which_instance(servers, BOB_IP, before)
        if b_home is not a_home:
            break
        b.close()
    assert b_home is not a_home
    await join(a, room)
    await join(b, room)

    # A message sent through nginx to one instance reaches a client of the other.
    ack = await send(a, room, "hello across instances")
    got = await b.expect("message", room_id=room)
    assert got["content"] == "hello across instances" and got["seq"] == ack["seq"]
    last_seen = ack["seq"]

    # Kill Alice's instance outright: she reconnects through nginx to the other and resumes.
    assert a_home.proc is not None
    a_home.proc.send_signal(signal.SIGKILL)
    a_home.proc.wait()
    await a.closed(timeout_s=10)
    sent_meanwhile = [(await send(b, room, f"while alice was away {i}"))["seq"] for i in range(3)]
    a2 = await connect_via(nginx, alice, ALICE_IP)
    assert handshakes_from(b_home, ALICE_IP) >= 1
    joined = await join(a2, room, since_seq=last_seen)
    replayed = [await a2.expect("message", room_id=room) for _ in sent_meanwhile]
    assert [m["seq"] for m in replayed] == sent_meanwhile == list(range(last_seen + 1, last_seen + 4))
    assert joined.get("last_seq", sent_meanwhile[-1]) == sent_meanwhile[-1]
    ack = await send(a2, room, "back")
    assert ack["seq"] == sent_meanwhile[-1] + 1
    assert (await b.expect("message", room_id=room, content="back"))["seq"] == ack["seq"]
    for ws in (a2, b):
        ws.abort()


async def test_sse_through_nginx_is_unbuffered(cluster: tuple[Nginx, Chatd, Chatd], services: Services) -> None:
    nginx, _, _ = cluster
    (alice,) = make_users(services.database_url, 1)
    r = await fetch(
        nginx.https + API + "/rooms", "POST", {"name": "a", "kind": "assistant", "members": []}, alice.token
    )
    assert r.code == 201, r.body
    room = json.loads(r.body)["id"]
    arrivals: list[tuple[float, bytes]] = []
    content = "one two three four five six seven eight nine ten eleven twelve"  # ~2 s at 6 tokens/s
    r = await fetch(
        f"{nginx.https}{API}/rooms/{room}/messages/stream",
        "POST",
        {"content": content, "client_msg_id": uuid.uuid4().hex},
        alice.token,
        streaming_callback=lambda chunk: arrivals.append((time.monotonic(), chunk)),
    )
    assert r.code == 200 and r.headers["Content-Type"].startswith("text/event-stream")
    body = b"".join(chunk for _, chunk in arrivals).decode()
    assert body.count("event: stream_chunk") >= 5 and "event: stream_end" in body
    assert ": keepalive\n\n" in body  # chatd's comment lines pass through to the client

    def first(marker: str) -> float:
        seen = b""
        for at, chunk in arrivals:
            seen += chunk
            if marker.encode() in seen:
                return at
        raise AssertionError(marker)

    # Unbuffered: the first token reached the client well before the answer ended.
    assert first("event: stream_end") - first("event: stream_chunk") > 1.0
    assert len(arrivals) >= 5


async def test_login_burst_is_limited_by_nginx(cluster: tuple[Nginx, Chatd, Chatd], services: Services) -> None:
    nginx, one, two = cluster
    by_nginx = 0
    for i in range(20):
        r = await fetch(
            nginx.https + API + "/auth/login",
            "POST",
            {"email": f"x{i}@example.com", "password": "p" * 10},
            source_ip="127.0.0.4",
        )
        if r.code == 429 and b"too many requests, retry later" in r.body:  # nginx's answer, in chatd's error shape
            assert json.loads(r.body)["error"]["code"] == "rate_limited" and r.headers["Retry-After"] == "10"
            by_nginx += 1
    assert by_nginx >= 5

    # What nginx refused never reached chatd (whose own per-IP limit answered some of the rest).
    def reached() -> int:
        return sum(1 for s in (one, two) for e in s.events("http_request") if e.get("route") == "LoginHandler")

    deadline = time.monotonic() + 10  # access lines follow the responses: polled until all are in
    while reached() < 20 - by_nginx and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert reached() == 20 - by_nginx
    assert http_get(one.http + "/health/ready")[0] == 200
