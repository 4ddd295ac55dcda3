"""systemd: the unit verifies, and chatd speaks the notify protocol (and takes an activated socket).

The notify tests play systemd's part: a unix datagram socket the test reads,
named by NOTIFY_SOCKET, exactly as systemd passes it to a Type=notify service.
"""

from __future__ import annotations

import itertools
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Services
from tests.support import JWT_SECRET, ROOT, Chatd, free_port, http_get
from tests.system_packages import ensure_binary

UNIT_DIR = ROOT / "systemd"
INSTALLED_CHATD = "/opt/chatd/.venv/bin/chatd"  # where docs/DEPLOY.md installs it


# -- the unit files ------------------------------------------------------------------------------


def test_units_verify(tmp_path: Path) -> None:
    analyze = ensure_binary("systemd-analyze", "systemd")
    service = (UNIT_DIR / "chatd.service").read_text()
    # verify checks that ExecStart= exists: point it at this checkout's chatd, nothing else changes.
    assert service.count(INSTALLED_CHATD) >= 1
    local = Path(sys.executable).parent / "chatd"
    assert local.exists(), local
    (tmp_path / "chatd.service").write_text(service.replace(INSTALLED_CHATD, str(local)))
    (tmp_path / "chatd.socket").write_text((UNIT_DIR / "chatd.socket").read_text())
    result = subprocess.run(
        [analyze, "verify", "--man=no", str(tmp_path / "chatd.service"), str(tmp_path / "chatd.socket")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    # verify exits 0 on unknown keys and bad values too: any output is a finding.
    assert result.returncode == 0 and not result.stdout.strip() and not result.stderr.strip(), result


def unit_settings(text: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        if line and not line.startswith(("#", "[")) and "=" in line:
            key, _, value = line.partition("=")
            out.setdefault(key.strip(), []).append(value.strip())
    return out


def test_unit_matches_what_chatd_does() -> None:
    """The values the unit relies on agree with chatd's behaviour and defaults."""
    from chatd.process.config import ServerSettings

    unit = unit_settings((UNIT_DIR / "chatd.service").read_text())
    assert unit["Type"] == ["notify"] and unit["NotifyAccess"] == ["main"]
    assert unit["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert unit["KillMode"] == ["mixed"] and unit["KillSignal"] == ["SIGTERM"]
    assert float(unit["TimeoutStopSec"][0]) > ServerSettings().shutdown_grace_s + 10  # grace + databases' stop
    assert int(unit["LimitNOFILE"][0]) >= 65536
    assert unit["EnvironmentFile"] == ["/etc/chatd/chatd.env"]
    assert unit["StateDirectory"] == ["chatd"] and unit["User"] == ["chatd"]
    for hardening in ("NoNewPrivileges", "ProtectSystem", "PrivateTmp", "ProtectHome", "RestrictAddressFamilies"):
        assert hardening in unit, hardening
    assert unit["SystemCallFilter"] == ["@system-service"]
    watchdog_s = float(unit["WatchdogSec"][0])
    assert watchdog_s >= 10  # the master pings every WatchdogSec/2, also during a rolling restart


# -- the notify protocol ----------------------------------------------------------------------------


class NotifySocket:
    """What systemd does for a Type=notify unit: a datagram socket, every message recorded with its time."""

    def __init__(self, abstract: bool, tmp_path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        if abstract:
            name = f"chatd-test-{uuid.uuid4().hex}"
            self.sock.bind("\0" + name)
            self.env_value = "@" + name
        else:
            path = tmp_path / "notify.sock"
            self.sock.bind(str(path))
            self.env_value = str(path)
        self.sock.settimeout(0.2)
        self.messages: list[tuple[float, dict[str, str]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            fields = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
            self.messages.append((time.monotonic(), fields))

    def wait_for(self, predicate: Callable[[dict[str, str]], bool], after: int = 0, timeout_s: float = 60) -> int:
        """Index of the first message from ``after`` on that matches."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for i, (_, fields) in enumerate(self.messages[after:], start=after):
                if predicate(fields):
                    return i
            time.sleep(0.05)
        raise AssertionError(f"no matching notify message; got {[m for _, m in self.messages[after:]]}")

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.sock.close()


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[NotifySocket]:
    ns = NotifySocket(abstract=True, tmp_path=tmp_path)
    yield ns
    ns.close()


def ready(m: dict[str, str]) -> bool:
    return m.get("READY") == "1"


def pings_between(ns: NotifySocket, start: int, end: int) -> int:
    return sum(1 for _, m in ns.messages[start:end] if m.get("WATCHDOG") == "1")


def wait_pings(ns: NotifySocket, after: int, count: int, timeout_s: float = 15) -> float:
    """Until ``count`` pings came after message ``after``; the median gap between them (s).

    Counting pings in a fixed window needs a punctual timer, which a loaded machine does not have; the median
    gap shows the rate (WatchdogSec / 2) while one late ping does not move it.
    """
    deadline = time.monotonic() + timeout_s
    while pings_between(ns, after, len(ns.messages)) < count:
        assert time.monotonic() < deadline, f"fewer than {count} watchdog pings in {timeout_s} s"
        time.sleep(0.05)
    at = [t for t, m in ns.messages[after:] if m.get("WATCHDOG") == "1"]
    return statistics.median(b - a for a, b in itertools.pairwise(at)) if len(at) > 1 else 0.0


def test_notify_ready_status_reload_watchdog_stopping(chatd_factory: Any, notify_socket: NotifySocket) -> None:
    ns = notify_socket
    server: Chatd = chatd_factory(
        workers=2,
        start=False,
        NOTIFY_SOCKET=ns.env_value,
        WATCHDOG_USEC="1000000",  # WatchdogSec=1: a ping every 0.5 s
        CHATD_SERVER_WORKER_HEARTBEAT_TIMEOUT_S="3",
    )
    server.start()
    assert server.proc is not None

    first_ready = ns.wait_for(ready)
    starting = [m.get("STATUS", "") for _, m in ns.messages[:first_ready]]
    assert any(s.startswith("starting") for s in starting), starting  # STATUS before READY
    assert ns.messages[first_ready][1]["STATUS"].startswith("serving: 2/2 workers")
    # READY=1 only once every worker accepts connections.
    assert len(server.events("worker_started")) == 2
    assert http_get(server.http + "/health/live")[0] == 200

    # WatchdogSec=1: systemd kills a unit silent that long; chatd pings every 0.5 s.
    assert wait_pings(ns, first_ready, 5) < 1.0

    # SIGHUP: RELOADING=1 with CLOCK_MONOTONIC in microseconds, then READY=1 when the new workers serve.
    before_us = time.monotonic_ns() // 1000
    server.signal(signal.SIGHUP)
    reloading = ns.wait_for(lambda m: m.get("RELOADING") == "1", after=first_ready)
    assert before_us <= int(ns.messages[reloading][1]["MONOTONIC_USEC"]) <= time.monotonic_ns() // 1000
    ready_again = ns.wait_for(ready, after=reloading)
    assert server.events("rolling_restart_done")
    assert pings_between(ns, reloading, ready_again) >= 1  # the watchdog is fed during the restart too

    # A hung worker (stopped event loop) is killed and replaced; the pings go on.
    victim = server.worker_pids()[0]
    os.kill(victim, signal.SIGSTOP)
    deadline = time.monotonic() + 20
    while not server.events("worker_hung") and time.monotonic() < deadline:
        time.sleep(0.1)
    assert victim in [e["worker_pid"] for e in server.events("worker_hung")]
    deadline = time.monotonic() + 20
    while (len(server.worker_pids()) != 2 or victim in server.worker_pids()) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert victim not in server.worker_pids() and len(server.worker_pids()) == 2
    wait_pings(ns, len(ns.messages), 1)

    status_lines = [m["STATUS"] for _, m in ns.messages if "STATUS" in m]
    assert any(re.match(r"serving: 2/2 workers, \d+ connections", s) for s in status_lines), status_lines

    assert server.stop() == 0
    stopping = ns.wait_for(lambda m: m.get("STOPPING") == "1", after=ready_again, timeout_s=5)
    assert first_ready < reloading < ready_again < stopping
    assert not any(ready(m) for _, m in ns.messages[stopping:])


def test_notify_in_process_worker(chatd_factory: Any, notify_socket: NotifySocket) -> None:
    """``--workers 1``: the single process is the main process and notifies itself."""
    ns = notify_socket
    server: Chatd = chatd_factory(workers=1, NOTIFY_SOCKET=ns.env_value, WATCHDOG_USEC="600000")
    first_ready = ns.wait_for(ready)
    assert wait_pings(ns, first_ready, 5) < 0.6  # WatchdogSec=0.6: a ping every 0.3 s
    assert server.stop() == 0
    ns.wait_for(lambda m: m.get("STOPPING") == "1", after=first_ready, timeout_s=5)


def test_watchdog_pid_of_another_process_means_no_pings(chatd_factory: Any, notify_socket: NotifySocket) -> None:
    ns = notify_socket
    server: Chatd = chatd_factory(workers=2, NOTIFY_SOCKET=ns.env_value, WATCHDOG_USEC="400000", WATCHDOG_PID="1")
    first_ready = ns.wait_for(ready)
    time.sleep(1.0)
    assert pings_between(ns, 0, len(ns.messages)) == 0
    assert first_ready >= 0
    server.stop()


def test_notifier_path_socket(tmp_path: Path) -> None:
    """A filesystem NOTIFY_SOCKET (the other form systemd uses), and no socket at all."""
    from chatd.process.notify import Notifier

    ns = NotifySocket(abstract=False, tmp_path=tmp_path)
    try:
        notifier = Notifier({"NOTIFY_SOCKET": ns.env_value, "WATCHDOG_USEC": "2000000"})
        assert notifier.enabled and notifier.watchdog_interval_s == 1.0
        notifier.ready("serving")
        notifier.watchdog()
        ns.wait_for(lambda m: m.get("WATCHDOG") == "1")
        assert ns.messages[0][1] == {"READY": "1", "STATUS": "serving"}
    finally:
        ns.close()
    silent = Notifier({})
    assert not silent.enabled and silent.watchdog_interval_s is None
    silent.ready("nothing happens")  # no socket: a no-op


# -- socket activation ----------------------------------------------------------------------------


def test_socket_activation(services: Services, tmp_path: Path) -> None:
    """LISTEN_FDS/LISTEN_PID as systemd sets them (chatd.socket): chatd serves on the socket it was given."""
    listener = socket.create_server(("127.0.0.1", 0), backlog=128)
    port = listener.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHATD_")}
    env.update(
        {
            "DATABASE_URL": services.database_url,
            "REDIS_URL": services.redis_url,
            "JWT_SECRET": JWT_SECRET,
            "CHATD_SERVER_PORT": str(free_port()),  # ignored: the activated socket wins
            "PYTHONUNBUFFERED": "1",
        }
    )
    fd = listener.fileno()
    # As systemd does: the socket at fd 3, LISTEN_PID = the pid that exec keeps.
    script = (
        "import os, sys; fd = int(sys.argv[1]); os.dup2(fd, 3); fd != 3 and os.close(fd);"
        " os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS='1');"
        " os.execv(sys.executable, [sys.executable, '-m', 'chatd', 'serve', '--workers', '2'])"
    )
    log = (tmp_path / "serve.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-c", script, str(fd)], cwd=ROOT, env=env, pass_fds=(fd,), stdout=log, stderr=log
    )
    listener.close()  # chatd holds it now
    try:
        deadline = time.monotonic() + 60
        while http_get(f"http://127.0.0.1:{port}/health/ready")[0] != 200:
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            assert time.monotonic() < deadline
            time.sleep(0.2)
        assert "socket_activated" in (tmp_path / "serve.log").read_text()
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        log.close()
