"""Prometheus metrics, aggregated over every worker by prometheus-client's multiprocess mode.

``chatd serve`` points ``PROMETHEUS_MULTIPROC_DIR`` at a fresh directory
before anything imports prometheus-client (it picks its storage at import);
each worker writes its samples to memory-mapped files there, and
``GET /metrics`` on any worker reads them all.  A dead worker's files are
marked so its live gauges stop counting.  Hot paths count per event, not per
socket: one ``inc(n)`` for a fan-out to n sockets, or in plain ints flushed
once a second (``hot``).

Per-worker series carry a ``worker`` label (``w0``, ``w1``...: the slot, stable
across restarts of that worker).  What a worker samples of itself (event-loop
lag, RSS, open fds, CPU, its Postgres pool, readiness) comes from
``sample_loop`` / ``loop_lag_loop``, supervised tasks of every worker.  Every
metric is listed with its labels in docs/OPERATIONS.md; the dashboard and the
alert rules (config/grafana, config/prometheus) use only those, which a test
checks against a running chatd.
"""

from __future__ import annotations

import asyncio
import collections
import gc
import os
import resource
import time
from collections.abc import Awaitable, Callable, Mapping

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)

from chatd.core import envelope

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
ws_closed = Counter(
    "chatd_ws_closed_by_server_total",
    "Sockets the server closed, by the close code it sent (ping timeouts: code 1000, see ws_ping_timeouts)",
    ["code"],
)
ws_closed_by_client = Counter(
    "chatd_ws_closed_by_client_total",
    "Sockets closed by the client, by its close code (client_close_label: 1000-1014 as themselves, 3000-4999"
    " 'other'), or lost or closed without a code (1006)",
    ["code"],
)
_CLIENT_CODES = frozenset((1000, 1001, 1002, 1003, *range(1007, 1015)))  # what a client may send below 3000
CLIENT_CLOSE_LABELS = ("1006", *(str(code) for code in sorted(_CLIENT_CODES)), "other", "invalid")


def client_close_label(code: int | None) -> str:
    """The label of a client's close code: the client picks the code, not the label set (a label per code
    would let it make up thousands of series).  Codes of RFC 6455 and its IANA registry stay themselves;
    ``None`` (the connection dropped, or a close frame without a code: Tornado tells them apart no further)
    is 1006; the codes left to applications (3000-4999) are ``other``; what no client may send, ``invalid``."""
    if code is None:
        return "1006"
    if code in _CLIENT_CODES:
        return str(code)
    return "other" if 3000 <= code <= 4999 else "invalid"


ws_ping_timeouts = Counter("chatd_ws_ping_timeouts_total", "Sockets closed because no pong came back in time")
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
tokens = Counter(
    "chatd_assistant_tokens_total", "Tokens of stored answers, by model and kind (input, output)", ["model", "kind"]
)


def count_tokens(model: str, input_tokens: int, output_tokens: int) -> None:
    tokens.labels(model, "input").inc(input_tokens)
    tokens.labels(model, "output").inc(output_tokens)


# The message core (counted per batch or per event, never per socket).
task_restarts = Counter("chatd_task_restarts_total", "Supervised background tasks restarted after a failure", ["task"])
redis_errors = Counter("chatd_redis_errors_total", "Redis operations that failed (answered 'unavailable')", ["op"])
redis_latency = Histogram(
    "chatd_redis_command_seconds",
    "Redis round trips by operation (a pipeline or script is one), failed ones included",
    ["op"],
    buckets=(0.0002, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
)
pubsub_reconnects = Counter("chatd_pubsub_reconnects_total", "Fan-out pub/sub connection re-established")
pubsub_liveness_timeouts = Counter(
    "chatd_pubsub_liveness_timeouts_total",
    "Fan-out pub/sub connections dropped as dead: nothing read, not even a PONG, within storage.pubsub_liveness_s",
)
pubsub_bad_envelopes = Counter(
    "chatd_pubsub_bad_envelopes_total",
    "Pub/sub messages dropped as not a valid envelope, by reason (chatd.core.envelope.REASONS)",
    ["reason"],
)
pubsub_received = Counter("chatd_pubsub_messages_received_total", "Pub/sub messages received (own publishes included)")
user_channel_unconfirmed = Counter(
    "chatd_user_channel_unconfirmed_total",
    "Sockets greeted before Redis confirmed the subscription to their user's channel (Redis down or slow)",
)
pubsub_connected = Gauge(
    "chatd_pubsub_connected", "Workers whose fan-out pub/sub connection is up", multiprocess_mode="livesum"
)
resyncs = Counter(
    "chatd_resyncs_sent_total",
    "resync_required frames sent: replay_limit (join too far behind), held_overflow (a join held too many"
    " live frames), seq_lost (Postgres lacked a committed seq), epoch (a join whose since_seq belongs to another"
    " history of the room)",
    ["reason"],
)
pg_errors = Counter(
    "chatd_pg_errors_total",
    "Postgres calls answered 'unavailable': deadline (storage.pg_query_timeout_s), statement_timeout,"
    " pool_timeout (no free connection in time), connection (Postgres down or the connection broke)",
    ["kind"],
)
worker_restarts = Counter("chatd_worker_restarts_total", "Workers that died or hung and were replaced by the master")
gaps_filled = Counter("chatd_fanout_gap_messages_filled_total", "Messages read back from Postgres (lost publishes)")
seqs_lost = Counter(
    "chatd_fanout_seqs_lost_total", "Committed seqs Postgres could not return (invariant breach: resync sent)"
)
content_rule_hits = Counter(
    "chatd_content_rule_hits_total", "Sends and edits a content rule matched, by action (block, flag, mask)", ["action"]
)
content_rules_version = Gauge(
    "chatd_content_rules_version", "Version of the content rules a worker applies", multiprocess_mode="min"
)
reports_filed = Counter("chatd_reports_filed_total", "Message reports filed, by source (user, rule)", ["source"])
reports_settled = Counter("chatd_reports_settled_total", "Reports closed from the queue, by action", ["action"])
messages_redacted = Counter("chatd_messages_redacted_total", "Messages tombstoned by bulk redactions")
sends_busy = Counter("chatd_sends_busy_total", "Sends refused with 'busy' (group-commit queue full)")
presence_views_healed = Counter(
    "chatd_presence_views_healed_total",
    "Rooms whose presence view on a worker was wrong (an announcement lost) and was corrected from Redis:"
    " probe (its revision differed), stale (an announcement skipped one, or the view could not be read),"
    " resubscribe (after a pub/sub loss)",
    ["trigger"],
)
publish_dropped = Counter(
    "chatd_publish_dropped_total",
    "Envelopes for other workers not published: queue full, past its deadline, or Redis failed (repaired)",
    ["reason"],
)
send_queue = Gauge("chatd_send_queue_messages", "Sends waiting for the group commit", multiprocess_mode="livesum")


class HotCounts:
    """Counts of the hot path kept in plain ints, added to the Prometheus counters once a second.

    A multiprocess-mode ``inc()`` writes a memory-mapped file; per frame that is measurable
    (``flush_loop`` is a supervised task of every worker, and runs once more at shutdown).
    """

    def __init__(self) -> None:
        self.frames_received: collections.Counter[str] = collections.Counter()
        self.frames_delivered = 0
        self.pubsub_received = 0

    def flush(self) -> None:
        if self.frames_delivered:
            frames_delivered.inc(self.frames_delivered)
            self.frames_delivered = 0
        if self.pubsub_received:
            pubsub_received.inc(self.pubsub_received)
            self.pubsub_received = 0
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
        for gen in gc_totals:
            gc_pause.labels(str(gen))  # exported at 0 before the first collection


# -- what each worker samples of itself --------------------------------------------------------

worker = "w0"  # this process's label, set once after the fork (set_worker)

loop_lag = Histogram(
    "chatd_event_loop_lag_seconds",
    "How late a 0.25 s timer fires on the worker's event loop: blocking code, GC, CPU starvation",
    ["worker"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
)
# pid-aware: one series per live process (a rolling restart briefly has two per worker slot)
process_rss = Gauge(
    "chatd_process_resident_memory_bytes", "Resident memory of the worker", ["worker"], multiprocess_mode="liveall"
)
process_fds = Gauge(
    "chatd_process_open_fds", "Open file descriptors of the worker", ["worker"], multiprocess_mode="liveall"
)
process_max_fds = Gauge(
    "chatd_process_max_fds",
    "File descriptor limit of the worker (RLIMIT_NOFILE)",
    ["worker"],
    multiprocess_mode="liveall",
)
process_cpu = Counter("chatd_process_cpu_seconds_total", "CPU time (user + system) of the worker", ["worker"])
ready = Gauge(
    "chatd_ready",
    "1 while the worker would answer /health/ready with 200 (Postgres, Redis, every loop up, not draining)",
    ["worker"],
    multiprocess_mode="livesum",
)
pg_pool = Gauge(
    "chatd_pg_pool_connections",
    "The worker's Postgres pool: open, in_use, max, waiting (requests queued for a connection now)",
    ["worker", "state"],
    multiprocess_mode="livesum",
)
pg_pool_requests = Counter("chatd_pg_pool_requests_total", "Connections taken from the pool", ["worker"])
pg_pool_waited = Counter(
    "chatd_pg_pool_requests_waited_total", "Connections that had to wait for a free one", ["worker"]
)
pg_pool_wait = Counter("chatd_pg_pool_wait_seconds_total", "Time spent waiting for a pooled connection", ["worker"])
pg_pool_timeouts = Counter(
    "chatd_pg_pool_timeouts_total", "Requests that got no connection within storage.pg_timeout_s", ["worker"]
)
pg_connections_lost = Counter(
    "chatd_pg_connections_lost_total", "Pooled connections found broken (returned bad or lost)", ["worker"]
)
pg_connection_errors = Counter("chatd_pg_connection_errors_total", "Failed attempts to open a connection", ["worker"])


def set_worker(worker_id: int) -> None:
    """Label this process's series; create the per-reason series at 0 (so rate() and alerts see them)."""
    global worker
    worker = f"w{worker_id}"
    for reason in ("replay_limit", "held_overflow", "seq_lost", "epoch"):
        resyncs.labels(reason)
    for kind in ("deadline", "statement_timeout", "pool_timeout", "connection"):
        pg_errors.labels(kind)
    for reason in envelope.REASONS:
        pubsub_bad_envelopes.labels(reason)
    for label in CLIENT_CLOSE_LABELS:
        ws_closed_by_client.labels(label)


async def loop_lag_loop(interval_s: float = 0.25) -> None:
    """A supervised task: how late each periodic wake-up is (the loop could not run it earlier)."""
    child = loop_lag.labels(worker)
    loop = asyncio.get_running_loop()
    while True:
        started = loop.time()
        await asyncio.sleep(interval_s)
        child.observe(max(0.0, loop.time() - started - interval_s))


_PAGE_BYTES = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def sample_process(cpu_before_s: float) -> float:
    """RSS, descriptor limit and CPU of this process (prometheus-client's process collector does not
    work in multiprocess mode); returns the CPU time now, for the next call's delta."""
    try:
        with open("/proc/self/statm", "rb") as f:
            process_rss.labels(worker).set(int(f.read().split()[1]) * _PAGE_BYTES)
    except OSError:
        pass  # not Linux: no /proc
    process_max_fds.labels(worker).set(resource.getrlimit(resource.RLIMIT_NOFILE)[0])
    cpu_s = time.process_time()
    process_cpu.labels(worker).inc(max(0.0, cpu_s - cpu_before_s))
    return cpu_s


def count_fds() -> None:
    """Open descriptors: listing /proc/self/fd costs ~2 us per descriptor (45 ms at 20,000 sockets), so it
    runs in a thread (the loop keeps going) and less often than the rest."""
    try:
        process_fds.labels(worker).set(len(os.listdir("/proc/self/fd")))
    except OSError:
        pass


def record_pool(stats: Mapping[str, int]) -> None:
    """psycopg_pool ``pop_stats()``: gauges as they are, counters as deltas since the last call."""
    size, available = stats.get("pool_size", 0), stats.get("pool_available", 0)
    pg_pool.labels(worker, "open").set(size)
    pg_pool.labels(worker, "in_use").set(size - available)
    pg_pool.labels(worker, "max").set(stats.get("pool_max", 0))
    pg_pool.labels(worker, "waiting").set(stats.get("requests_waiting", 0))
    pg_pool_requests.labels(worker).inc(stats.get("requests_num", 0))
    pg_pool_waited.labels(worker).inc(stats.get("requests_queued", 0))
    pg_pool_wait.labels(worker).inc(stats.get("requests_wait_ms", 0) / 1000)
    pg_pool_timeouts.labels(worker).inc(stats.get("requests_errors", 0))
    pg_connections_lost.labels(worker).inc(stats.get("returns_bad", 0) + stats.get("connections_lost", 0))
    pg_connection_errors.labels(worker).inc(stats.get("connections_errors", 0))


async def sample_loop(
    pool_stats: Callable[[], Mapping[str, int]],
    is_ready: Callable[[], Awaitable[bool]],
    interval_s: float = 5.0,
    fds_every: int = 6,
) -> None:
    """A supervised task: the worker's process, pool and readiness every ``interval_s``; its open
    descriptors every ``fds_every`` rounds."""
    cpu_s = time.process_time()
    rounds = 0
    while True:
        cpu_s = sample_process(cpu_s)
        if rounds % fds_every == 0:
            await asyncio.to_thread(count_fds)
        rounds += 1
        record_pool(pool_stats())
        ready.labels(worker).set(1 if await is_ready() else 0)
        await asyncio.sleep(interval_s)
