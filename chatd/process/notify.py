"""systemd integration without libsystemd: the notify protocol and socket activation.

Notify (sd_notify(3)): one datagram of newline-separated ``KEY=VALUE`` lines
to the unix socket named by ``$NOTIFY_SOCKET`` (a leading ``@`` names the
abstract namespace).  Without the variable every call is a no-op, so the same
code runs under systemd, in a container and in a terminal.  The protocol is
these few lines; the one small library for it (``sdnotify``) swallows every
error and has not changed since 2017.

Socket activation (sd_listen_fds(3)): systemd passes listening sockets as
fds 3.. and names this process in ``$LISTEN_PID``.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Mapping

from chatd.process.logs import fields, server_log

_LISTEN_FDS_START = 3


class Notifier:
    """Messages to systemd from the main process (``NotifyAccess=main``)."""

    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        env = os.environ if env is None else env
        path = env.get("NOTIFY_SOCKET", "")
        self._addr = "\0" + path[1:] if path.startswith("@") else path
        self._sock: socket.socket | None = None
        if path.startswith(("/", "@")):
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self._failed = False
        # Ping at half the timeout, as sd_watchdog_enabled(3) recommends; WATCHDOG_PID names the process meant.
        self.watchdog_interval_s: float | None = None
        usec, pid = env.get("WATCHDOG_USEC", ""), env.get("WATCHDOG_PID", "")
        if usec.isdigit() and int(usec) > 0 and (not pid or (pid.isdigit() and int(pid) == os.getpid())):
            self.watchdog_interval_s = int(usec) / 1e6 / 2
        self._last_ping = 0.0
        self._last_status = ""

    @property
    def enabled(self) -> bool:
        return self._sock is not None

    def send(self, *lines: str) -> None:
        if self._sock is None:
            return
        try:
            self._sock.sendto("\n".join(lines).encode(), self._addr)
        except OSError as exc:
            if not self._failed:  # once: a gone socket would otherwise log on every ping
                self._failed = True
                server_log.warning("sd_notify_failed", extra=fields(socket=self._addr, error=str(exc)))

    def ready(self, status: str) -> None:
        self._last_status = status
        self.send("READY=1", f"STATUS={status}")

    def reloading(self) -> None:
        # MONOTONIC_USEC: CLOCK_MONOTONIC when the reload began (systemd >= 253 requires it with RELOADING=1).
        self.send("RELOADING=1", f"MONOTONIC_USEC={time.monotonic_ns() // 1000}", "STATUS=reloading: rolling restart")

    def stopping(self, status: str) -> None:
        self.send("STOPPING=1", f"STATUS={status}")

    def status(self, status: str) -> None:
        if status != self._last_status:
            self._last_status = status
            self.send(f"STATUS={status}")

    def watchdog_due(self) -> bool:
        interval = self.watchdog_interval_s
        return interval is not None and time.monotonic() - self._last_ping >= interval

    def watchdog(self) -> None:
        self._last_ping = time.monotonic()
        self.send("WATCHDOG=1")


def listen_fds(env: Mapping[str, str] | None = None) -> list[socket.socket]:
    """Listening sockets passed by systemd (``chatd.socket``), or [] when not socket-activated."""
    env = os.environ if env is None else env
    pid, count = env.get("LISTEN_PID", ""), env.get("LISTEN_FDS", "")
    if not (pid.isdigit() and int(pid) == os.getpid() and count.isdigit()):
        return []
    sockets = []
    for fd in range(_LISTEN_FDS_START, _LISTEN_FDS_START + int(count)):
        sock = socket.socket(fileno=fd)
        sock.setblocking(False)
        sockets.append(sock)
    for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):  # not for our children
        os.environ.pop(name, None)
    return sockets
