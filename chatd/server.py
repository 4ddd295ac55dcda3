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

from chatd import config as config_mod
from chatd import logs, metrics, migrations
from chatd.config import Settings
from chatd.embedded import EmbeddedServices
from chatd.logs import fields, server_log

_HEALTHY_AFTER_S = 30.0  # a worker that lived this long resets its crash backoff


def effective_workers(settings: Settings) -> int:
    return settings.server.workers or (os.cpu_count() or 1)


def dev_secret(data_dir: str) -> str:
    """dev_mode without JWT_SECRET: one random secret kept in data_dir, shared by all workers."""
    path = Path(data_dir) / "jwt_secret"
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        path.write_text(secrets.token_urlsafe(48))
        path.chmod(0o600)
    return path.read_text().strip()


def bind(settings: Settings, reuse_port: bool = False) -> list[socket.socket]:
    from tornado.netutil import bind_sockets

    srv = settings.server
    return bind_sockets(srv.port, srv.host, backlog=srv.backlog, reuse_port=reuse_port)


# -- worker -------------------------------------------------------------------


async def _serve(settings: Settings, sockets: list[socket.socket], worker_id: int, ready_fd: int | None) -> None:
    from tornado.httpserver import HTTPServer

    from chatd.app import Worker
    from chatd.web import RequestLimits

    worker = await Worker.create(settings, worker_id)
    worker.start()
    server = HTTPServer(
        RequestLimits(worker.application(), settings.server),  # 413 / 431 in JSON, before buffering
        xheaders=settings.server.trust_proxy_headers,
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
        os.write(ready_fd, b"1")
        os.close(ready_fd)

    await stop.wait()
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


@dataclass
class _Slot:
    worker_id: int
    pid: int | None = None
    started_at: float = 0.0
    failures: int = 0
    restart_at: float | None = None


@dataclass
class Master:
    settings: Settings
    sockets: list[socket.socket]
    n_workers: int
    slots: dict[int, _Slot] = field(default_factory=dict)
    stopping: bool = False
    reload_requested: bool = False

    def _spawn(self, slot: _Slot) -> int:
        """Fork a worker for ``slot``; returns the read end of its readiness pipe."""
        read_fd, write_fd = os.pipe()
        pid = os.fork()
        if pid == 0:  # child
            os.close(read_fd)
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
        slot.pid, slot.started_at, slot.restart_at = pid, time.monotonic(), None
        return read_fd

    def _ready(self, slot: _Slot, read_fd: int) -> bool:
        ready = self._await_ready(read_fd, slot.pid or 0, timeout_s=30)
        if ready:
            server_log.info("worker_started", extra=fields(worker_id=slot.worker_id, worker_pid=slot.pid))
        else:
            server_log.error("worker_not_ready", extra=fields(worker_id=slot.worker_id, worker_pid=slot.pid))
        return ready

    def _fork(self, slot: _Slot) -> bool:
        """Start a worker for ``slot``; True once it serves (False: it died or hung during start)."""
        return self._ready(slot, self._spawn(slot))

    @staticmethod
    def _await_ready(read_fd: int, pid: int, timeout_s: float) -> bool:
        try:
            ready, _, _ = select.select([read_fd], [], [], timeout_s)
            return bool(ready) and os.read(read_fd, 1) == b"1"
        except InterruptedError:  # pragma: no cover - PEP 475 retries select
            return False
        finally:
            os.close(read_fd)

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
            slot = next((s for s in self.slots.values() if s.pid == pid), None)
            metrics.worker_died(pid)
            dead.append((slot, pid, status))
        return dead

    def _handle_deaths(self) -> None:
        for slot, pid, status in self._reap():
            if slot is None:
                continue  # an old worker of a rolling restart
            slot.pid = None
            if self.stopping:
                continue
            lived_s = time.monotonic() - slot.started_at
            slot.failures = 1 if lived_s > _HEALTHY_AFTER_S else slot.failures + 1
            backoff_s = min(self.settings.server.worker_restart_max_backoff_s, 0.1 * 2 ** (slot.failures - 1))
            slot.restart_at = time.monotonic() + backoff_s
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
            time.sleep(0.02)

    def _rolling_restart(self) -> None:
        server_log.info("rolling_restart_begin")
        for slot in list(self.slots.values()):
            if self.stopping:
                return
            old = slot.pid
            if not self._fork(slot):  # the new worker serves before the old one stops
                new = slot.pid
                if new is not None:
                    os.kill(new, signal.SIGKILL)
                    self._wait_exit(new, 5)
                slot.pid = old  # keep the old one serving
                server_log.error("rolling_restart_aborted", extra=fields(worker_id=slot.worker_id))
                return
            if old is not None:
                os.kill(old, signal.SIGTERM)
                if not self._wait_exit(old, self.settings.server.shutdown_grace_s):
                    os.kill(old, signal.SIGKILL)
                    self._wait_exit(old, 5)
        server_log.info("rolling_restart_done")

    def _terminate_all(self) -> None:
        pids = [s.pid for s in self.slots.values() if s.pid]
        server_log.info("shutdown_begin", extra=fields(workers=len(pids)))
        for pid in pids:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + self.settings.server.shutdown_grace_s
        remaining = set(pids)
        while remaining and time.monotonic() < deadline:
            remaining = {pid for pid in remaining if not self._wait_exit(pid, 0)}
            time.sleep(0.02)
        for pid in remaining:
            server_log.warning("worker_killed_after_grace", extra=fields(worker_pid=pid))
            os.kill(pid, signal.SIGKILL)
            self._wait_exit(pid, 5)

    def run(self) -> int:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, self._on_signal)
        # Start every worker at once, then wait for each: start-up costs one worker's time, not N.
        pipes = []
        for worker_id in range(self.n_workers):
            self.slots[worker_id] = slot = _Slot(worker_id)
            pipes.append((slot, self._spawn(slot)))
        for slot, read_fd in pipes:
            self._ready(slot, read_fd)
        while not self.stopping:
            self._handle_deaths()
            if self.reload_requested:
                self.reload_requested = False
                self._rolling_restart()
            now = time.monotonic()
            for slot in self.slots.values():
                if slot.pid is None and slot.restart_at is not None and now >= slot.restart_at:
                    self._fork(slot)
            time.sleep(0.05)
        self._terminate_all()
        return 0


def prepare(settings: Settings, owner: bool = True) -> tuple[Settings, EmbeddedServices]:
    """Master-side start: embedded services, dev secret, migrations. No loop, no pool.

    ``owner``: ``serve`` owns the embedded services; one-shot commands only borrow Postgres.
    """
    storage = settings.storage
    services = EmbeddedServices(storage.data_dir, storage.database_url, storage.redis_url, owner=owner)
    database_url, redis_url = services.start()
    try:
        settings = config_mod.replace(settings, "storage", database_url=database_url, redis_url=redis_url)
        if settings.server.dev_mode and not settings.auth.jwt_secret:
            settings = config_mod.replace(settings, "auth", jwt_secret=dev_secret(storage.data_dir))
        migrations.apply(database_url)
    except BaseException:
        services.stop()
        raise
    return settings, services


def serve(settings: Settings) -> int:
    settings, services = prepare(settings)
    try:
        n = effective_workers(settings)
        sockets = [] if settings.server.reuse_port else bind(settings)
        server_log.info(
            "chatd_listening",
            extra=fields(host=settings.server.host, port=settings.server.port, workers=n),
        )
        if n == 1:
            logs.set_worker("w0")
            return run_worker(settings, sockets, 0)
        return Master(settings, sockets, n).run()
    finally:
        logs.set_worker("master")
        services.stop()
        server_log.info("chatd_stopped")
        sys.stderr.flush()
