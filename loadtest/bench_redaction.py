"""Bulk redaction of one user's 100k messages: time per batch (the room's row is locked that long) and in all.

    .venv/bin/python loadtest/bench_redaction.py [--messages 100000] [--others 100000] [--batch 500]

A private PostgreSQL (the embedded wheel, in a temporary directory) with chatd's migrations; one room with
``--messages`` messages of the user to redact interleaved with ``--others`` of someone else, loaded by SQL.
Then ``storage.moderation.redact_batch`` (what ``Moderation.redact`` runs) until none is left, each call
timed: its transaction is what holds the room's row, so its duration is how long a send to that room can
wait behind a redaction (docs/BENCHMARKS.md, "Bulk redaction").  No fan-out: the publishes are
asynchronous and not in the transaction.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import psycopg

from chatd.process.config import StorageSettings
from chatd.process.embedded import EmbeddedServices
from chatd.storage import migrations
from chatd.storage import moderation as moderation_db
from chatd.storage.db import open_database


def load(url: str, mine: int, others: int) -> tuple[int, int, int]:
    """(room, victim, admin): the victim's messages at every other seq until the others' run out."""
    with psycopg.connect(url) as conn:
        ids = [
            r[0]
            for r in conn.execute(
                "INSERT INTO users (email, name, role) VALUES ('v@example.com', 'v', 'user'),"
                " ('o@example.com', 'o', 'user'), ('a@example.com', 'a', 'admin') RETURNING id"
            ).fetchall()
        ]
        victim, other, admin = ids
        room = conn.execute(
            "INSERT INTO rooms (name, kind, owner_id) VALUES ('big', 'group', %s) RETURNING id", (other,)
        ).fetchone()
        assert room is not None
        total = mine + others
        conn.execute(
            "INSERT INTO messages (room_id, seq, sender_id, role, kind, content)"
            " SELECT %s, s, CASE WHEN (s %% 2 = 0 AND s / 2 <= %s) OR s > 2 * %s THEN %s ELSE %s END, 'user',"
            " 'text', 'message number ' || s FROM generate_series(1, %s) AS s",
            (room[0], mine, min(mine, others), victim, other, total),
        )
        conn.execute("UPDATE rooms SET last_seq = %s WHERE id = %s", (total, room[0]))
        n = conn.execute("SELECT count(*) FROM messages WHERE sender_id = %s", (victim,)).fetchone()
        print(f"loaded {total} messages, {n[0] if n else 0} of the user to redact", flush=True)
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("VACUUM ANALYZE")
    return room[0], victim, admin


async def measure(url: str, room: int, victim: int, admin: int, batch: int) -> None:
    db = await open_database(StorageSettings(database_url=url, pg_pool_min=1, pg_pool_max=2), "bench")
    await db.wait()
    times, after, done = [], 0, 0
    started = time.perf_counter()
    while True:
        t = time.perf_counter()
        rows = await moderation_db.redact_batch(db, room, victim, after, batch, admin)
        times.append((time.perf_counter() - t) * 1000)
        done += len(rows)
        if len(rows) < batch:
            break
        after = int(rows[-1]["seq"])
    total_s = time.perf_counter() - started
    await db.close()
    times.sort()
    print(
        f"| {done} | {batch} | {len(times)} | {statistics.median(times):.1f} | {times[int(len(times) * 0.99)]:.1f}"
        f" | {times[-1]:.1f} | {total_s:.1f} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--others", type=int, default=100_000)
    parser.add_argument("--batch", type=int, default=500)
    args = parser.parse_args()
    data_dir = tempfile.mkdtemp(prefix="chatd-bench-redaction-")
    services = EmbeddedServices(data_dir, "", "redis://unused", owner=False)
    url, _ = services.start()
    try:
        migrations.apply(url)
        room, victim, admin = load(url, args.messages, args.others)
        print("| messages redacted | batch | batches | p50 ms per batch | p99 ms | max ms | total s |")
        print("|---|---|---|---|---|---|---|")
        asyncio.run(measure(url, room, victim, admin, args.batch))
    finally:
        services.stop()


if __name__ == "__main__":
    main()
