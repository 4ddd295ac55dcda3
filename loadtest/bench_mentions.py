"""The mentions trigger's cost on the group commit's INSERT (sql/0017_mentions_receipts.sql, issue 20).

One 64-row ``INSERT INTO messages`` (a full group-commit batch) in a 50-member room, on an embedded Postgres
of its own: the trigger disabled, then enabled with no '@', one message in ten naming a member, and every
message ``@room``.  Rounds alternate the cases (a busy machine's noise hits each alike); each round is the
median of ``--batches`` inserts; the table is the median of the rounds (docs/BENCHMARKS.md, "Mentions").

Run: .venv/bin/python loadtest/bench_mentions.py [--rounds 5] [--batches 40]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import psycopg

from chatd.process.embedded import EmbeddedPostgres
from chatd.storage import migrations

TEXT = "hello there, how are you doing today? " * 3
CASES = {
    "no trigger": [TEXT] * 64,
    "trigger, no '@'": [TEXT] * 64,
    "trigger, 1 in 10 '@user7'": [("hey @user7 look " if i % 10 == 0 else "") + TEXT for i in range(64)],
    "trigger, every message '@room'": ["@room " + TEXT] * 64,
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batches", type=int, default=40)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        pg = EmbeddedPostgres(f"{tmp}/pg")
        url = pg.start()
        try:
            migrations.apply(url)
            with psycopg.connect(url, autocommit=True) as conn:
                results = run(conn, args.rounds, args.batches)
        finally:
            pg.stop()
    print("| case | median ms per 64-row INSERT |\n|---|---|")
    for case, rounds in results.items():
        print(f"| {case} | {statistics.median(rounds):.2f} |")


def run(conn: psycopg.Connection[tuple[object, ...]], rounds: int, batches: int) -> dict[str, list[float]]:
    users = conn.execute(
        "INSERT INTO users (email, name, password_hash) SELECT 'bench' || g || '@x', 'user' || g, 'x'"
        " FROM generate_series(1, 50) g RETURNING id"
    ).fetchall()
    ids = [int(str(r[0])) for r in users]
    row = conn.execute("INSERT INTO rooms (name, kind, owner_id) VALUES ('r', 'group', %s) RETURNING id", (ids[0],))
    room = int(str(row.fetchone()[0]))  # type: ignore[index]
    conn.execute("INSERT INTO room_members (room_id, user_id) SELECT %s, unnest(%s::bigint[])", (room, ids))
    seq = 0

    def insert(contents: list[str]) -> float:
        nonlocal seq
        seqs = list(range(seq + 1, seq + 1 + len(contents)))
        seq += len(contents)
        started = time.perf_counter()
        conn.execute(
            "INSERT INTO messages (room_id, seq, sender_id, role, kind, content)"
            " SELECT %s, s, %s, 'user', 'text', c FROM unnest(%s::bigint[], %s::text[]) AS t(s, c)",
            (room, ids[1], seqs, contents),
        )
        return time.perf_counter() - started

    out: dict[str, list[float]] = {case: [] for case in CASES}
    for _ in range(rounds):
        for case, contents in CASES.items():
            state = "DISABLE" if case == "no trigger" else "ENABLE"
            conn.execute(f"ALTER TABLE messages {state} TRIGGER messages_mentions")
            for _ in range(5):
                insert(contents)  # warm
            out[case].append(statistics.median(insert(contents) for _ in range(batches)) * 1000)
    return out


if __name__ == "__main__":
    main()
