"""One command: start chatd on its embedded default, run Locust headless against it, stop everything.

    python loadtest/run_locust.py --users 1000 --duration 60

1. ``chatd serve`` with an empty DATABASE_URL / REDIS_URL, so chatd starts its
   own embedded Postgres + Valkey in a temporary data_dir (exactly what
   ``make run`` does), with a known JWT_SECRET and the per-user send limit
   lifted to what the test needs.
2. The plan (``plan.py``): users and rooms inserted by SQL into that embedded
   Postgres (through its unix socket), access tokens minted with the secret.
3. ``locust --headless`` (``--processes N`` for several local worker
   processes), CSV + HTML report in loadtest/results/.
4. SIGTERM to chatd (graceful: sockets closed with 1001), which stops its
   embedded services.  The exit code is Locust's: 1 when any request failed,
   a seq check included.

Loopback only; Locust stops after ``--duration``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parent.parent))

import fixtures
import plan as plan_mod


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="chatd (embedded) + Locust headless, one command")
    p.add_argument("--users", type=int, default=1000, help="Locust users in total, --rest-users included")
    p.add_argument("--spawn-rate", type=float, default=200)
    p.add_argument("--duration", type=int, default=60, help="seconds of load")
    p.add_argument("--processes", type=int, default=1, help="Locust worker processes (1 = no master/worker split)")
    p.add_argument("--chatd-workers", type=int, default=2)
    p.add_argument("--room-size", type=int, default=10)
    p.add_argument("--assistant-share", type=float, default=0.1)
    p.add_argument("--send-interval", type=float, default=5.0)
    p.add_argument("--assistant-interval", type=float, default=30.0)
    p.add_argument("--rest-users", type=int, default=10, help="of --users, how many page history over REST")
    p.add_argument("--auth", choices=("token", "login"), default="token",
                   help="login = REST login per user (Argon2 on the server: ~70 ms CPU each)")
    p.add_argument("--server-cpus", default="", help="taskset -c list for chatd, e.g. 0")
    p.add_argument("--keep", action="store_true", help="keep the temp dir (chatd log, embedded data)")
    p.add_argument("locust_args", nargs="*", help="extra Locust arguments after --")
    a = p.parse_args(argv)
    if not 0 <= a.rest_users < a.users:
        p.error(f"--rest-users must be below --users ({a.users}): --users is the total number of Locust users")
    return a


def locust_command(a: argparse.Namespace, port: int, plan_path: Path, report: Path) -> list[str]:
    """The Locust command line: -u is --users, the REST users among them."""
    cmd = [
        sys.executable, "-m", "locust", "-f", str(fixtures.LOADTEST / "locustfile.py"), "--headless",
        "-u", str(a.users), "-r", str(a.spawn_rate), "-t", f"{a.duration}s",
        "--host", f"http://127.0.0.1:{port}", "--stop-timeout", "10",
        "--lt-plan", str(plan_path), "--lt-prepare", "none", "--lt-send-interval", str(a.send_interval),
        "--lt-assistant-interval", str(a.assistant_interval), "--lt-rest-users", str(a.rest_users),
        "--lt-auth", a.auth,
        "--csv", str(report), "--html", str(report) + ".html",
        "--only-summary",
    ]
    if a.processes > 1:
        cmd += ["--processes", str(a.processes)]
    cmd += a.locust_args
    return cmd


def main() -> int:
    a = parse_args()
    fixtures.raise_nofile()
    tmp = Path(tempfile.mkdtemp(prefix="chatd-locust-"))
    results = fixtures.LOADTEST / "results"
    results.mkdir(exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    data_dir = tmp / "var"
    port = fixtures.free_port()
    # Enough sends for the test, with room for bursts: the default is 20 per 10 s per user.
    send_rate = max(20, int(10 / a.send_interval * 4) + 10)
    env = fixtures.chatd_env("", "", "chatd:", {
        "CHATD_STORAGE_DATA_DIR": str(data_dir),
        "CHATD_WS_SEND_RATE_COUNT": str(send_rate),
        "CHATD_ASSISTANT_PROVIDER": "offline",
        "CHATD_ASSISTANT_CONCURRENCY": str(max(16, int(a.users * a.assistant_share))),
    })
    env.pop("DATABASE_URL"), env.pop("REDIS_URL")
    argv = [sys.executable, "-m", "chatd", "serve", "--port", str(port), "--workers", str(a.chatd_workers)]
    server = fixtures.ServerProcess("chatd", argv, port, env, tmp / "chatd.log", cpus=a.server_cpus or None)
    code = 1
    try:
        t0 = time.perf_counter()
        server.start(timeout_s=120)
        print(f"chatd ready on 127.0.0.1:{port} in {time.perf_counter() - t0:.1f}s (data_dir {data_dir})",
              file=sys.stderr)
        from chatd.process.embedded import EmbeddedPostgres

        database_url = EmbeddedPostgres(data_dir).url
        t0 = time.perf_counter()
        plan = plan_mod.create_sql(a.users, a.room_size, a.assistant_share, database_url, fixtures.JWT_SECRET,
                                   f"http://127.0.0.1:{port}")
        plan_path = tmp / "plan.json"
        plan_path.write_text(json.dumps(plan))
        print(f"plan: {a.users} users, {len(plan['rooms'])} rooms by SQL in {time.perf_counter() - t0:.1f}s",
              file=sys.stderr)
        cmd = locust_command(a, port, plan_path, results / f"locust-{stamp}")
        print("$ " + " ".join(cmd), file=sys.stderr)
        code = subprocess.call(cmd, cwd=fixtures.ROOT, timeout=a.duration + 300)
        print(f"locust exit code {code}; CSV/HTML: {results}/locust-{stamp}*", file=sys.stderr)
    finally:
        server.stop()
        problems = [line for line in server.log_tail(500_000).splitlines() if '"level":"error"' in line]
        if problems:
            print(f"chatd logged {len(problems)} errors; first: {problems[0][:300]}", file=sys.stderr)
        if a.keep:
            print(f"kept {tmp}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    return code


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
