"""Cancel latency: time from sending ``cancel`` to receiving ``stream_end`` (stop_reason cancelled).

Starts its own embedded Postgres + Valkey and a ``chatd serve --workers 2`` (SO_REUSEPORT, so the
canceller's socket and the generating worker are often different processes: the cancel crosses
Redis), runs N answers with the offline provider, cancels each after its first chunks, and prints
p50/p95/max.  Loopback only; bounded by N.

    .venv/bin/python loadtest/bench_cancel.py --runs 40
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from chatd.process.embedded import EmbeddedServices  # noqa: E402
from chatd.storage import migrations  # noqa: E402
from tests.support import WS, Chatd, create_database, request  # noqa: E402
from tests.users import make_users  # noqa: E402


async def run(runs: int, chatd: Chatd, database_url: str) -> list[float]:
    (user,) = make_users(database_url, 1)
    created = await request("POST", chatd.http + "/api/v1/rooms", {"name": "bench", "kind": "assistant"}, user.token)
    room = created.body["id"]
    latencies: list[float] = []
    for i in range(runs):
        ws = await WS.connect(chatd.ws, user.token)  # a new socket each time: lands on either worker
        await ws.expect("hello")
        await ws.send({"type": "join", "room_id": room, "id": "j"})
        await ws.expect("joined")
        await ws.send({"type": "send", "room_id": room, "content": f"run {i}", "client_msg_id": f"c{i}", "id": "s"})
        start = await ws.expect("stream_start", timeout_s=30)
        await ws.expect("stream_chunk", message_id=start["message_id"], index=1, timeout_s=30)
        t0 = time.perf_counter()
        await ws.send({"type": "cancel", "message_id": start["message_id"]})
        end = await ws.expect("stream_end", message_id=start["message_id"], timeout_s=30)
        latencies.append((time.perf_counter() - t0) * 1000)
        assert end["stop_reason"] == "cancelled", end
        ws.close()
    return latencies


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=40)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="chatd-bench-cancel-"))
    services = EmbeddedServices(str(tmp / "services"), "", "")
    db, redis_url = services.start()
    try:
        url = create_database(db, "bench")
        migrations.apply(url)
        server = Chatd(url, redis_url, tmp / "chatd.log", workers=2)
        server.env = {
            "CHATD_SERVER_REUSE_PORT": "true",
            "CHATD_ASSISTANT_OFFLINE_TOKENS_PER_S": "20",
            "CHATD_WS_SEND_RATE_COUNT": "100000",
        }
        server.data_dir = tmp / "data"
        server.start()
        try:
            ms = asyncio.run(run(args.runs, server, url))
        finally:
            server.stop()
    finally:
        services.stop()
    ms.sort()
    p95 = ms[max(0, int(len(ms) * 0.95) - 1)]
    summary = f"p50 {statistics.median(ms):.1f} ms, p95 {p95:.1f} ms, max {ms[-1]:.1f} ms"
    print(f"cancel -> stream_end over {len(ms)} runs: {summary}")


if __name__ == "__main__":
    main()
