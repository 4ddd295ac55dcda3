"""Test support: real chatd processes over real sockets, and small real clients.

Nothing here fakes Postgres or Redis: chatd processes talk to the embedded
servers started by the session fixture (or to DATABASE_URL / REDIS_URL).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from tornado.httpclient import AsyncHTTPClient, HTTPRequest
from tornado.websocket import WebSocketClientConnection, websocket_connect

ROOT = Path(__file__).resolve().parent.parent
JWT_SECRET = "test-secret-0123456789-0123456789-0123456789"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def with_database(url: str, dbname: str) -> str:
    params = conninfo_to_dict(url)
    params["dbname"] = dbname
    return make_conninfo("", **params)


def create_database(admin_url: str, prefix: str = "t") -> str:
    """A fresh empty database on the same server; returns its URL."""
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(with_database(admin_url, "postgres"), autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return with_database(admin_url, name)


@dataclass
class Chatd:
    """One ``chatd serve`` process tree on a free port."""

    database_url: str
    redis_url: str
    log_path: Path
    workers: int = 1
    env: Mapping[str, str] = field(default_factory=dict)
    data_dir: Path | None = None
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    def start(self, wait: bool = True, timeout_s: float = 60) -> Chatd:
        env = {k: v for k, v in os.environ.items() if not k.startswith("CHATD_")}
        env.update(
            {
                "DATABASE_URL": self.database_url,
                "REDIS_URL": self.redis_url,
                "JWT_SECRET": JWT_SECRET,
                "CHATD_LOG_FORMAT": "json",
                "CHATD_SERVER_SHUTDOWN_GRACE_S": "15",
                "PYTHONUNBUFFERED": "1",
            }
        )
        if self.data_dir is not None:
            env["CHATD_STORAGE_DATA_DIR"] = str(self.data_dir)
        env.update(self.env)
        self._log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "chatd", "serve", "--port", str(self.port), "--workers", str(self.workers)],
            cwd=ROOT,
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        if wait:
            self.wait_ready(timeout_s)
        return self

    def wait_ready(self, timeout_s: float = 60) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"chatd exited with {self.proc.returncode}:\n{self.log()[-4000:]}")
            status, _ = http_get(self.http + "/health/ready")
            if status == 200 and (self.workers == 1 or len(self.events("worker_started")) >= self.workers):
                return  # every worker serves, not just the first to answer
            time.sleep(0.1)
        raise TimeoutError(f"chatd not ready within {timeout_s}s:\n{self.log()[-4000:]}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def events(self, name: str) -> list[dict[str, Any]]:
        out = []
        for line in self.log().splitlines():
            if line.startswith("{"):
                try:
                    event = json.loads(line)
                except ValueError:
                    continue
                if event.get("event") == name:
                    out.append(event)
        return out

    def worker_pids(self) -> list[int]:
        assert self.proc is not None
        path = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children")
        try:
            return [int(p) for p in path.read_text().split()]
        except OSError:
            return []

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def stop(self, timeout_s: float = 40) -> int:
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


async def wait_user_channel(server: Chatd, user_id: int, subscribers: int = 1, timeout_s: float = 15) -> None:
    """Until ``subscribers`` chatd processes listen on the user's channel (NUMSUB in Redis).

    A socket gets ``hello`` only once its worker's SUBSCRIBE to the user channel is confirmed
    (``Hub.add_user``), unless Redis was slow past its timeout; this checks the same from Redis' side.
    """
    import redis.asyncio

    channel = f"{server.env.get('CHATD_STORAGE_REDIS_KEY_PREFIX', 'chatd:')}user:{user_id}"
    client = redis.asyncio.Redis.from_url(server.env.get("REDIS_URL", server.redis_url))
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            [(_, count)] = await client.pubsub_numsub(channel)
            if count >= subscribers:
                return
            assert time.monotonic() < deadline, f"{count} of {subscribers} subscribers on {channel} in {timeout_s}s"
            await asyncio.sleep(0.05)
    finally:
        await client.aclose()


def http_get(url: str, timeout_s: float = 2) -> tuple[int, Any]:
    """Blocking GET for polling from sync code."""
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as resp:
            return resp.status, json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as exc:
        body = exc.read()
        try:
            return exc.code, json.loads(body or b"null")
        except ValueError:
            return exc.code, body
    except (OSError, ValueError):
        return 0, None


@dataclass
class Response:
    status: int
    body: Any
    headers: Mapping[str, str]


async def request(
    method: str,
    url: str,
    body: Any = None,
    token: str | None = None,
    headers: Mapping[str, str] | None = None,
    raw_body: bytes | None = None,
) -> Response:
    hdrs = dict(headers or {})
    if token:
        hdrs["Authorization"] = f"Bearer {token}"
    data = raw_body if raw_body is not None else (json.dumps(body).encode() if body is not None else None)
    if data is not None:
        hdrs.setdefault("Content-Type", "application/json")
    if data is None and method in ("POST", "PUT", "PATCH"):
        data = b""
    req = HTTPRequest(url, method=method, headers=hdrs, body=data, request_timeout=20, allow_nonstandard_methods=True)
    resp = await AsyncHTTPClient().fetch(req, raise_error=False)
    text = resp.body or b""
    try:
        parsed = json.loads(text) if text else None
    except ValueError:
        parsed = text
    return Response(resp.code, parsed, dict(resp.headers))


class WS:
    """A raw WebSocket client speaking chatd's JSON frames."""

    opened: ClassVar[list[WS]] = []  # closed by the chatd fixtures before the servers stop

    def __init__(self, conn: WebSocketClientConnection) -> None:
        self.conn = conn
        self.backlog: list[dict[str, Any]] = []
        WS.opened.append(self)

    @classmethod
    async def connect(cls, url: str, token: str | None = None, headers: Mapping[str, str] | None = None) -> WS:
        hdrs = dict(headers or {})
        if token:
            hdrs["Authorization"] = f"Bearer {token}"
        conn = await websocket_connect(HTTPRequest(url, headers=hdrs, request_timeout=20))
        return cls(conn)

    async def send(self, frame: Mapping[str, Any] | str | bytes) -> None:
        if isinstance(frame, bytes):
            await self.conn.write_message(frame, binary=True)
        elif isinstance(frame, str):
            await self.conn.write_message(frame)
        else:
            await self.conn.write_message(json.dumps(frame))

    async def recv(self, timeout_s: float = 10) -> dict[str, Any] | None:
        """The next frame, or None once the server closed the socket."""
        if self.backlog:
            return self.backlog.pop(0)
        msg = await asyncio.wait_for(self.conn.read_message(), timeout_s)
        if msg is None:
            return None
        frame: dict[str, Any] = json.loads(msg)
        return frame

    async def expect(
        self,
        type_: str,
        timeout_s: float = 10,
        keep: bool = False,
        where: Callable[[dict[str, Any]], bool] | None = None,
        **match: Any,
    ) -> dict[str, Any]:
        """Read until a frame of ``type_`` (matching ``match`` and ``where``) arrives; others are kept for later.

        ``keep``: leave the matched frame in the backlog too (wait for a point in a stream without consuming it).
        """
        return await self.expect_any((type_,), timeout_s, keep, where, **match)

    async def expect_presence(self, user_id: int, status: str, timeout_s: float = 10, **match: Any) -> dict[str, Any]:
        """The next ``presence`` frame that lists ``user_id`` as ``status`` ("online" / "offline")."""
        return await self.expect("presence", timeout_s, where=lambda f: user_id in f[status], **match)

    async def expect_any(
        self,
        types: tuple[str, ...],
        timeout_s: float = 10,
        keep: bool = False,
        where: Callable[[dict[str, Any]], bool] | None = None,
        **match: Any,
    ) -> dict[str, Any]:
        """Read until a frame of one of ``types`` (matching ``match``) arrives; others are kept for later."""
        type_ = "|".join(types)
        deadline = time.monotonic() + timeout_s
        skipped: list[dict[str, Any]] = []
        try:
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"no {type_} {match} within {timeout_s}s; got {skipped}")
                if self.backlog:
                    frame: dict[str, Any] | None = self.backlog.pop(0)
                else:
                    msg = await asyncio.wait_for(self.conn.read_message(), remaining)
                    frame = None if msg is None else json.loads(msg)
                if frame is None:
                    raise ConnectionError(
                        f"closed ({self.conn.close_code} {self.conn.close_reason}) waiting for {type_}; got {skipped}"
                    )
                if (
                    frame.get("type") in types
                    and all(frame.get(k) == v for k, v in match.items())
                    and (where is None or where(frame))
                ):
                    if keep:
                        skipped.append(frame)
                    return frame
                skipped.append(frame)
        finally:
            self.backlog[:0] = skipped

    async def closed(self, timeout_s: float = 10) -> tuple[int | None, str | None]:
        """Wait until the server closes; return (code, reason)."""
        deadline = time.monotonic() + timeout_s
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("socket not closed")
            msg = await asyncio.wait_for(self.conn.read_message(), remaining)
            if msg is None:
                return self.conn.close_code, self.conn.close_reason

    def close(self) -> None:
        self.conn.close()

    def abort(self) -> None:
        """Drop the TCP connection without the event loop (fixture teardown)."""
        sock = getattr(self.conn.stream, "socket", None) if self.conn.stream is not None else None
        if sock is not None:
            try:
                sock.close()
            except OSError:
                pass
