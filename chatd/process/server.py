"""The process tree: a master that owns the socket and the embedded services, and its workers.

Master (no event loop, no pool, no client before the fork: Tornado's rule)::

    load config -> start embedded Postgres/Valkey if needed -> migrate
    -> bind the listening socket -> fork N workers -> supervise

Supervision: a worker that dies is replaced after a backoff; SIGTERM/SIGINT
stops the tree within ``shutdown_grace_s``; SIGHUP replaces the workers one
by one (new one serving before the old one drains) without closing the
listening socket.  ``--workers 1`` runs the worker in the master's process.

Worker shutdown, in order (as uvicorn; ``app.Worker.shutdown``): stop
accepting and reading, commit and answer every send already read, close
WebSockets with 1001, wait for in-flight requests up to ``drain_timeout_s``,
cancel the rest of the background tasks, close the pools.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import select
import signal
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from chatd.process import config as config_mod
from chatd.process import logs, metrics
from chatd.process.config import Settings
from chatd.process.embedded import DataDirInUse, EmbeddedServices, die_with_parent
from chatd.process.logs import fields, server_log
from chatd.process.notify import Notifier, listen_fds
from chatd.storage import migrations

_HEALTHY_AFTER_S = 30.0  # a worker that lived this long resets its crash backoff


def effective_workers(settings: Settings) -> int:
    return settings.server.workers or (os.cpu_count() or 1)


def dev_secret(data_dir: str) -> str:
    """dev_mode without JWT_SECRET: one random secret kept in data_dir, shared by all workers."""
    return secret_file(Path(data_dir) / "jwt_secret")


def secret_file(path: Path) -> str:
    """The secret in ``path``; a new random one (mode 600) if the file does not exist."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(secrets.token_urlsafe(48))
        server_log.warning("jwt_secret_generated", extra=fields(path=str(path)))
    return path.read_text().strip()


def bind(settings: Settings, reuse_port: bool = False) -> list[socket.socket]:
    from tornado.netutil import bind_sockets

    srv = settings.server
    return bind_sockets(srv.port, srv.host, backlog=srv.backlog, reuse_port=reuse_port)


# -- worker -------------------------------------------------------------------


async def _serve(settings: Settings, sockets: list[socket.socket], worker_id: int, ready_fd: int | None) -> None:
    from tornado.httpserver import HTTPServer

    from chatd.api.files import STREAMED_BODIES
    from chatd.api.web import RequestLimits
    from chatd.process.app import Worker

    worker = await Worker.create(settings, worker_id)
    worker.start()
    server = HTTPServer(
        RequestLimits(worker.application(), settings.server, STREAMED_BODIES),  # 413 / 431 in JSON, unbuffered
        xheaders=False,  # X-Forwarded-For is honoured per peer, from server.trusted_proxies only (chatd.web)
        idle_connection_timeout=settings.ws.idle_timeout_s,
        **RequestLimits.server_options(settings.server),  # body deadline; the caps are RequestLimits' own
    )
    if not sockets:  # reuse_port mode: each worker binds its own SO_REUSEPORT socket
        sockets = bind(settings, reuse_port=True)
    server.add_sockets(sockets)

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if ready_fd is None:  # in-process (--workers 1): no master to roll workers
        loop.add_signal_handler(
            signal.SIGHUP, lambda: server_log.warning("sighup_ignored", extra=fields(reason="single-process mode"))
        )
    server_log.info("worker_serving", extra=fields(worker_id=worker_id))
    if ready_fd is not None:
        _heartbeat(loop, ready_fd)
    else:
        _in_process_notify(loop)

    await stop.wait()
    if ready_fd is None:
        _notifier.stopping("stopping")
    await worker.shutdown(server)


def run_worker(settings: Settings, sockets: list[socket.socket], worker_id: int, ready_fd: int | None = None) -> int:
    import uvloop

    logs.set_worker(f"w{worker_id}")
    try:
        uvloop.run(_serve(settings, sockets, worker_id, ready_fd))
    except Exception:
        server_log.exception("worker_crashed", extra=fields(worker_id=worker_id))
        return 1
    return 0


# -- master -------------------------------------------------------------------

_HEARTBEAT_S = 1.0  # a worker writes one byte to its pipe this often
_TICK_S = 0.05  # the master's loop period
_STATUS_EVERY_S = 5.0
_notifier = Notifier({})  # replaced by serve() with the real one (a no-op outside systemd)


def _heartbeat(loop: asyncio.AbstractEventLoop, fd: int) -> None:
    """Worker side: "1" when serving, then a byte a second while the event loop runs (the master's hang check)."""
    os.set_blocking(fd, False)

    def beat() -> None:
        try:
            os.write(fd, b"1")
        except BlockingIOError:  # the master is busy: it knows we are alive from the earlier bytes
            pass
        except OSError:  # the master is gone
            return
        loop.call_later(_HEARTBEAT_S, beat)

    beat()


def _in_process_notify(loop: asyncio.AbstractEventLoop) -> None:
    """``--workers 1``: the one process is the main process; it tells systemd itself."""
    _notifier.ready("serving: 1 in-process worker")
    interval = _notifier.watchdog_interval_s
    if interval is None:
        return

    def ping() -> None:
        _notifier.watchdog()  # the loop runs: that is all there is to check here
        loop.call_later(interval, ping)

    ping()


def _open_connections() -> int | None:
    """Open WebSockets over all workers, from the multiprocess metric files (None without them)."""
    if not os.environ.get(metrics.ENV):
        return None
    from prometheus_client import CollectorRegistry, multiprocess

    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    total = 0.0
    for family in registry.collect():
        if family.name == "chatd_ws_connections":
            total += sum(sample.value for sample in family.samples)
    return int(total)


@dataclass
class _Slot:
    worker_id: int
    pid: int | None = None
    started_at: float = 0.0
    failures: int = 0
    restart_at: float | None = None
    beat_fd: int | None = None  # read end of the worker's heartbeat pipe
    last_beat: float = 0.0


@dataclass
class Master:
    settings: Settings
    sockets: list[socket.socket]
    n_workers: int
    services: EmbeddedServices | None = None
    notifier: Notifier = field(default_factory=lambda: Notifier({}))
    slots: dict[int, _Slot] = field(default_factory=dict)
    stopping: bool = False
    reload_requested: bool = False
    announced_ready: bool = False
    _next_status: float = 0.0
    _pipes: set[int] = field(default_factory=set)  # the master's read ends: no worker inherits them

    def _close_pipe(self, fd: int) -> None:
        os.close(fd)
        self._pipes.discard(fd)

    def _spawn(self, slot: _Slot) -> int:
        """Fork a worker for ``slot``; returns the read end of its readiness/heartbeat pipe."""
        read_fd, write_fd = os.pipe()
        pid = os.fork()
        if pid == 0:  # child
            for fd in (read_fd, *self._pipes):
                os.close(fd)
            # A worker never outlives the master (even a SIGKILLed one): SIGTERM is its graceful stop.
            die_with_parent(signal.SIGTERM)()
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD):
                signal.signal(sig, signal.SIG_DFL)
            # Ctrl-C reaches the whole process group: the master orchestrates instead.
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            code = 1
            try:
                code = run_worker(self.settings, self.sockets, slot.worker_id, write_fd)
            finally:
                os._exit(code)
        os.close(write_fd)
        self._pipes.add(read_fd)
        slot.pid, slot.started_at, slot.restart_at = pid, time.monotonic(), None
        return read_fd

    def _ready(self, slot: _Slot, read_fd: int) -> bool:
        ready = self._await_ready(read_fd, timeout_s=30)
        if ready:
            slot.beat_fd, slot.last_beat = read_fd, time.monotonic()
            server_log.info("worker_started", extra=fields(worker_id=slot.worker_id, worker_pid=slot.pid))
            return True
        self._close_pipe(read_fd)
        if not self.stopping:
            server_log.error("worker_not_ready", extra=fields(worker_id=slot.worker_id, worker_pid=slot.pid))
        if slot.pid is not None:  # hung in its start: replaced (with backoff) once reaped
            _kill(slot.pid, signal.SIGKILL)
        return False

    def _fork(self, slot: _Slot) -> bool:
        """Start a worker for ``slot``; True once it serves (False: it died or hung during start)."""
        return self._ready(slot, self._spawn(slot))

    def _await_ready(self, read_fd: int, timeout_s: float) -> bool:
        """Wait for the worker's first byte; EOF means it died. Keeps the loop's duties (and signals) going."""
        deadline = time.monotonic() + timeout_s
        while not self.stopping and time.monotonic() < deadline:
            ready, _, _ = select.select([read_fd], [], [], _TICK_S)
            if ready:
                return os.read(read_fd, 1) == b"1"
            self._tick(0)
        return False

    def _tick(self, timeout_s: float) -> None:
        """One pass of the master's duties: heartbeats (waiting up to ``timeout_s`` for them), watchdog, status."""
        fds = {s.beat_fd: s for s in self.slots.values() if s.beat_fd is not None}
        if fds:
            readable, _, _ = select.select(list(fds), [], [], timeout_s)
        else:
            readable = []
            time.sleep(timeout_s)
        now = time.monotonic()
        for fd in readable:
            slot = fds[fd]
            if os.read(fd, 4096):
                slot.last_beat = now
            else:  # EOF: the worker is gone; _reap handles it
                self._close_pipe(fd)
                slot.beat_fd = None
        hung_after = self.settings.server.worker_heartbeat_timeout_s
        healthy = True
        for slot in self.slots.values():
            if slot.beat_fd is None or now - slot.last_beat < hung_after:
                continue
            healthy = False
            if slot.pid is not None and not self.stopping:
                server_log.error(
                    "worker_hung",
                    extra=fields(worker_id=slot.worker_id, worker_pid=slot.pid, silent_s=round(now - slot.last_beat)),
                )
                _kill(slot.pid, signal.SIGKILL)
                slot.last_beat = now  # one kill; the reaper replaces it
        if healthy and self.notifier.watchdog_due():
            self.notifier.watchdog()
        if self.notifier.enabled and now >= self._next_status and not self.stopping:
            self._next_status = now + _STATUS_EVERY_S
            self._report_status()

    def _serving(self) -> int:
        return sum(1 for s in self.slots.values() if s.beat_fd is not None)

    def _report_status(self) -> None:
        connections = _open_connections()
        text = f"serving: {self._serving()}/{self.n_workers} workers"
        if connections is not None:
            text += f", {connections} connections"
        if self.announced_ready:
            self.notifier.status(text)
        elif self._serving() == self.n_workers:
            self.announced_ready = True
            self.notifier.ready(text)  # every worker accepts connections
        else:
            self.notifier.status(f"starting: {text}")

    def _on_signal(self, signum: int, _frame: object) -> None:
        if signum == signal.SIGHUP:
            self.reload_requested = True
        else:
            self.stopping = True

    def _reap(self) -> list[tuple[_Slot | None, int, int]]:
        dead = []
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            if self.services is not None and self.services.exited(pid, status):
                continue  # embedded Postgres/Valkey: restarted by services.supervise()
            slot = next((s for s in self.slots.values() if s.pid == pid), None)
            metrics.worker_died(pid)
            dead.append((slot, pid, status))
        return dead

    def _handle_deaths(self) -> None:
        for slot, pid, status in self._reap():
            if slot is None:
                continue  # an old worker of a rolling restart
            slot.pid = None
            if slot.beat_fd is not None:
                self._close_pipe(slot.beat_fd)
                slot.beat_fd = None
            if self.stopping:
                continue
            lived_s = time.monotonic() - slot.started_at
            slot.failures = 1 if lived_s > _HEALTHY_AFTER_S else slot.failures + 1
            backoff_s = min(self.settings.server.worker_restart_max_backoff_s, 0.1 * 2 ** (slot.failures - 1))
            slot.restart_at = time.monotonic() + backoff_s
            metrics.worker_restarts.inc()
            how = f"signal {os.WTERMSIG(status)}" if os.WIFSIGNALED(status) else f"exit code {os.WEXITSTATUS(status)}"
            server_log.error(
                "worker_died",
                extra=fields(
                    worker_id=slot.worker_id,
                    worker_pid=pid,
                    cause=how,
                    lived_s=round(lived_s, 1),
                    restart_in_s=backoff_s,
                ),
            )

    def _wait_exit(self, pid: int, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                done, _ = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                return True
            if done:
                return True
            if time.monotonic() >= deadline:
                return False
            self._tick(0.02)

    def _rolling_restart(self) -> None:
        server_log.info("rolling_restart_begin")
        self.notifier.reloading()
        try:
            for slot in list(self.slots.values()):
                if self.stopping:
                    return
                self.notifier.status(f"reloading: replacing worker {slot.worker_id + 1}/{self.n_workers}")
                old, old_fd = slot.pid, slot.beat_fd
                slot.beat_fd = None  # the old worker's heartbeats no longer matter
                if not self._fork(slot):  # the new worker serves before the old one stops
                    new = slot.pid
                    if new is not None:
                        _kill(new, signal.SIGKILL)
                        self._wait_exit(new, 5)
                    slot.pid, slot.beat_fd, slot.last_beat = old, old_fd, time.monotonic()  # keep the old one
                    server_log.error("rolling_restart_aborted", extra=fields(worker_id=slot.worker_id))
                    return
                if old_fd is not None:
                    self._close_pipe(old_fd)
                if old is not None:
                    _kill(old, signal.SIGTERM)
                    if not self._wait_exit(old, self.settings.server.shutdown_grace_s):
                        _kill(old, signal.SIGKILL)
                        self._wait_exit(old, 5)
                    metrics.worker_died(old)
            server_log.info("rolling_restart_done")
        finally:
            if not self.stopping:
                self._next_status = 0.0
                self.announced_ready = False  # READY=1 again once every worker serves: the reload is over
                self._report_status()

    def _terminate_all(self) -> None:
        pids = [s.pid for s in self.slots.values() if s.pid]
        server_log.info("shutdown_begin", extra=fields(workers=len(pids)))
        self.notifier.stopping(f"stopping: draining {len(pids)} workers")
        for pid in pids:
            _kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + self.settings.server.shutdown_grace_s
        remaining = set(pids)
        while remaining and time.monotonic() < deadline:
            remaining = {pid for pid in remaining if not self._wait_exit(pid, 0)}
            self._tick(0.02)
        for pid in remaining:
            server_log.warning("worker_killed_after_grace", extra=fields(worker_pid=pid))
            _kill(pid, signal.SIGKILL)
            self._wait_exit(pid, 5)

    def run(self) -> int:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, self._on_signal)
        self.notifier.status(f"starting {self.n_workers} workers")
        # Start every worker at once, then wait for each: start-up costs one worker's time, not N.
        pipes = []
        for worker_id in range(self.n_workers):
            self.slots[worker_id] = slot = _Slot(worker_id)
            pipes.append((slot, self._spawn(slot)))
        for slot, read_fd in pipes:
            self._ready(slot, read_fd)
        while not self.stopping:
            self._handle_deaths()
            if self.services is not None:
                self.services.supervise()
            if self.reload_requested:
                self.reload_requested = False
                self._rolling_restart()
            now = time.monotonic()
            for slot in self.slots.values():
                if slot.pid is None and slot.restart_at is not None and now >= slot.restart_at:
                    self._fork(slot)
            if not self.announced_ready and self._serving() == self.n_workers:
                self._report_status()
            self._tick(_TICK_S)
        self._terminate_all()
        return 0


def _kill(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


class StartupError(Exception):
    """A start that cannot succeed as configured: one line naming the problem and the fix (no traceback)."""


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0].rstrip(".") if text else type(exc).__name__


def _where(url: str) -> str:
    """Host and database of a Postgres URL, without credentials, for messages."""
    from psycopg.conninfo import conninfo_to_dict

    try:
        params = conninfo_to_dict(url)
    except Exception:
        return "(unparsable URL)"
    host, port, db = params.get("host") or "localhost", params.get("port") or "5432", params.get("dbname") or ""
    return f"{host}:{port}/{db}" if not str(host).startswith("/") else f"{host}/{db}"


def check_redis(url: str, timeout_s: float) -> str:
    """PING Redis once (master side, closed before any fork); where it answered, or StartupError naming REDIS_URL.

    With a ``sentinel://`` URL the sentinels are asked for the primary first, then the primary is PINGed.
    """
    import redis
    from redis.sentinel import Sentinel

    from chatd.storage import redisurl

    where = redisurl.where(url)
    clients: list[redis.Redis] = []  # every one closed here: nothing may be inherited by the workers
    try:
        if redisurl.is_sentinel(url):
            target = redisurl.parse_sentinel(url)
            sentinel = Sentinel(  # type: ignore[no-untyped-call]
                list(target.sentinels),
                sentinel_kwargs={
                    "socket_timeout": timeout_s,
                    "socket_connect_timeout": timeout_s,
                    "username": target.sentinel_username,
                    "password": target.sentinel_password,
                },
                socket_timeout=timeout_s,
                socket_connect_timeout=timeout_s,
                username=target.username,
                password=target.password,
                db=target.db,
            )
            clients += sentinel.sentinels
            try:
                host, port = sentinel.discover_master(target.master)  # type: ignore[no-untyped-call]
            except redis.RedisError as exc:
                raise StartupError(
                    f"no Redis primary found through Sentinel at {where}: {_first_line(exc)}; check REDIS_URL (the"
                    " sentinels' addresses and the master name of `sentinel monitor`) and that the sentinels are up"
                ) from None
            where = f"{where}, primary {host}:{port}"
            client = sentinel.master_for(target.master)  # type: ignore[no-untyped-call]
        else:
            client = redis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)
        clients.append(client)
        client.ping()
    except ValueError as exc:
        raise StartupError(f"REDIS_URL is not a Redis URL ({_first_line(exc)}); {redisurl.HINT}") from None
    except redis.RedisError as exc:
        raise StartupError(
            f"cannot reach Redis at {where}: {_first_line(exc)}; check REDIS_URL and that the server is up"
            " (or leave REDIS_URL empty for the embedded Valkey)"
        ) from None
    finally:
        for c in clients:
            c.close()
    return where


def check_postgres(url: str, timeout_s: float = 5) -> str:
    """Connect once; the server version, or StartupError naming DATABASE_URL."""
    import psycopg

    from chatd.storage import bootstrap

    try:
        return bootstrap.server_version(url, timeout_s)
    except psycopg.Error as exc:
        raise StartupError(
            f"cannot connect to PostgreSQL at {_where(url)}: {_first_line(exc)}; check DATABASE_URL and that the"
            " server is up (or leave DATABASE_URL empty for the embedded PostgreSQL)"
        ) from None


def _with_secret(settings: Settings) -> Settings:
    """The JWT secret from auth.jwt_secret_file, or dev_mode's generated one, when JWT_SECRET is empty."""
    auth = settings.auth
    if auth.jwt_secret:
        return settings
    if auth.jwt_secret_file:
        try:
            secret = secret_file(Path(auth.jwt_secret_file))
        except OSError as exc:
            raise StartupError(
                f"auth.jwt_secret_file {auth.jwt_secret_file}: {exc.strerror}; fix the path or its permissions"
            ) from None
        if len(secret.encode()) < config_mod.MIN_SECRET_BYTES and not settings.server.dev_mode:
            raise StartupError(
                f"auth.jwt_secret_file {auth.jwt_secret_file} holds fewer than {config_mod.MIN_SECRET_BYTES}"
                " bytes; put a longer secret in it (or delete it to have one generated)"
            )
        return config_mod.replace(settings, "auth", jwt_secret=secret)
    if settings.server.dev_mode:
        return config_mod.replace(settings, "auth", jwt_secret=dev_secret(settings.storage.data_dir))
    return settings


def prepare(
    settings: Settings, owner: bool = True, migrate: bool = True
) -> tuple[Settings, EmbeddedServices, list[str]]:
    """Master-side start: dev/file secret, embedded services, migrations. No loop, no pool.

    ``owner``: ``serve`` owns the embedded services; one-shot commands only borrow Postgres (and need no secret).
    Returns the settings with the effective URLs, the services to stop, and the migrations applied.
    """
    if owner:
        settings = _with_secret(settings)  # before any database starts: a bad secret file costs nothing
    storage = settings.storage
    services = EmbeddedServices(storage.data_dir, storage.database_url, storage.redis_url, owner=owner)
    try:
        database_url, redis_url = services.start()
    except DataDirInUse:
        raise
    except RuntimeError as exc:
        raise StartupError(
            f"the embedded databases did not start in {storage.data_dir}: {_first_line(exc)}; see the logs under"
            " that directory (postgres/server.log, valkey/valkey.log)"
        ) from None
    try:
        settings = config_mod.replace(settings, "storage", database_url=database_url, redis_url=redis_url)
        applied: list[str] = []
        if migrate:
            check_postgres(database_url)
            applied = migrations.apply(database_url)
        if owner:
            check_redis(redis_url, storage.redis_timeout_s)
    except BaseException:
        services.stop()
        raise
    return settings, services, applied


def _bind(settings: Settings) -> list[socket.socket]:
    """The listening socket(s): systemd's (socket activation), or bound here; StartupError naming the fix."""
    import errno

    activated = listen_fds()
    if activated:
        server_log.info("socket_activated", extra=fields(sockets=len(activated)))
        return activated
    srv = settings.server
    try:
        if srv.reuse_port:
            for probe in bind(settings, reuse_port=True):  # each worker binds its own: fail here, not in N workers
                probe.close()
            return []
        return bind(settings)
    except OSError as exc:
        where = f"{srv.host}:{srv.port}"
        if exc.errno == errno.EADDRINUSE:
            hint = "address already in use; stop the other process or choose another port (--port or server.port)"
        elif exc.errno == errno.EACCES:
            hint = "permission denied; ports below 1024 need root or CAP_NET_BIND_SERVICE, or choose --port 8080"
        elif exc.errno in (errno.EADDRNOTAVAIL, errno.EAFNOSUPPORT):
            hint = "no such address on this machine; check --host or server.host"
        else:
            hint = f"{exc.strerror or exc}; check --host/--port"
        raise StartupError(f"cannot listen on {where}: {hint}") from None
    except socket.gaierror as exc:  # pragma: no cover - an OSError subclass, kept for clarity
        raise StartupError(f"cannot listen on {srv.host}: {exc}; check --host or server.host") from None


def _exit_on_sigterm(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)  # unwinds through prepare(): what it started is stopped on the way out


def serve(settings: Settings) -> int:
    global _notifier
    # Until the master (or the in-process worker) takes over the signals: SIGTERM during the start
    # (initdb, migrations) stops what was started instead of leaving it to the parent-death signal.
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    _notifier = notifier = Notifier()
    for name in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
        os.environ.pop(name, None)  # the main process speaks for the tree
    sockets = _bind(settings)  # first: a taken port fails in milliseconds, before any database starts
    try:
        notifier.status("starting: databases and migrations")
        settings, services, _ = prepare(settings)
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    try:
        n = effective_workers(settings)
        server_log.info(
            "chatd_listening",
            extra=fields(host=settings.server.host, port=settings.server.port, workers=n),
        )
        if settings.server.workers == 1:  # in-process only when asked for: no master to supervise anything
            logs.set_worker("w0")
            return run_worker(settings, sockets, 0)
        return Master(settings, sockets, n, services, notifier).run()
    finally:
        logs.set_worker("master")
        services.stop()
        server_log.info("chatd_stopped")
        sys.stderr.flush()
