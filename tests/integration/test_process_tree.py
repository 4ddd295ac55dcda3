"""Master and workers: readiness, replacement after SIGKILL, SIGTERM, SIGHUP."""

from __future__ import annotations

import asyncio
import signal
import threading
import time
from typing import Any

import pytest

from chatd.process.embedded import EmbeddedPostgres
from tests.conftest import Services
from tests.support import Chatd, create_database, http_get, with_database


def wait_for(predicate: Any, timeout_s: float = 30, interval_s: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval_s)
    raise AssertionError("condition not met in time")


@pytest.mark.smoke
def test_two_workers_answer_ready(chatd_factory: Any) -> None:
    # SO_REUSEPORT lets the kernel spread connections by address; with one shared socket, a busy
    # machine may hand every connection to the same worker, which says nothing about the other.
    server: Chatd = chatd_factory(workers=2, CHATD_SERVER_REUSE_PORT="true")
    assert len(server.worker_pids()) == 2
    seen: set[int] = set()
    answers: list[tuple[int, Any]] = []
    for _ in range(300):
        status, body = http_get(server.http + "/health/ready")
        answers.append((status, body))
        # A worker whose loop stalls past health_timeout_s (1 s) on a loaded machine answers 503 once: only
        # 200s with both checks ok count, so a worker that is not ready is never seen and the test still fails.
        if status == 200 and body["checks"]["postgres"]["ok"] and body["checks"]["redis"]["ok"]:
            seen.add(body["worker"])
        if len(seen) == 2:
            break
    assert seen == {0, 1}, [a for a in answers if a[0] != 200][-3:]


def test_worker_replaced_after_sigkill(chatd_factory: Any) -> None:
    server: Chatd = chatd_factory(workers=2)
    before = server.worker_pids()
    victim = before[0]
    import os

    os.kill(victim, signal.SIGKILL)
    after = wait_for(lambda: (p := server.worker_pids()) and len(p) == 2 and victim not in p and p)
    assert victim not in after
    died = wait_for(lambda: server.events("worker_died"))
    assert died[0]["worker_pid"] == victim and died[0]["cause"] == "signal 9"
    assert http_get(server.http + "/health/ready")[0] == 200


def test_sighup_rolls_workers_without_refusing_connections(chatd_factory: Any) -> None:
    server: Chatd = chatd_factory(workers=2)
    before = set(server.worker_pids())
    failures: list[int] = []
    stop = threading.Event()

    def poll() -> None:
        while not stop.is_set():
            # A refused or reset connection fails at once whatever the timeout; 10 s (not 2) only spares a
            # request that waits in the backlog while both workers' CPUs are busy starting the new ones.
            status, _ = http_get(server.http + "/health/live", timeout_s=10)
            if status != 200:
                failures.append(status)

    poller = threading.Thread(target=poll)
    poller.start()
    try:
        server.signal(signal.SIGHUP)
        wait_for(lambda: server.events("rolling_restart_done"))
    finally:
        stop.set()
        poller.join()
    after = set(server.worker_pids())
    assert len(after) == 2 and not (before & after)
    assert failures == []


@pytest.mark.smoke
def test_sigterm_stops_the_tree(chatd_factory: Any) -> None:
    server: Chatd = chatd_factory(workers=2)
    pids = server.worker_pids()
    assert server.stop() == 0
    assert len(server.events("worker_stopped")) == 2
    import os

    for pid in pids:
        assert not os.path.exists(f"/proc/{pid}") or "zombie" in open(f"/proc/{pid}/status").read().lower()


def test_ready_follows_postgres(
    chatd_factory: Any, own_postgres: tuple[EmbeddedPostgres, str], services: Services
) -> None:
    pg, url = own_postgres
    server: Chatd = chatd_factory(database_url=url, CHATD_STORAGE_HEALTH_TIMEOUT_S="0.5")
    # Each check gives up after 0.5 s, so a loop stall of that much on a loaded machine fails one probe (Redis
    # included): polled. A Redis check that failed whenever Postgres does would never give this answer.
    wait_for(lambda: http_get(server.http + "/health/ready")[0] == 200)
    pg.stop()
    _, body = wait_for(
        lambda: (
            (r := http_get(server.http + "/health/ready"))
            and r[0] == 503
            and not r[1]["checks"]["postgres"]["ok"]
            and r[1]["checks"]["redis"]["ok"]
            and r
        )
    )
    assert body["checks"]["postgres"]["ok"] is False
    assert body["checks"]["redis"]["ok"] is True
    assert http_get(server.http + "/health/live")[0] == 200  # alive, just not ready
    pg.start()
    wait_for(lambda: http_get(server.http + "/health/ready")[0] == 200)


def test_migrate_command_and_unknown_route(services: Services, tmp_path: Any) -> None:
    import subprocess
    import sys

    url = create_database(services.admin_url, "cli")
    env = {"DATABASE_URL": url, "REDIS_URL": services.redis_url, "JWT_SECRET": "x" * 40, "PATH": "/usr/bin:/bin"}
    out = subprocess.run(
        [sys.executable, "-m", "chatd", "migrate"], env=env, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    # The answer on stdout, and no log line before it (issue 22: one-shot commands log only warnings).
    assert out.stdout.startswith("applied ") and "0001_" in out.stdout, out.stdout
    assert out.stderr == "", out.stderr
    import psycopg

    with psycopg.connect(with_database(url, url.rsplit("dbname=", 1)[-1].split()[0])) as conn:
        row = conn.execute("SELECT count(*) FROM schema_migrations").fetchone()
        assert row is not None and row[0] >= 1


async def test_sigterm_closes_websockets_with_1001_within_grace(chatd_factory: Any, services: Services) -> None:
    import asyncio

    from tests.support import WS
    from tests.users import make_users

    server: Chatd = chatd_factory(workers=2, CHATD_SERVER_SHUTDOWN_GRACE_S="10", CHATD_SERVER_REUSE_PORT="true")
    users = make_users(services.database_url, 4)
    sockets = [await WS.connect(server.ws, u.token) for u in users]
    for ws in sockets:
        await ws.expect("hello")
    started = time.monotonic()
    server.signal(signal.SIGTERM)
    codes = await asyncio.gather(*(ws.closed(timeout_s=15) for ws in sockets))
    assert [c for c, _ in codes] == [1001] * len(sockets)
    assert all(reason == "server shutting down" for _, reason in codes)
    assert server.proc is not None
    await asyncio.get_running_loop().run_in_executor(None, server.proc.wait, 15)
    assert server.proc.returncode == 0
    assert time.monotonic() - started < 10  # within the grace period, not killed at its end
    assert not server.events("worker_killed_after_grace")


async def test_metrics_aggregate_every_worker(chatd_factory: Any, services: Services) -> None:
    from tests.chat import connect, join, make_room, send
    from tests.support import request
    from tests.users import make_users

    server: Chatd = chatd_factory(workers=2, CHATD_SERVER_REUSE_PORT="true")
    alice, bob = make_users(services.database_url, 2)
    room = await make_room(server, alice, [bob])
    a, b = await connect(server, alice), await connect(server, bob)
    await join(a, room)
    await join(b, room)
    for i in range(3):
        await send(a, room, f"m{i}")
    await b.expect("message", room_id=room, seq=3)
    samples: dict[str, float] = {}
    deadline = time.monotonic() + 20  # whichever worker answers reads every worker's samples; hot counters
    while time.monotonic() < deadline:  # flush once a second (seconds apart on a loaded machine)
        text = (await request("GET", server.http + "/metrics")).body.decode()
        samples = {
            line.split(" ")[0]: float(line.split(" ")[1]) for line in text.splitlines() if line and line[0] != "#"
        }
        if samples.get("chatd_fanout_frames_delivered_total", 0) >= 6 and samples.get(
            'chatd_ws_frames_received_total{type="send"}'
        ):
            break
        await asyncio.sleep(0.1)
    assert samples["chatd_messages_committed_total"] == 3.0
    assert samples["chatd_ws_connections"] == 2.0
    assert samples["chatd_fanout_frames_delivered_total"] >= 6.0
    assert samples['chatd_ws_frames_received_total{type="send"}'] == 3.0
