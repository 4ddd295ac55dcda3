"""Prometheus metrics, aggregated over every worker by prometheus-client's multiprocess mode.

``chatd serve`` points ``PROMETHEUS_MULTIPROC_DIR`` at a fresh directory
before anything imports prometheus-client (it picks its storage at import);
each worker writes its samples to memory-mapped files there, and
``GET /metrics`` on any worker reads them all.  A dead worker's files are
marked so its live gauges stop counting.  Hot paths count per event, not per
socket: one ``inc(n)`` for a fan-out to n sockets.
"""

from __future__ import annotations

import asyncio
import collections
import gc
import os
import time

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)

ENV = "PROMETHEUS_MULTIPROC_DIR"


def worker_died(pid: int) -> None:
    if os.environ.get(ENV):
        multiprocess.mark_process_dead(pid)  # type: ignore[no-untyped-call]


def render() -> tuple[bytes, str]:
    if os.environ.get(ENV):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        return generate_latest(registry), CONTENT_TYPE_LATEST
    return generate_latest(), CONTENT_TYPE_LATEST


_LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)

http_requests = Counter("chatd_http_requests_total", "HTTP requests answered", ["route", "status"])
http_duration = Histogram(
    "chatd_http_request_duration_seconds", "HTTP request duration", ["route"], buckets=_LATENCY_BUCKETS_S
)
ws_connections = Gauge("chatd_ws_connections", "Open WebSockets", multiprocess_mode="livesum")
ws_frames = Counter("chatd_ws_frames_received_total", "Client frames received", ["type"])
ws_closed = Counter("chatd_ws_closed_by_server_total", "Sockets the server closed", ["code"])
messages_committed = Counter("chatd_messages_committed_total", "Messages durable in Postgres")
commit_batch = Histogram(
    "chatd_commit_batch_messages", "Messages per group commit", buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500)
)
commit_duration = Histogram("chatd_commit_seconds", "Group commit transaction time", buckets=_LATENCY_BUCKETS_S)
frames_delivered = Counter("chatd_fanout_frames_delivered_total", "Frames written to local sockets")
generations = Counter("chatd_assistant_generations_total", "Assistant answers", ["stop_reason"])
first_token = Histogram(
    "chatd_assistant_first_token_seconds", "Time to the first token of an answer", buckets=_LATENCY_BUCKETS_S
)
queue_depth = Gauge("chatd_assistant_queue_depth", "Queued generations (as last seen)", multiprocess_mode="max")

# The message core (counted per batch or per event, never per socket).
task_restarts = Counter("chatd_task_restarts_total", "Supervised background tasks restarted after a failure", ["task"])
redis_errors = Counter("chatd_redis_errors_total", "Redis operations that failed (answered 'unavailable')", ["op"])
pubsub_reconnects = Counter("chatd_pubsub_reconnects_total", "Fan-out pub/sub connection re-established")
gaps_filled = Counter("chatd_fanout_gap_messages_filled_total", "Messages read back from Postgres (lost publishes)")
seqs_lost = Counter(
    "chatd_fanout_seqs_lost_total", "Committed seqs Postgres could not return (invariant breach: resync sent)"
)
sends_busy = Counter("chatd_sends_busy_total", "Sends refused with 'busy' (group-commit queue full)")
send_queue = Gauge("chatd_send_queue_messages", "Sends waiting for the group commit", multiprocess_mode="livesum")


class HotCounts:
    """Counts of the hot path kept in plain ints, added to the Prometheus counters once a second.

    A multiprocess-mode ``inc()`` writes a memory-mapped file; per frame that is measurable
    (``flush_loop`` is a supervised task of every worker, and runs once more at shutdown).
    """

    def __init__(self) -> None:
        self.frames_received: collections.Counter[str] = collections.Counter()
        self.frames_delivered = 0

    def flush(self) -> None:
        if self.frames_delivered:
            frames_delivered.inc(self.frames_delivered)
            self.frames_delivered = 0
        if self.frames_received:
            for kind, n in self.frames_received.items():
                ws_frames.labels(kind).inc(n)
            self.frames_received.clear()


hot = HotCounts()


async def flush_loop(interval_s: float = 1.0) -> None:
    while True:
        await asyncio.sleep(interval_s)
        hot.flush()


gc_pause = Histogram(
    "chatd_gc_pause_seconds",
    "Cyclic garbage collector pauses (the event loop stands still meanwhile)",
    ["generation"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1),
)
_gc_started = 0.0
gc_totals: dict[int, list[float]] = {0: [0, 0.0], 1: [0, 0.0], 2: [0, 0.0]}  # generation -> [runs, seconds]


def _on_gc(phase: str, info: dict[str, int]) -> None:
    global _gc_started
    if phase == "start":
        _gc_started = time.perf_counter()
    else:
        pause_s = time.perf_counter() - _gc_started
        gen = info["generation"]
        gc_pause.labels(str(gen)).observe(pause_s)
        totals = gc_totals[gen]
        totals[0] += 1
        totals[1] += pause_s


def watch_gc() -> None:
    """Time every collection of this process (a worker calls it once, after the fork)."""
    if _on_gc not in gc.callbacks:
        gc.callbacks.append(_on_gc)
