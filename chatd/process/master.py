"""The master: forks the workers over the listening socket and supervises them; no event loop, no pool.

A worker that dies is replaced after a backoff; one whose heartbeat stops is killed and replaced;
SIGTERM/SIGINT stops the tree within ``shutdown_grace_s``; SIGHUP replaces the workers one by one (the
new one serving before the old one drains) without closing the listening socket.  It keeps systemd
told (READY, STATUS with the open connections, WATCHDOG).
"""

from __future__ import annotations

import os
import select
import signal
import socket
import struct
import time
from dataclasses import dataclass, field

from chatd.process import logs, metrics
from chatd.process.config import Settings
from chatd.process.embedded import EmbeddedServices, die_with_parent
from chatd.process.logs import fields, server_log
from chatd.process.notify import Notifier
from chatd.process.worker import run_worker

_HEALTHY_AFTER_S = 30.0  # a worker that lived this long resets its crash backoff
_TICK_S = 0.05  # the master's loop period
_STATUS_EVERY_S = 5.0


def _open_connections() -> int | None:
    """Open WebSockets over all workers, from the multiprocess metric files (None without them)."""
    if not os.environ.get(metrics.ENV):
        return None
    from prometheus_client import CollectorRegistry, multiprocess

    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    total = 0.0
    try:
        for family in registry.collect():
            if family.name == "chatd_ws_connections":
                total += sum(sample.value for sample in family.samples)
    except (struct.error, OSError, ValueError):
        # A worker starting creates its file empty and sizes it a moment later (seen: struct.error from an
        # empty file); one that exits removes it.  The count is for a status line: skip it this time.
        return None
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
    url: str = ""  # where the app is served, said once every worker serves (``logs.ready``)
    greeted: bool = False
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
            if not self.greeted and self._serving() == self.n_workers:
                self.greeted = True
                logs.ready(self.url)
            self._tick(_TICK_S)
        self._terminate_all()
        return 0


def _kill(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass

