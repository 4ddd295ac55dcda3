"""The embedded default: fresh data dir, used data dir, crashed previous run."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import psycopg
import redis

from chatd.process.embedded import EmbeddedServices
from tests.support import Chatd


def test_fresh_then_used_data_dir_keeps_data(tmp_path: Path) -> None:
    services = EmbeddedServices(str(tmp_path / "var"), "", "")
    db_url, redis_url = services.start()
    try:
        with psycopg.connect(db_url, autocommit=True) as conn:
            conn.execute("CREATE TABLE kept (v text)")
            conn.execute("INSERT INTO kept VALUES ('survives')")
            exts = {r[0] for r in conn.execute("SELECT name FROM pg_available_extensions")}
        assert {"vector", "pg_trgm"} <= exts
        r = redis.Redis.from_url(redis_url)
        r.set("k", "v")
        r.close()
    finally:
        services.stop()

    again = EmbeddedServices(str(tmp_path / "var"), "", "")
    db_url2, redis_url2 = again.start()
    try:
        with psycopg.connect(db_url2) as conn:
            assert conn.execute("SELECT v FROM kept").fetchone() == ("survives",)
        r = redis.Redis.from_url(redis_url2)
        assert r.get("k") == b"v"  # AOF replayed
        r.close()
    finally:
        again.stop()


def test_unix_sockets_only(tmp_path: Path) -> None:
    services = EmbeddedServices(str(tmp_path / "var"), "", "")
    db_url, redis_url = services.start()
    try:
        assert redis_url.startswith("unix://")
        assert "host=%2F" in db_url  # a socket directory, not a TCP host
        r = redis.Redis.from_url(redis_url)
        assert r.config_get("port") == {"port": "0"}
        r.close()
    finally:
        services.stop()


def test_serve_after_crashed_run(tmp_path: Path) -> None:
    """SIGKILL everything, databases included (stale pid files, no clean shutdown), then start again."""
    data_dir = tmp_path / "var"
    first = Chatd("", "", tmp_path / "first.log", workers=2, data_dir=data_dir)
    first.env = {"DATABASE_URL": "", "REDIS_URL": ""}
    first.start()
    assert first.proc is not None
    postmaster = int((data_dir / "postgres" / "postmaster.pid").read_text().split()[0])
    valkey = int((data_dir / "valkey" / "valkey.pid").read_text())
    for pid in (postmaster, valkey):
        os.kill(pid, signal.SIGKILL)
    os.killpg(first.proc.pid, signal.SIGKILL)  # master and workers
    first.proc.wait()
    assert (data_dir / "postgres" / "postmaster.pid").exists()
    assert (data_dir / "valkey" / "valkey.pid").exists()

    second = Chatd("", "", tmp_path / "second.log", workers=1, data_dir=data_dir)
    second.env = {"DATABASE_URL": "", "REDIS_URL": ""}
    try:
        second.start()
    finally:
        assert second.stop() == 0
    # The clean stop took the databases down with it.
    deadline = time.monotonic() + 10
    while (data_dir / "postgres" / "postmaster.pid").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not (data_dir / "postgres" / "postmaster.pid").exists()


def test_owner_replaces_a_postmaster_it_did_not_start(tmp_path: Path) -> None:
    """A postmaster of the data dir that is nobody's child (pg_ctl, an old chatd) is replaced by one serve owns."""
    from chatd.process.embedded import EmbeddedPostgres

    data_dir = tmp_path / "var"
    borrowed = EmbeddedPostgres(data_dir)
    borrowed.start()
    old = borrowed.running_pid()
    assert old is not None
    borrowed._process = None  # forget it: as if started by someone else
    services = EmbeddedServices(str(data_dir), "", "")
    try:
        services.start()
        assert services.postgres is not None and services.postgres.pid not in (None, old)
        with psycopg.connect(services.database_url) as conn:
            assert conn.execute("SELECT pg_backend_pid() > 0").fetchone() == (True,)
    finally:
        services.stop()
    assert not Path(f"/proc/{old}").exists() or "zombie" in Path(f"/proc/{old}/status").read_text().lower()


def test_second_serve_refused_and_one_shot_commands_leave_live_databases(tmp_path: Path) -> None:
    import subprocess
    import sys

    data_dir = tmp_path / "var"
    live = Chatd("", "", tmp_path / "live.log", workers=1, data_dir=data_dir)
    live.env = {"DATABASE_URL": "", "REDIS_URL": ""}
    live.start()
    try:
        env = {
            "PATH": "/usr/bin:/bin",
            "JWT_SECRET": "x" * 40,
            "CHATD_STORAGE_DATA_DIR": str(data_dir),
            "CHATD_SERVER_PORT": "0",
        }
        second = subprocess.run(
            [sys.executable, "-m", "chatd", "serve"], env=env, capture_output=True, text=True, timeout=60
        )
        assert second.returncode == 2 and "in use by a running chatd" in second.stderr
        made = subprocess.run(
            [
                sys.executable,
                "-m",
                "chatd",
                "create-user",
                "--email",
                "admin@example.com",
                "--password",
                "password-1",
                "--admin",
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert made.returncode == 0, made.stderr
        assert '"role": "admin"' in made.stdout
        # The live server still has both of its databases.
        from tests.support import http_get

        status, body = http_get(live.http + "/health/ready")
        assert status == 200, body
    finally:
        assert live.stop() == 0
