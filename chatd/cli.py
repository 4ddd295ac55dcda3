"""``chatd`` command line: serve, migrate, check-config, create-user, config-doc, frames-schema, chat."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence

from chatd.core.errors import ConfigError
from chatd.process import config as config_mod
from chatd.process import config_load, logs
from chatd.process.config import Settings


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="chatd", description="Real-time chat server with an AI assistant.")
    sub = parser.add_subparsers(dest="command", required=True)

    def with_config(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument("--config", help="TOML file overriding config/chatd.toml (env CHATD_CONFIG)")
        return p

    serve = with_config(sub.add_parser("serve", help="run the server (master + workers)"))
    serve.add_argument("--workers", type=int, help="worker processes (0 = CPUs, 1 = in-process)")
    serve.add_argument("--port", type=int)
    serve.add_argument("--host")
    with_config(sub.add_parser("migrate", help="apply pending SQL migrations and exit"))
    check = with_config(sub.add_parser("check-config", help="print the effective config (secrets masked)"))
    check.add_argument("--connect", action="store_true", help="also connect to PostgreSQL and Redis")
    user = with_config(sub.add_parser("create-user", help="create a user (or reset its password)"))
    user.add_argument("--email", required=True)
    user.add_argument("--password", required=True)
    user.add_argument("--name", default="")
    user.add_argument("--admin", action="store_true")
    sub.add_parser("config-doc", help="print docs/CONFIG.md generated from the settings")
    sub.add_parser("frames-schema", help="print docs/client-frames.schema.json generated from the client frames")
    chat = sub.add_parser("chat", help="terminal client (CHATD_EMAIL / CHATD_PASSWORD, else prompts)")
    chat.add_argument("--url", default="http://127.0.0.1:8080", help="server base URL")
    chat.add_argument("--room", help="room to open (name or id)")
    chat.add_argument("--register", action="store_true", help="create the account first (name: CHATD_NAME)")
    return parser


def _load(args: argparse.Namespace) -> Settings:
    # migrate and create-user never sign a token: no JWT secret needed for them.
    need_secret = args.command in ("serve", "check-config")
    settings = config_load.load(getattr(args, "config", None), need_jwt_secret=need_secret)
    overrides = {k: getattr(args, k) for k in ("workers", "port", "host") if getattr(args, k, None) is not None}
    if overrides:
        settings = config_mod.replace(settings, "server", **overrides)
        config_load.validate(settings, need_jwt_secret=need_secret)
    return settings


def _prepare_metrics_dir(data_dir: str) -> None:
    """An empty directory for this run's Prometheus samples, shared by the workers.

    Set before chatd.server (and so prometheus-client) is imported: the client
    chooses between in-process and multiprocess storage at import time.
    """
    import shutil
    from pathlib import Path

    base = Path(data_dir)
    base.mkdir(parents=True, exist_ok=True)
    for old in base.glob("prometheus-*"):  # left by masters that are gone
        pid = old.name.rpartition("-")[2]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            shutil.rmtree(old, ignore_errors=True)
    path = base / f"prometheus-{os.getpid()}"  # per master: instances may share a data_dir
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir()
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(path)


def _fail(message: str, code: int) -> int:
    """The one way a command fails: one line on stderr naming the problem and the fix, no traceback."""
    print(f"chatd: {message}", file=sys.stderr)
    return code


def _check_connections(settings: Settings) -> int:
    """Connect to Postgres and Redis (the embedded ones if a ``chatd serve`` runs them); say where, errors last."""
    from chatd.process.embedded import EmbeddedPostgres, EmbeddedValkey
    from chatd.process.server import StartupError, check_postgres, check_redis, postgres_where
    from chatd.storage import redisurl

    sys.stdout.flush()  # the config first, also when stdout and stderr share a pipe
    storage = settings.storage
    errors: list[str] = []
    pg_url, pg_what = storage.database_url, ""
    if not pg_url:
        pg = EmbeddedPostgres(storage.data_dir)
        if pg.running_pid() is None:
            print(f"postgres: embedded, not running (chatd serve starts it in {pg.pgdata})", file=sys.stderr)
        else:
            pg_url, pg_what = pg.url, f"the embedded PostgreSQL in {pg.pgdata}"
    if pg_url:
        try:
            version = check_postgres(pg_url, storage.pg_timeout_s)
            where = pg_what or postgres_where(pg_url)
            print(f"postgres: ok, connected to {where} (PostgreSQL {version})", file=sys.stderr)
        except StartupError as exc:
            errors.append(str(exc))
    redis_url, redis_what = storage.redis_url, ""
    if not redis_url:
        valkey = EmbeddedValkey(storage.data_dir)
        if valkey.running_pid() is None:
            print(f"redis: embedded, not running (chatd serve starts Valkey in {valkey.dir})", file=sys.stderr)
        else:
            redis_url, redis_what = valkey.url, f"the embedded Valkey at {redisurl.where(valkey.url)}"
    if redis_url:
        try:
            where = check_redis(redis_url, storage.redis_timeout_s)
            print(f"redis: ok, connected to {redis_what or where}", file=sys.stderr)
        except StartupError as exc:
            errors.append(str(exc))
    for error in errors:  # last: what to fix is the end of the output
        _fail(error, 1)
    return 1 if errors else 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "config-doc":
        sys.stdout.write(config_load.reference_markdown())
        return 0
    if args.command == "frames-schema":
        from chatd.core import client_frames

        sys.stdout.write(client_frames.json_schema_text())
        return 0
    if args.command == "chat":  # a client: no server settings
        from chatd.client.terminal import main as chat

        return chat(args.url, args.room, args.register)
    try:
        return _run(args)
    except KeyboardInterrupt:
        return _fail("interrupted", 130)


def _run(args: argparse.Namespace) -> int:
    from chatd.core.errors import BadRequest

    try:
        settings = _load(args)
    except ConfigError as exc:
        return _fail(str(exc), 2)
    level = settings.log.level
    if args.command != "serve" and level == "info":
        level = "warning"  # one-shot commands: their answer, not the steps to it (log.level = debug shows them)
    logs.setup(level, settings.log.format, settings.log.access_log)

    if args.command == "check-config":
        print(json.dumps(config_load.as_dict(settings), indent=2))
        for warning in config_load.warnings(settings):
            print(f"warning: {warning}", file=sys.stderr)
        return _check_connections(settings) if args.connect else 0
    if args.command == "create-user":
        from chatd.services import credentials

        try:  # before any database starts: a typo costs nothing
            email, password = credentials.validate_email(args.email), credentials.validate_password(args.password)
        except BadRequest as exc:
            return _fail(f"create-user: {exc.message}; fix --email / --password", 2)

    if args.command == "serve":
        _prepare_metrics_dir(settings.storage.data_dir)  # before anything imports prometheus-client
    from chatd.process.embedded import DataDirInUse
    from chatd.process.server import StartupError

    if args.command == "serve":
        from chatd.process.server import serve

        try:
            return serve(settings)
        except DataDirInUse as exc:
            return _fail(str(exc), 2)
        except StartupError as exc:
            return _fail(str(exc), 1)
        finally:
            import shutil

            shutil.rmtree(os.environ["PROMETHEUS_MULTIPROC_DIR"], ignore_errors=True)

    import psycopg

    from chatd.process.server import prepare

    try:
        settings, services, applied = prepare(settings, owner=False)  # migrate is part of prepare
    except DataDirInUse as exc:
        return _fail(str(exc), 2)
    except StartupError as exc:
        return _fail(str(exc), 1)
    except psycopg.Error as exc:
        return _fail(f"migration failed: {str(exc).strip().splitlines()[0]}", 1)
    try:
        if args.command == "migrate":
            if applied:
                print(f"applied {len(applied)} migration(s): {', '.join(applied)}")
            else:
                print("database schema is up to date (nothing to apply)")
        elif args.command == "create-user":
            from chatd.services.accounts import create_user_sync

            try:
                user = create_user_sync(settings, email, password, args.name, admin=args.admin)
            except psycopg.Error as exc:
                return _fail(f"create-user failed: {str(exc).strip().splitlines()[0]}", 1)
            print(json.dumps(user, default=str))
        return 0
    finally:
        services.stop()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
