"""``chatd`` command line: serve, migrate, check-config, create-user, config-doc, chat."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence

from chatd import config as config_mod
from chatd import logs
from chatd.config import Settings
from chatd.errors import ConfigError


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
    with_config(sub.add_parser("check-config", help="print the effective config (secrets masked)"))
    user = with_config(sub.add_parser("create-user", help="create a user (or reset its password)"))
    user.add_argument("--email", required=True)
    user.add_argument("--password", required=True)
    user.add_argument("--name", default="")
    user.add_argument("--admin", action="store_true")
    sub.add_parser("config-doc", help="print docs/CONFIG.md generated from the settings")
    chat = sub.add_parser("chat", help="terminal client (CHATD_EMAIL / CHATD_PASSWORD, else prompts)")
    chat.add_argument("--url", default="http://127.0.0.1:8080", help="server base URL")
    chat.add_argument("--room", help="room to open (name or id)")
    chat.add_argument("--register", action="store_true", help="create the account first (name: CHATD_NAME)")
    return parser


def _load(args: argparse.Namespace) -> Settings:
    settings = config_mod.load(getattr(args, "config", None))
    overrides = {k: getattr(args, k) for k in ("workers", "port", "host") if getattr(args, k, None) is not None}
    if overrides:
        settings = config_mod.replace(settings, "server", **overrides)
        config_mod.validate(settings)
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


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "config-doc":
        sys.stdout.write(config_mod.reference_markdown())
        return 0
    if args.command == "chat":  # a client: no server settings
        from chatd.client.terminal import main as chat

        return chat(args.url, args.room, args.register)
    try:
        settings = _load(args)
    except ConfigError as exc:
        print(f"chatd: {exc}", file=sys.stderr)
        return 2
    logs.setup(settings.log.level, settings.log.format, settings.log.access_log)

    if args.command == "check-config":
        print(json.dumps(config_mod.as_dict(settings), indent=2))
        return 0
    if args.command == "serve":
        _prepare_metrics_dir(settings.storage.data_dir)
        from chatd.embedded import DataDirInUse
        from chatd.server import serve

        try:
            return serve(settings)
        except DataDirInUse as exc:
            print(f"chatd: {exc}", file=sys.stderr)
            return 2
        finally:
            import shutil

            shutil.rmtree(os.environ["PROMETHEUS_MULTIPROC_DIR"], ignore_errors=True)

    from chatd.embedded import DataDirInUse
    from chatd.server import prepare

    try:
        settings, services = prepare(settings, owner=False)  # migrate is part of prepare
    except DataDirInUse as exc:
        print(f"chatd: {exc}", file=sys.stderr)
        return 2
    try:
        if args.command == "create-user":
            from chatd.accounts import create_user_sync

            user = create_user_sync(settings, args.email, args.password, args.name, admin=args.admin)
            print(json.dumps(user, default=str))
        return 0
    finally:
        services.stop()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
