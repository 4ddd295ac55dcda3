"""Start-up: checks, embedded services, migrations, the listening socket; then the master or one worker.

``serve`` runs the tree: the master (``master``) or, with ``--workers 1``, one in-process worker
(``worker``).

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

import getpass
import os
import secrets
import signal
import socket
import sys
from pathlib import Path

from chatd.process import config as config_mod
from chatd.process import config_load, logs
from chatd.process.config import Settings
from chatd.process.embedded import DataDirInUse, EmbeddedServices
from chatd.process.logs import fields, server_log
from chatd.process.master import Master
from chatd.process.notify import Notifier, listen_fds
from chatd.process.worker import bind, run_worker
from chatd.storage import migrations


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


def postgres_where(url: str) -> str:
    """A Postgres URL (or conninfo) as a URL without its password: what ``check-config --connect`` reached."""
    from psycopg.conninfo import conninfo_to_dict

    try:
        params = conninfo_to_dict(url)
    except Exception:
        return "(unparsable URL)"
    user = params.get("user") or os.environ.get("PGUSER") or getpass.getuser()  # libpq's default
    db = params.get("dbname") or user
    host, port = str(params.get("host") or "localhost"), params.get("port")
    if host.startswith("/"):  # a unix socket directory
        return f"postgresql://{user}@/{db}?host={host}" + (f"&port={port}" if port else "")
    host = f"[{host}]" if ":" in host else host
    return f"postgresql://{user}@{host}:{port or 5432}/{db}"


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
        elif redisurl.is_cluster(url):
            from redis.cluster import ClusterNode, RedisCluster

            seeds = redisurl.parse_cluster(url)
            cluster = RedisCluster(
                startup_nodes=[ClusterNode(h, p) for h, p in seeds.nodes],  # type: ignore[no-untyped-call]
                username=seeds.username,
                password=seeds.password,
                socket_timeout=timeout_s,
                socket_connect_timeout=timeout_s,
            )
            try:  # every primary answers: the slot map is whole
                cluster.ping(target_nodes=RedisCluster.PRIMARIES)
                where = f"{where}, {len(cluster.get_primaries())} primaries"  # type: ignore[no-untyped-call]
            finally:
                cluster.close()
        else:
            client = redis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)
        if not redisurl.is_cluster(url):
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
    """The JWT secret from auth.jwt_secret_file, or dev_mode's generated one, when JWT_SECRET is empty.

    A short secret (dev_mode only: refused elsewhere) is logged as a warning.
    """
    settings = _read_secret(settings)
    warning = config_load.secret_warning(settings.auth.jwt_secret, settings.server.dev_mode)
    if warning:
        server_log.warning("jwt_secret_short", extra=fields(problem=warning))
    return settings


def _read_secret(settings: Settings) -> Settings:
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


def app_url(settings: Settings, sockets: list[socket.socket]) -> str:
    """Where a browser on this machine opens the web app (a wildcard address is reached on loopback)."""
    host, port = settings.server.host, settings.server.port
    name = sockets[0].getsockname() if sockets else None
    if isinstance(name, tuple):  # the bound (or systemd's) socket: its real port, also for --port 0
        host, port = str(name[0]), int(name[1])
    host = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
    return f"http://[{host}]:{port}/" if ":" in host else f"http://{host}:{port}/"


def _exit_on_sigterm(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)  # unwinds through prepare(): what it started is stopped on the way out


def serve(settings: Settings) -> int:
    # Until the master (or the in-process worker) takes over the signals: SIGTERM during the start
    # (initdb, migrations) stops what was started instead of leaving it to the parent-death signal.
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    notifier = Notifier()
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
        url = app_url(settings, sockets)
        if settings.server.workers == 1:  # in-process only when asked for: no master to supervise anything
            logs.set_worker("w0")
            return run_worker(settings, sockets, 0, notifier=notifier, url=url)
        return Master(settings, sockets, n, services, notifier, url=url).run()
    finally:
        logs.set_worker("master")
        services.stop()
        server_log.info("chatd_stopped")
        sys.stderr.flush()
