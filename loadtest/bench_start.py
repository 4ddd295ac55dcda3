"""Server start, before / after: time to ready and a worker's memory, for two chatd trees.

"after" is this tree, "before" another checkout (e.g. ``git worktree add --detach /work/before 8f8906c``: the
Anthropic SDK imported by every worker).  Each run starts ``chatd serve --workers 1`` against one embedded
Postgres + Valkey (offline assistant, no key; one process, which serves: what each forked worker imports),
waits for ``/health/ready`` and reads its RSS and CPU time; runs alternate before, after, ...; the table gives
the median and range (docs/BENCHMARKS.md, "worker start").

Run: .venv/bin/python loadtest/bench_start.py --before /work/before [--runs 5]
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil

from chatd.process.embedded import EmbeddedServices
from chatd.storage import migrations

SECRET = "bench-secret-0123456789-0123456789-0123456789"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def ready(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health/ready", timeout=1) as r:
            return bool(r.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def one_start(tree: Path, database_url: str, redis_url: str) -> tuple[float, float, float]:
    """Seconds to ready, the worker's RSS (MiB) and its CPU seconds at that moment."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CHATD_", "ANTHROPIC_"))}
    env.update(DATABASE_URL=database_url, REDIS_URL=redis_url, JWT_SECRET=SECRET, CHATD_LOG_FORMAT="json")
    started = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, "-m", "chatd", "serve", "--port", str(port), "--workers", "1"],
        cwd=tree,
        env={**env, "PYTHONPATH": str(tree)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        while not ready(port):
            if proc.poll() is not None or time.monotonic() - started > 60:
                raise RuntimeError(f"{tree}: chatd did not become ready")
            time.sleep(0.02)
        elapsed = time.monotonic() - started
        worker = psutil.Process(proc.pid)  # --workers 1: the process serves itself (no master)
        times = worker.cpu_times()
        return elapsed, worker.memory_info().rss / 2**20, times.user + times.system
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", type=Path, required=True)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    trees = {"before": args.before.resolve(), "after": Path(__file__).resolve().parent.parent}
    with tempfile.TemporaryDirectory() as tmp:
        services = EmbeddedServices(tmp, "", "")
        database_url, redis_url = services.start()
        try:
            migrations.apply(database_url)
            results: dict[str, list[tuple[float, float, float]]] = {name: [] for name in trees}
            for _ in range(args.runs):
                for name, tree in trees.items():
                    results[name].append(one_start(tree, database_url, redis_url))
        finally:
            services.stop()
    print("| tree | to ready (s) | worker RSS (MiB) | worker CPU at ready (s) |")
    print("|---|---|---|---|")
    for name, rows in results.items():
        cells = []
        for column in zip(*rows, strict=True):
            cells.append(f"{statistics.median(column):.2f} ({min(column):.2f}–{max(column):.2f})")
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
