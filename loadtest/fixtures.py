"""Shared by the load tests and the benchmark: services, users, rooms, server processes, /proc readings.

Everything here talks to loopback or unix sockets only.

* ``Services``: chatd's own embedded Postgres + Valkey (``chatd.embedded``) in a
  temporary directory, or the servers named by DATABASE_URL / REDIS_URL.
* ``make_users`` / ``make_rooms``: thousands of users and rooms in seconds, by
  SQL (one shared Argon2 hash, JWTs minted with ``chatd.services.tokens.TokenService``),
  as ``tests/users.py`` does.  Registering 20,000 users through the API would
  spend 20,000 Argon2 hashes (~70 ms of CPU each).
* ``ServerProcess``: a server under test on its own port, optionally pinned
  with ``taskset``; ``cpu_seconds()`` / ``rss_bytes()`` sum the process and
  its children (chatd's master + workers) from /proc.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
LOADTEST = ROOT / "loadtest"
JWT_SECRET = "loadtest-secret-0123456789-0123456789-0123456789"
PASSWORD = "loadtest-password-1"
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


# -- limits -------------------------------------------------------------------------


def raise_nofile() -> int:
    """Soft RLIMIT_NOFILE up to the hard limit (children inherit it); returns the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- services -----------------------------------------------------------------------


@dataclass
class Services:
    """Postgres + Valkey: embedded in ``data_dir`` unless URLs are given."""

    data_dir: Path
    database_url: str = ""
    redis_url: str = ""
    _embedded: Any = None

    def start(self) -> Services:
        from chatd.process.embedded import EmbeddedServices

        self._embedded = EmbeddedServices(str(self.data_dir), self.database_url, self.redis_url)
        self.database_url, self.redis_url = self._embedded.start()
        return self

    def stop(self) -> None:
        if self._embedded is not None:
            self._embedded.stop()
            self._embedded = None

    def pids(self) -> list[int]:
        """Postgres postmaster (+ its children) and valkey-server, when embedded."""
        out: list[int] = []
        emb = self._embedded
        if emb is None:
            return out
        if emb.postgres is not None:
            pid = emb.postgres.running_pid()
            if pid:
                out += [pid, *descendants(pid)]
        if emb.valkey is not None and emb.valkey._process is not None:
            out.append(emb.valkey._process.pid)
        return out


def with_database(url: str, dbname: str) -> str:
    from psycopg.conninfo import conninfo_to_dict, make_conninfo

    params = conninfo_to_dict(url)
    params["dbname"] = dbname
    return make_conninfo("", **params)


def create_database(admin_url: str, prefix: str = "lt") -> str:
    """A fresh, migrated database on the same server; returns its URL."""
    import psycopg

    from chatd.storage import migrations

    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(with_database(admin_url, "postgres"), autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = with_database(admin_url, name)
    migrations.apply(url)
    return url


# -- users and rooms ------------------------------------------------------------------


@cache
def _password_hash() -> str:
    from chatd.services.credentials import hash_password

    return hash_password(PASSWORD)


@dataclass(frozen=True)
class User:
    id: int
    email: str
    token: str


def mint_tokens(user_ids: Sequence[int], secret: str = JWT_SECRET, ttl_s: int = 4 * 3600) -> list[str]:
    from chatd.process.config import AuthSettings
    from chatd.services.tokens import TokenService

    service = TokenService(AuthSettings(jwt_secret=secret, access_ttl_s=ttl_s))
    return [service.mint(uid, "user", "access")[0] for uid in user_ids]


def make_users(
    database_url: str, n: int, secret: str = JWT_SECRET, ttl_s: int = 4 * 3600, tag: str | None = None
) -> list[User]:
    """``n`` active users (password ``PASSWORD``) with access tokens, in one INSERT."""
    import psycopg

    tag = tag or uuid.uuid4().hex[:8]
    emails = [f"lt{i}-{tag}@example.com" for i in range(n)]
    with psycopg.connect(database_url) as conn:
        rows = conn.execute(
            "INSERT INTO users (email, name, password_hash)"
            " SELECT e, split_part(e, '@', 1), %s FROM unnest(%s::text[]) AS e RETURNING id, email",
            (_password_hash(), emails),
        ).fetchall()
    by_email = {email: uid for uid, email in rows}
    ids = [by_email[e] for e in emails]
    tokens = mint_tokens(ids, secret, ttl_s)
    return [User(uid, e, tok) for uid, e, tok in zip(ids, emails, tokens, strict=True)]


def make_rooms(
    database_url: str, groups: Sequence[Sequence[int]], kind: str = "group", name: str = "lt"
) -> list[int]:
    """One room per group of user ids (the first is the owner); returns the room ids in order."""
    import psycopg
    from psycopg.types.json import Jsonb

    if not groups:
        return []
    assistant = Jsonb({"mode": "always"}) if kind == "assistant" else None
    owners = [g[0] for g in groups]
    with psycopg.connect(database_url) as conn:
        rows = conn.execute(
            "INSERT INTO rooms (name, kind, owner_id, assistant)"
            " SELECT %s::text || '-' || o.ord, %s::text, o.owner, %s::jsonb"
            " FROM unnest(%s::bigint[]) WITH ORDINALITY AS o(owner, ord)"
            " ORDER BY o.ord RETURNING id",
            (name, kind, assistant, owners),
        ).fetchall()
        room_ids = sorted(r[0] for r in rows)  # identity values follow the insert order
        room_col: list[int] = []
        user_col: list[int] = []
        role_col: list[str] = []
        for rid, members in zip(room_ids, groups, strict=True):
            for j, uid in enumerate(members):
                room_col.append(rid)
                user_col.append(uid)
                role_col.append("owner" if j == 0 else "member")
        conn.execute(
            "INSERT INTO room_members (room_id, user_id, role)"
            " SELECT * FROM unnest(%s::bigint[], %s::bigint[], %s::text[])",
            (room_col, user_col, role_col),
        )
    return room_ids


def chunked(seq: Sequence[Any], size: int) -> list[list[Any]]:
    return [list(seq[i : i + size]) for i in range(0, len(seq), size)]


# -- /proc ------------------------------------------------------------------------------


def children(pid: int) -> list[int]:
    out: list[int] = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            try:
                out += [int(p) for p in Path(f"/proc/{pid}/task/{tid}/children").read_text().split()]
            except OSError:
                pass
    except OSError:
        pass
    return out


def descendants(pid: int) -> list[int]:
    out: list[int] = []
    todo = children(pid)
    while todo:
        p = todo.pop()
        out.append(p)
        todo += children(p)
    return out


def proc_cpu_seconds(pid: int) -> float:
    """utime + stime of one process (all its threads)."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    parts = raw[raw.rindex(")") + 2 :].split()
    return (int(parts[11]) + int(parts[12])) / CLK_TCK  # fields 14 and 15 of stat(5)


def proc_rss_bytes(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE
    except (OSError, IndexError, ValueError):
        return 0


def proc_fds(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return 0


# -- server processes -------------------------------------------------------------------------


def http_get(url: str, timeout_s: float = 2.0) -> tuple[int, Any]:
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as resp:
            body = resp.read()
            try:
                return resp.status, json.loads(body or b"null")
            except ValueError:
                return resp.status, body
    except urllib.error.HTTPError as exc:
        return exc.code, None
    except (OSError, ValueError):
        return 0, None


@dataclass
class ServerProcess:
    """One server under test: a command, a port, a health URL, an optional CPU pinning."""

    name: str
    argv: list[str]
    port: int
    env: Mapping[str, str]
    log_path: Path
    health_path: str = "/health/ready"
    cpus: str | None = None  # taskset -c list, e.g. "0"
    proc: subprocess.Popen[bytes] | None = None
    extra_procs: list[subprocess.Popen[bytes]] = field(default_factory=list)  # more processes of the same server
    copies: int = 1  # processes started with the same argv (SO_REUSEPORT servers)

    def start(self, timeout_s: float = 90) -> ServerProcess:
        argv = list(self.argv)
        if self.cpus is not None and shutil.which("taskset"):
            argv = ["taskset", "-c", self.cpus, *argv]
        env = dict(self.env)
        self._log = self.log_path.open("ab")
        for i in range(self.copies):
            proc = subprocess.Popen(
                argv,
                cwd=ROOT,
                env=env,
                stdout=self._log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            if i == 0:
                self.proc = proc
            else:
                self.extra_procs.append(proc)
        self.wait_ready(timeout_s)
        return self

    def wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        url = f"http://127.0.0.1:{self.port}{self.health_path}"
        while time.monotonic() < deadline:
            for p in self.processes():
                if p.poll() is not None:
                    raise RuntimeError(f"{self.name} exited with {p.returncode}:\n{self.log_tail()}")
            status, _ = http_get(url, 1.0)
            if status == 200:
                if self.copies > 1:
                    time.sleep(0.5)  # the other copies bind within the same moment; give them a beat
                return
            time.sleep(0.1)
        raise TimeoutError(f"{self.name} not ready within {timeout_s}s:\n{self.log_tail()}")

    def processes(self) -> list[subprocess.Popen[bytes]]:
        return [p for p in [self.proc, *self.extra_procs] if p is not None]

    def pids(self) -> list[int]:
        """Every process of the server: the started ones and their descendants (workers)."""
        out: list[int] = []
        for p in self.processes():
            if p.poll() is None:
                out += [p.pid, *descendants(p.pid)]
        return out

    def cpu_seconds(self) -> float:
        return sum(proc_cpu_seconds(pid) for pid in self.pids())

    def rss_bytes(self) -> int:
        return sum(proc_rss_bytes(pid) for pid in self.pids())

    def log_tail(self, n: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def stop(self, timeout_s: float = 30) -> None:
        for p in self.processes():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        for p in self.processes():
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        if hasattr(self, "_log"):
            self._log.close()


def chatd_env(
    database_url: str, redis_url: str, prefix: str, extra: Mapping[str, str] | None = None
) -> dict[str, str]:
    """Environment of a chatd under load: limits lifted for benchmarking, quiet logs."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHATD_")}
    env.update(
        {
            "DATABASE_URL": database_url,
            "REDIS_URL": redis_url,
            "JWT_SECRET": JWT_SECRET,
            "CHATD_STORAGE_REDIS_KEY_PREFIX": prefix,
            "CHATD_LOG_FORMAT": "json",
            "CHATD_LOG_ACCESS_LOG": "false",  # one line per WebSocket upgrade otherwise
            "CHATD_SERVER_SHUTDOWN_GRACE_S": "15",
            "CHATD_SERVER_DRAIN_TIMEOUT_S": "5",
            "CHATD_WS_SEND_RATE_COUNT": "1000000",  # the 20 msg / 10 s per-user limit would cap the workload
            "CHATD_AUTH_AUTH_ATTEMPTS_PER_MIN": "1000000",
            "PYTHONUNBUFFERED": "1",
        }
    )
    env.update(extra or {})
    # A setting under study: BENCH_CHATD_WS_BATCH_MAX_MESSAGES=64 reaches chatd as CHATD_WS_BATCH_MAX_MESSAGES.
    env.update({k[len("BENCH_") :]: v for k, v in os.environ.items() if k.startswith("BENCH_CHATD_")})
    return env


def chatd_server(
    name: str,
    workers: int,
    database_url: str,
    redis_url: str,
    log_dir: Path,
    cpus: str | None = None,
    extra_env: Mapping[str, str] | None = None,
    port: int | None = None,
) -> ServerProcess:
    port = port or free_port()
    env = chatd_env(database_url, redis_url, f"lt{uuid.uuid4().hex[:6]}:", extra_env)
    if workers > 1:
        env.setdefault("CHATD_SERVER_REUSE_PORT", "true")  # kernel spreads connections evenly over workers
    argv = [sys.executable, "-m", "chatd", "serve", "--port", str(port), "--workers", str(workers)]
    return ServerProcess(name, argv, port, env, log_dir / f"{name}.log", cpus=cpus)


# -- machine and versions ---------------------------------------------------------------------


def machine_info() -> dict[str, Any]:
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_kib = 0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_kib = int(line.split()[1])
    except OSError:
        pass
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)

    def read(path: str) -> str:
        try:
            return Path(path).read_text().strip()
        except OSError:
            return ""

    return {
        "cpu_model": cpu,
        "cores": os.cpu_count(),
        "ram_gib": round(mem_kib / 1024 / 1024, 1),
        "kernel": platform.release(),
        "os": platform.platform(),
        "nofile_soft": soft,
        "nofile_hard": hard,
        "ip_local_port_range": read("/proc/sys/net/ipv4/ip_local_port_range").replace("\t", "-"),
        "somaxconn": read("/proc/sys/net/core/somaxconn"),
    }


def versions() -> dict[str, str]:
    from importlib import metadata

    out = {"python": platform.python_version()}
    for dist in ("chatd", "tornado", "uvloop", "redis", "hiredis", "psycopg", "psycopg-pool",
                 "websockets", "python-socketio", "python-engineio", "aiohttp", "locust", "websocket-client"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return out


def git_revision() -> str:
    try:
        rev = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, timeout=5,
        ).stdout.strip()
        return rev + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return ""
