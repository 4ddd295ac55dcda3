"""chatd benchmark harness: one command, servers started here, results in loadtest/results/.

    python loadtest/bench.py --quick        # smoke run (~40 s): every workload once, small; fails without figures
    python loadtest/bench.py                # full run, 3 runs of every target, on a quiet machine
    python loadtest/bench.py --targets baseline,websockets,chatd-1w --workloads fanout --fanout-conns 1000 \
        --fanout-interval 2 --runs 3        # one row of docs/BENCHMARKS.md

What it does, in order:

1. Pins itself to the generator CPU (default: core 1).  Everything it starts
   inherits that: the embedded Postgres + Valkey (chatd's own, in a temporary
   directory) and the load generator processes (``loadgen.py``).  Each server
   under test is started with ``taskset -c 0`` (``--server-cpus``), so its CPU
   figures are per core.
2. For each target, side by side: BASELINE (``baseline_server.py``: Tornado +
   uvloop broadcast, no auth/persistence/Redis, writing to the socket directly
   as chatd does: the ceiling; ``baseline-stream`` is the same through
   Tornado's ``IOStream.write``, the old baseline), WEBSOCKETS
   (``websockets_server.py``: the websockets library's ``broadcast``, a second
   reference), PEER (``peer_socketio.py``: python-socketio + AsyncRedisManager
   on aiohttp), chatd with 1 worker and chatd with 2 workers (both on the same
   core by default: the 2-worker figures show what cross-worker fan-out costs;
   20k sockets need 2 worker processes anyway, RLIMIT_NOFILE being 20000 per
   process).
3. Workloads: connection scale (idle authenticated sockets: connect rate, RSS
   per socket, idle CPU), chat fan-out (rooms of R, everyone sending every
   I s: delivered/s, send->echo percentiles, CPU per delivery of the server
   alone and all-in, i.e. with Postgres + Valkey, loss check),
   hot room (1 sender, 1 room of M members, rate stepped up until p99 > 100 ms),
   assistant streaming (offline provider, S concurrent streams), durability
   (group commit: committed messages/s and batch sizes, read from Postgres),
   overload (rooms of 2, offered sends/s stepped past the commit capacity,
   refused sends retried after ``retry_after_ms``: acked/s, first try -> final
   ack, never acked).
4. Repeats all of it ``--runs`` times (3 by default; every target in each run,
   the order flipped every other run) and reports each figure as the median
   [min–max] over the runs; ratios are taken within a run, then summarized.
5. Writes ``loadtest/results/bench-<timestamp>.json`` (every run, and the
   summary) and a markdown report to stdout and ``loadtest/results/latest.md``.

All traffic goes to 127.0.0.0/8 and unix sockets.  Every loop is bounded in
count and time.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import itertools
import json
import math
import os
import shlex
import shutil
import statistics
import sys
import tempfile
import time
import traceback
import urllib.request
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parent.parent))

import fixtures
from fixtures import ServerProcess, Services
from loadgen import GenPool

RESULTS = fixtures.LOADTEST / "results"
P99_LIMIT_MS = 100.0
TARGETS = ("baseline", "baseline-stream", "websockets", "peer")  # and chatd-<N>w
WORKLOADS = ("connections", "fanout", "hot", "assistant", "overload")


# -- small helpers -----------------------------------------------------------------------


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    return s[min(len(s) - 1, max(0, math.ceil(q * len(s)) - 1))]


def summary(values: list[float]) -> dict[str, Any]:
    if not values:
        return {"n": 0}
    return {
        "n": len(values),
        "p50": round(pct(values, 0.50) or 0, 2),
        "p95": round(pct(values, 0.95) or 0, 2),
        "p99": round(pct(values, 0.99) or 0, 2),
        "max": round(max(values), 2),
        "mean": round(sum(values) / len(values), 2),
    }


def merge_lists(results: list[dict[str, Any]], key: str) -> list[float]:
    return list(itertools.chain.from_iterable(r.get(key, []) for r in results))


def merge_counts(results: list[dict[str, Any]], key: str) -> dict[str, int]:
    out: dict[str, int] = {}
    for r in results:
        for k, v in r.get(key, {}).items():
            out[k] = out.get(k, 0) + v
    return out


class Spread:
    """One figure over several runs, printed ``median [min–max]``: the median says what to expect, the range how
    far one run may be from it (quoting the quietest run would hide that)."""

    __slots__ = ("missing", "values")

    def __init__(self, values: list[float], missing: int = 0) -> None:
        self.values = values
        self.missing = missing  # runs without this figure (a step not reached, a limit not found)

    @property
    def median(self) -> float:
        return float(statistics.median(self.values))

    def render(self, nd: int = 1) -> str:
        lo, hi = min(self.values), max(self.values)
        text = fmt(self.median, nd) if lo == hi else f"{fmt(self.median, nd)} [{fmt(lo, nd)}–{fmt(hi, nd)}]"
        n = len(self.values) + self.missing
        return text + (f" ({self.missing} of {n} runs: –)" if self.missing else "")

    def __str__(self) -> str:
        return self.render()

    def __format__(self, spec: str) -> str:
        return self.render()

    def __bool__(self) -> bool:
        return any(self.values)

    def to_json(self) -> dict[str, Any]:
        return {"median": self.median, "min": min(self.values), "max": max(self.values), "runs": self.values,
                "runs_without": self.missing}


def merge_runs(values: list[Any]) -> Any:
    """The same structure over runs, leaf by leaf: numbers that differ become a Spread, lists of dicts (a
    workload's steps) merge by position, anything else is the first run's."""
    present = [v for v in values if v is not None]
    if not present:
        return None
    if all(isinstance(v, dict) for v in present):
        keys = dict.fromkeys(k for v in present for k in v)
        return {k: merge_runs([v.get(k) for v in present]) for k in keys}
    if all(isinstance(v, list) for v in present):
        if any(isinstance(x, dict) for v in present for x in v):
            n = max(len(v) for v in present)
            return [merge_runs([v[i] for v in present if i < len(v)]) for i in range(n)]
        return present[0]
    if all(isinstance(v, bool) for v in present):
        return all(present)
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in present):
        if len(set(present)) == 1 and len(present) == len(values):
            return present[0]
        return Spread([float(v) for v in present], len(values) - len(present))
    return present[0]


def json_default(x: Any) -> Any:
    return x.to_json() if isinstance(x, Spread) else str(x)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class IPs:
    """Loopback source addresses 127.0.0.2 ..., handed out fresh per connect (sidesteps TIME_WAIT too)."""

    def __init__(self) -> None:
        self._it = (f"127.0.{b}.{c}" for b in range(0, 256) for c in range(2, 255))

    def take(self, n: int) -> list[str]:
        return [next(self._it) for _ in range(max(1, n))]


# -- targets ---------------------------------------------------------------------------------


class Target:
    """A server under test and what the generator needs to know about it."""

    def __init__(self, name: str, kind: str, proto: str, server: ServerProcess, max_conns: int, note: str = ""):
        self.name = name
        self.kind = kind  # baseline | peer | chatd
        self.proto = proto  # chatd | sio
        self.server = server
        self.max_conns = max_conns
        self.note = note
        self.database_url = ""
        self.users: list[fixtures.User] = []

    @property
    def uses_services(self) -> bool:
        """chatd and the peer work through Postgres/Valkey: their all-in CPU counts those; the in-memory
        references use neither, so what the services do meanwhile (autovacuum, checkpoints) is not theirs."""
        return self.kind in ("chatd", "peer")

    @property
    def spec(self) -> dict[str, Any]:
        return {"host": "127.0.0.1", "port": self.server.port, "proto": self.proto}

    def token(self, key: int) -> str:
        return self.users[key].token if self.users else ""

    def rooms(self, groups: list[list[int]], kind: str = "group", first_id: int = 1) -> list[int]:
        """Room ids for groups of user keys: real rooms in chatd's database, plain numbers elsewhere."""
        if self.kind == "chatd":
            return fixtures.make_rooms(
                self.database_url, [[self.users[k].id for k in g] for g in groups], kind, f"bench-{kind}"
            )
        return list(range(first_id, first_id + len(groups)))


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.ips = IPs()
        self.pool: GenPool | None = None
        self.services: Services | None = None
        self.tmp = Path(tempfile.mkdtemp(prefix="chatd-bench-"))
        self.log_dir = self.tmp / "logs"
        self.log_dir.mkdir()
        self.notes: list[str] = []
        self.results: dict[str, dict[str, Any]] = {}
        self.unjoined = 0

    # -- generator plumbing ----------------------------------------------------------

    @property
    def w(self) -> int:
        assert self.pool is not None
        return len(self.pool)

    def split(self, keys: list[int]) -> list[list[int]]:
        parts: list[list[int]] = [[] for _ in range(self.w)]
        for k in keys:
            parts[k % self.w].append(k)
        return parts

    def connect(self, t: Target, keys: list[int], light: set[int] | None = None) -> dict[str, Any]:
        assert self.pool is not None
        parts = self.split(keys)
        cmds = []
        for part in parts:
            cmds.append(
                {
                    "op": "connect",
                    "target": t.spec,
                    "conns": [(k, t.token(k)) for k in part],
                    "local_ips": self.ips.take(math.ceil(len(part) / 8000)),
                    "concurrency": self.args.connect_concurrency,
                    "timeout_s": 30.0,
                    "light": sorted(k for k in part if light and k in light),
                }
            )
        t0 = time.perf_counter()
        res = self.pool.call(cmds, timeout_s=600)
        elapsed = time.perf_counter() - t0
        ok = sum(r["ok"] for r in res)
        if keys and ok == 0:
            raise RuntimeError(f"no socket connected to {t.name}: {merge_counts(res, 'errors')}")
        return {
            "requested": len(keys),
            "ok": ok,
            "failed": sum(r["failed"] for r in res),
            "errors": merge_counts(res, "errors"),
            "elapsed_s": round(elapsed, 2),
            "rate_per_s": round(ok / elapsed, 1) if elapsed > 0 else None,
            "connect_ms": summary(merge_lists(res, "lat_ms")),
            "gen_cpu_s": round(sum(r["cpu_s"] for r in res), 2),
        }

    def join(self, pairs: list[tuple[int, int]]) -> dict[str, Any]:
        assert self.pool is not None
        parts: list[list[tuple[int, int]]] = [[] for _ in range(self.w)]
        for k, room in pairs:
            parts[k % self.w].append((k, room))
        timeout_s = 60 + len(pairs) / 100  # chatd joins cost Postgres + Redis round trips: allow ~100/s at worst
        res = self.pool.call([{"op": "join", "joins": p, "timeout_s": timeout_s} for p in parts],
                             timeout_s=timeout_s + 60)
        elapsed = max(r["elapsed_s"] for r in res)
        out = {
            "sent": sum(r["sent"] for r in res),
            "retried": sum(r["retried"] for r in res),
            "first_errors": merge_counts(res, "first_errors"),
            "failed": sum(r["failed"] for r in res),
            "outstanding": sum(r["outstanding"] for r in res),
            "elapsed_s": round(elapsed, 2),
            "rate_per_s": round(len(pairs) / elapsed, 1) if elapsed > 0 else None,
        }
        if out["failed"] or out["outstanding"] or out["retried"]:
            log(f"joins: {out}")
        self.unjoined = out["failed"] + out["outstanding"]
        return out

    def close_all(self) -> None:
        assert self.pool is not None
        self.pool.all({"op": "close", "timeout_s": 5}, timeout_s=60)

    def loss(self, res: list[dict[str, Any]], max_seq: dict[int, int] | None = None) -> dict[str, Any]:
        """Compare every (socket, room) track with the highest seq acked/ended in the room."""
        expected: dict[int, int] = dict(max_seq or {})
        for r in res:
            for room, seq in r.get("max_seq", {}).items():
                expected[room] = max(expected.get(room, 0), seq)
        members = missing = extra = dups = ooo = 0
        for r in res:
            for room, baseline, count, dup, o in r.get("tracks", []):
                members += 1
                want = max(0, expected.get(room, 0) - baseline)
                if count < want:
                    missing += want - count
                elif count > want:
                    extra += count - want
                dups += dup
                ooo += o
        unjoined = getattr(self, "unjoined", 0)  # sockets whose join was refused: they received nothing
        # Offered (sent at least once) but never acked, retries included: lost from the sender's side.
        never_acked = sum(r.get("never_acked", 0) for r in res)
        return {"members": members, "unjoined": unjoined, "missing": missing, "duplicates": dups,
                "out_of_order": ooo, "extra": extra, "never_acked": never_acked,
                "ok": missing == 0 and dups == 0 and unjoined == 0 and never_acked == 0}

    # -- targets -----------------------------------------------------------------------

    def make_target(self, name: str) -> Target:
        assert self.services is not None
        cpus = self.args.server_cpus
        nofile = fixtures.raise_nofile()
        single = nofile - 200  # listening socket, pools, logs
        if name in ("baseline", "baseline-stream"):
            port = fixtures.free_port()
            path = "stream" if name == "baseline-stream" else "direct"
            argv = [sys.executable, str(fixtures.LOADTEST / "baseline_server.py"), "--port", str(port),
                    "--write-path", path]
            server = ServerProcess(name, argv, port, dict(os.environ), self.log_dir / f"{name}.log", cpus=cpus)
            note = ("Tornado+uvloop, no auth/persistence/Redis, chatd's direct socket write" if path == "direct"
                    else "the same, every frame through Tornado's IOStream.write (the old baseline)")
            return Target(name, "baseline", "chatd", server, single, note)
        if name == "websockets":
            port = fixtures.free_port()
            argv = [sys.executable, str(fixtures.LOADTEST / "websockets_server.py"), "--port", str(port)]
            server = ServerProcess(name, argv, port, dict(os.environ), self.log_dir / f"{name}.log", cpus=cpus)
            note = "the websockets library's asyncio server + broadcast() on uvloop, no auth/persistence/Redis"
            return Target(name, "reference", "chatd", server, single, note)
        if name == "peer":
            port = fixtures.free_port()
            argv = [
                sys.executable, str(fixtures.LOADTEST / "peer_socketio.py"), "--port", str(port),
                "--redis-url", self.services.redis_url, "--prefix", f"peer{uuid.uuid4().hex[:6]}:",
            ]
            server = ServerProcess(name, argv, port, dict(os.environ), self.log_dir / f"{name}.log", cpus=cpus)
            note = "python-socketio AsyncRedisManager on aiohttp, 1 process"
            return Target(name, "peer", "sio", server, single, note)
        workers = int(name.rsplit("-", 1)[1].rstrip("w"))
        db = fixtures.create_database(self.services.database_url, "bench")
        streams = self.args.asst_streams
        env = {
            "CHATD_ASSISTANT_PROVIDER": "offline",
            "CHATD_ASSISTANT_OFFLINE_TOKENS_PER_S": str(self.args.tokens_per_s),
            "CHATD_ASSISTANT_CONCURRENCY": str(max(16, streams)),
            "CHATD_ASSISTANT_QUEUE_MAX_DEPTH": str(max(1000, 2 * streams)),
        }
        if self.args.send_queue_max:
            env["CHATD_WS_SEND_QUEUE_MAX"] = str(self.args.send_queue_max)
        if self.args.embedder:
            env["CHATD_ASSISTANT_EMBEDDER"] = self.args.embedder
        server = fixtures.chatd_server(name, workers, db, self.services.redis_url, self.log_dir, cpus, env)
        t = Target(name, "chatd", "chatd", server, single * workers, f"chatd --workers {workers}")
        t.database_url = db
        a = self.args
        sizes = {"connections": max(a.conn_levels), "fanout": a.fanout_conns, "hot": a.hot_members,
                 "assistant": streams, "overload": a.overload_conns}
        n_users = max((sizes[w] for w in a.workloads), default=1)  # the workloads run, not every default size
        t0 = time.perf_counter()
        t.users = fixtures.make_users(db, n_users)
        log(f"{name}: {n_users} users by SQL + JWT in {time.perf_counter() - t0:.1f}s")
        return t

    # -- workloads ------------------------------------------------------------------------

    def wl_connections(self, t: Target) -> dict[str, Any]:
        a = self.args
        srv = t.server
        time.sleep(a.settle_s if a.quick else 1.0)  # the RSS before: after start-up work
        rss0 = srv.rss_bytes()
        out: dict[str, Any] = {"rss_before_mib": round(rss0 / 2**20, 1), "levels": []}
        connected = 0
        for level in a.conn_levels:
            row: dict[str, Any] = {"conns": level}
            if level > t.max_conns:
                row["skipped"] = f"needs more than one process: RLIMIT_NOFILE {fixtures.raise_nofile()} per process"
                out["levels"].append(row)
                continue
            c = self.connect(t, list(range(connected, level)))
            connected += c["ok"]
            row.update(connect=c, open=connected)
            time.sleep(a.settle_s)
            rss = srv.rss_bytes()
            row["rss_mib"] = round(rss / 2**20, 1)
            row["rss_per_conn_kib"] = round((rss - rss0) / max(1, connected) / 1024, 2)
            row["server_fds"] = sum(fixtures.proc_fds(p) for p in srv.pids())
            cpu_a, g_a, w_a = srv.cpu_seconds(), self.gen_cpu(), time.perf_counter()
            time.sleep(a.idle_s)
            cpu_b, g_b, w_b = srv.cpu_seconds(), self.gen_cpu(), time.perf_counter()
            row["idle_window_s"] = round(w_b - w_a, 2)
            row["idle_cpu_s"] = round(cpu_b - cpu_a, 3)
            row["idle_cpu_pct_core"] = round(100 * (cpu_b - cpu_a) / (w_b - w_a), 2)
            row["gen_cpu_pct"] = round(100 * (g_b - g_a) / (w_b - w_a), 1)
            stats = self.pool.all({"op": "stats"}) if self.pool else []
            row["still_open"] = sum(s["open"] for s in stats)
            row["close_codes"] = merge_counts(stats, "close_codes")
            out["levels"].append(row)
            log(f"{t.name}: {connected} idle sockets, connect {c['rate_per_s']}/s, "
                f"{row['rss_per_conn_kib']} KiB/socket, idle CPU {row['idle_cpu_pct_core']}% of a core")
        self.close_all()
        return out

    def quiesce(self, t: Target, max_s: float | None = None, below: float = 0.15) -> float:
        """Wait (bounded) until the server's CPU use drops below ``below`` of a core: join storms leave work behind
        (chatd: presence frames to every member).  Returns the seconds waited."""
        start = time.perf_counter()
        max_s = max_s if max_s is not None else (2.0 if self.args.quick else 15.0)
        time.sleep(self.args.settle_s)
        while time.perf_counter() - start < max_s:
            c0, w0 = t.server.cpu_seconds(), time.perf_counter()
            time.sleep(0.5)
            if (t.server.cpu_seconds() - c0) / (time.perf_counter() - w0) < below:
                break
        return round(time.perf_counter() - start, 2)

    def gen_cpu(self) -> float:
        return self.pool.cpu_seconds() if self.pool else 0.0

    def _chat_round(
        self, t: Target, senders: list[tuple[int, int]], interval_s: float, duration_s: float,
        track_deliver: bool = True, drain_s: float = 10.0,
    ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        """One round of scheduled sends, then a drain (bounded by ``drain_s``) in which refused sends are still
        retried; what is unacked at its end is reported as never acked."""
        assert self.pool is not None
        parts: list[list[tuple[int, int]]] = [[] for _ in range(self.w)]
        for k, room in senders:
            parts[k % self.w].append((k, room))
        start_at = time.time() + (0.2 if self.args.quick else 0.5)  # every generator starts together
        cmds = [
            {
                "op": "chat", "senders": p, "interval_s": interval_s, "duration_s": duration_s, "start_at": start_at,
                "pad": self.args.pad, "track_deliver": track_deliver, "drain_s": drain_s,
            }
            for p in parts
        ]
        srv = t.server
        cpu0, g0 = srv.cpu_seconds(), self.gen_cpu()
        svc0 = self.services_cpu()
        res = self.pool.call(cmds, timeout_s=duration_s + drain_s + 120)
        cpu1, g1 = srv.cpu_seconds(), self.gen_cpu()
        svc1 = self.services_cpu()
        wall = max(r["wall_s"] for r in res)
        send_wall = max(r["send_wall_s"] for r in res)
        sent = sum(r["sent"] for r in res)
        deferred = sum(r.get("deferred", 0) for r in res)  # held back by the generator after a busy
        offered = sum(r.get("offered", 0) for r in res)  # distinct messages sent at least once
        delivered = sum(r["delivered"] for r in res)
        server_cpu = cpu1 - cpu0
        # Per process: one started in the window counts from 0; one that exited in it is lost (an undercount,
        # never a negative figure as a plain difference of sums would give).
        svc_cpu = sum(max(0.0, cpu - svc0.get(pid, 0.0)) for pid, cpu in svc1.items())
        # All-in: what a delivery costs the machine, the server's Postgres and Valkey work included.
        allin_cpu = server_cpu + (svc_cpu if t.uses_services else 0.0)
        agg = {
            "sent": sent,
            "offered": offered,
            "retries": sum(r.get("retries", 0) for r in res),
            "never_acked": sum(r.get("never_acked", 0) for r in res),
            "tries": merge_counts(res, "tries"),
            "deferred": deferred,
            "offered_per_s": round((offered + deferred) / send_wall, 1) if send_wall else None,
            "first_tries_per_s": round(offered / send_wall, 1) if send_wall else None,
            "acked": sum(r["acked"] for r in res),
            "acked_per_s": round(sum(r.get("acked_in_window", r["acked"]) for r in res) / send_wall, 1)
            if send_wall else None,
            "send_rate_per_s": round(sent / send_wall, 1) if send_wall else None,
            "delivered": delivered,
            "delivered_per_s": round(delivered / send_wall, 1) if send_wall else None,
            "errors": merge_counts(res, "errors"),
            "ack_ms": summary(merge_lists(res, "lat_ack")),  # the accepted try's own send -> ack
            "final_ack_ms": summary(merge_lists(res, "lat_final")),  # first try -> final ack, retries included
            "echo_ms": summary(merge_lists(res, "lat_echo")),
            "deliver_ms": summary(merge_lists(res, "lat_deliver")),
            "server_cpu_s": round(server_cpu, 2),
            "server_cpu_pct_core": round(100 * server_cpu / wall, 1) if wall else None,
            "server_cpu_s_per_10k_frames": round(server_cpu / delivered * 1e4, 4) if delivered else None,
            "server_cpu_s_per_1m_msgs": round(server_cpu / delivered * 1e6, 1) if delivered else None,
            "pg_valkey_cpu_s": round(svc_cpu, 2),
            "allin_cpu_s": round(allin_cpu, 2),
            "allin_cpu_s_per_1m_msgs": round(allin_cpu / delivered * 1e6, 1) if delivered else None,
            "gen_cpu_pct": round(100 * (g1 - g0) / wall, 1) if wall else None,
            "wall_s": round(wall, 2),
            "send_wall_s": round(send_wall, 2),
            "still_open": sum(r["open"] for r in res),
            "close_codes": merge_counts(res, "close_codes"),
            "sched_late_p99_ms": max((r["sched_late_p99_ms"] or 0) for r in res),
        }
        agg["loss"] = self.loss(res)
        if agg["gen_cpu_pct"] and agg["gen_cpu_pct"] > 90:
            agg["warning"] = "generator CPU > 90%: figures may be generator-bound"
        return res, agg

    def services_cpu(self) -> dict[int, float]:
        """CPU seconds of each Postgres and Valkey process now."""
        if self.services is None:
            return {}
        return {p: fixtures.proc_cpu_seconds(p) for p in self.services.pids()}

    def wl_fanout(self, t: Target) -> dict[str, Any]:
        a = self.args
        n = min(a.fanout_conns, t.max_conns)
        r = a.fanout_room_size
        keys = list(range(n))
        groups = [keys[i : i + r] for i in range(0, n, r)]
        rooms = t.rooms(groups, "group", first_id=1)
        room_of = {k: rooms[i // r] for i, k in enumerate(keys)}
        out: dict[str, Any] = {"conns": n, "room_size": r, "rooms": len(rooms), "interval_s": a.fanout_interval,
                               "duration_s": a.fanout_duration}
        out["connect"] = self.connect(t, keys)
        out["join"] = self.join([(k, room_of[k]) for k in keys])
        out["quiesce_s"] = self.quiesce(t)
        xact0, m0 = self.pg_xacts(t), self.scrape(t)
        _, agg = self._chat_round(t, [(k, room_of[k]) for k in keys], a.fanout_interval, a.fanout_duration)
        out.update(agg)
        if t.kind == "chatd":
            out["durability"] = self.durability(t, rooms, agg["send_wall_s"], xact0)
            out["durability"]["metrics"] = self.metric_deltas(m0, self.scrape(t))
        log(f"{t.name}: fan-out {agg['delivered_per_s']} msg/s delivered, echo p99 {agg['echo_ms'].get('p99')} ms,"
            f" loss {agg['loss']['missing']} dup {agg['loss']['duplicates']}, CPU {agg['server_cpu_pct_core']}%")
        self.close_all()
        return out

    @staticmethod
    def scrape(t: Target) -> dict[str, float]:
        """chatd's GET /metrics (all workers), as {sample name with labels: value}; {} when unavailable."""
        if t.kind != "chatd":
            return {}
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{t.server.port}/metrics", timeout=5) as resp:
                text = resp.read().decode()
        except (OSError, ValueError):
            return {}
        out: dict[str, float] = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                with contextlib.suppress(ValueError):
                    out[name] = float(value)
        return out

    @staticmethod
    def metric_deltas(before: dict[str, float], after: dict[str, float]) -> dict[str, Any]:
        def d(name: str) -> float:
            return after.get(name, 0.0) - before.get(name, 0.0)

        batches = d("chatd_commit_batch_messages_count")
        commits = d("chatd_commit_seconds_count")
        buckets = {k: d(k) for k in after if k.startswith("chatd_commit_batch_messages_bucket")}
        return {
            "messages_committed": d("chatd_messages_committed_total"),
            "commit_batches": batches,
            "commit_batch_mean": round(d("chatd_commit_batch_messages_sum") / batches, 2) if batches else None,
            "commit_batch_le_buckets": {k.split('le="')[1].rstrip('"}'): v for k, v in buckets.items()},
            "commit_ms_mean": round(d("chatd_commit_seconds_sum") / commits * 1000, 2) if commits else None,
            "frames_delivered_by_server": d("chatd_fanout_frames_delivered_total"),
        }

    def pg_xacts(self, t: Target) -> int:
        if t.kind != "chatd":
            return 0
        import psycopg

        with psycopg.connect(t.database_url, autocommit=True) as conn:
            row = conn.execute("SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()").fetchone()
        return int(row[0]) if row else 0

    def durability(self, t: Target, rooms: list[int], wall_s: float, xact0: int) -> dict[str, Any]:
        """Group commit as Postgres saw it: rows, and batches (rows of one transaction share created_at = now())."""
        import psycopg

        with psycopg.connect(t.database_url, autocommit=True) as conn:
            sizes = [
                int(r[0])
                for r in conn.execute(
                    "SELECT count(*) FROM messages WHERE room_id = ANY(%s) GROUP BY created_at", (rooms,)
                ).fetchall()
            ]
        xacts = self.pg_xacts(t) - xact0
        committed = sum(sizes)
        return {
            "committed": committed,
            "committed_per_s": round(committed / wall_s, 1) if wall_s else None,
            "batches": len(sizes),
            "batch_size": summary([float(s) for s in sizes]),
            "pg_xact_commits_per_s": round(xacts / wall_s, 1) if wall_s else None,
        }

    def wl_hot(self, t: Target) -> dict[str, Any]:
        a = self.args
        m = min(a.hot_members, t.max_conns)
        keys = list(range(m))
        [room] = t.rooms([keys], "group", first_id=1_000_000)
        probes = set(keys[: a.hot_probes])
        light = set(keys) - probes
        out: dict[str, Any] = {"members": m, "probes": len(probes), "step_s": a.hot_step_s, "steps": []}
        out["connect"] = self.connect(t, keys, light=light)
        out["join"] = self.join([(k, room) for k in keys])
        out["quiesce_s"] = self.quiesce(t)
        # Warm-up (not measured): first frames pay for lazy set-up (Redis subscriptions, caches) on every server.
        if not a.quick:  # the smoke run checks that figures come out, not what they are
            self._chat_round(t, [(0, room)], 1.0 / a.hot_rates[0], 1.0, drain_s=2.0)
        best = None
        for rate in a.hot_rates:
            _, agg = self._chat_round(t, [(0, room)], 1.0 / rate, a.hot_step_s, drain_s=5.0)
            p99 = agg["deliver_ms"].get("p99")
            step = {"rate": rate, **{k: agg[k] for k in (
                "sent", "send_rate_per_s", "delivered", "delivered_per_s", "echo_ms", "deliver_ms", "server_cpu_s",
                "server_cpu_pct_core", "server_cpu_s_per_1m_msgs", "gen_cpu_pct", "loss", "still_open", "errors",
            )}}
            out["steps"].append(step)
            ok = (p99 is not None and p99 <= P99_LIMIT_MS and agg["loss"]["ok"] and agg["still_open"] == m
                  and agg["send_rate_per_s"] and agg["send_rate_per_s"] >= 0.9 * rate)
            log(f"{t.name}: hot room {rate}/s -> sent {agg['send_rate_per_s']}/s, delivery p99 {p99} ms, "
                f"CPU {agg['server_cpu_pct_core']}%, gen {agg['gen_cpu_pct']}%{'' if ok else '  (limit)'}")
            if not ok:
                break
            best = rate
        out["best_rate_p99_under_100ms"] = best
        self.close_all()
        return out

    def wl_overload(self, t: Target) -> dict[str, Any]:
        """Offered sends/s stepped past the commit capacity, rooms of 2 (the commit, not the fan-out, is the
        limit).  Refused sends are retried after ``retry_after_ms`` (docs/PROTOCOL.md §3, §10); each step reports
        acked/s within the send window and its share of the best step, accepted-try and first-try->final-ack
        latencies, and every offered message that was never acked."""
        a = self.args
        n = min(a.overload_conns, t.max_conns) // 2 * 2
        keys = list(range(n))
        groups = [keys[i : i + 2] for i in range(0, n, 2)]
        rooms = t.rooms(groups, "group", first_id=2_000_000)
        room_of = {k: rooms[i // 2] for i, k in enumerate(keys)}
        out: dict[str, Any] = {"conns": n, "room_size": 2, "step_s": a.overload_step_s, "steps": []}
        out["connect"] = self.connect(t, keys)
        out["join"] = self.join([(k, room_of[k]) for k in keys])
        for rate in a.overload_rates:
            out["quiesce_s"] = self.quiesce(t)  # the last step's backlog committed before the next starts
            # Retries of the last sends may wait up to 5 s (retry_after_ms) each: drain long enough for a few.
            _, agg = self._chat_round(t, [(k, room_of[k]) for k in keys], n / rate, a.overload_step_s,
                                      track_deliver=False, drain_s=a.overload_drain_s)
            step = {"rate": rate, **{k: agg[k] for k in (
                "offered", "offered_per_s", "first_tries_per_s", "deferred", "sent", "retries", "never_acked",
                "tries", "acked", "acked_per_s", "delivered_per_s", "ack_ms", "final_ack_ms", "server_cpu_pct_core",
                "server_cpu_s_per_1m_msgs", "pg_valkey_cpu_s", "allin_cpu_s_per_1m_msgs", "gen_cpu_pct", "loss",
                "errors", "still_open",
            )}}
            step["busy"] = agg["errors"].get("send:busy", 0)
            out["steps"].append(step)
            log(f"{t.name}: overload {rate}/s offered -> {agg['acked_per_s']} acked/s, busy {step['busy']}, "
                f"retries {agg['retries']}, final ack p99 {agg['final_ack_ms'].get('p99')} ms, never acked "
                f"{agg['never_acked']}, missing {agg['loss']['missing']}, CPU {agg['server_cpu_pct_core']}%")
        peak = max((s["acked_per_s"] or 0 for s in out["steps"]), default=0)
        out["peak_acked_per_s"] = peak
        for s in out["steps"]:
            s["pct_of_peak"] = round(100 * (s["acked_per_s"] or 0) / peak, 1) if peak else None
        self.close_all()
        return out

    def wl_assistant(self, t: Target) -> dict[str, Any]:
        a = self.args
        s = a.asst_streams
        keys = list(range(s))
        rooms = t.rooms([[k] for k in keys], "assistant")
        out: dict[str, Any] = {"streams": s, "tokens_per_s": a.tokens_per_s}
        out["connect"] = self.connect(t, keys)
        out["join"] = self.join([(k, rooms[k]) for k in keys])
        out["quiesce_s"] = self.quiesce(t)
        assert self.pool is not None
        parts: list[list[tuple[int, int]]] = [[] for _ in range(self.w)]
        for k in keys:
            parts[k % self.w].append((k, rooms[k]))
        start_at = time.time() + 0.5
        cpu0, g0 = t.server.cpu_seconds(), self.gen_cpu()
        res = self.pool.call(
            [{"op": "assistant", "prompts": p, "start_at": start_at, "timeout_s": a.asst_timeout,
              "tokens_per_s": a.tokens_per_s} for p in parts],
            timeout_s=a.asst_timeout + 60,
        )
        cpu1, g1 = t.server.cpu_seconds(), self.gen_cpu()
        wall = max(r["wall_s"] for r in res)
        token_ms = 1000.0 / a.tokens_per_s
        first = merge_lists(res, "first_chunk")
        out.update(
            {
                "ended": sum(r["ended"] for r in res),
                "prompt_retries": sum(r.get("retries", 0) for r in res),  # prompts refused busy, then resent
                "stop_reasons": merge_counts(res, "stop_reasons"),
                "refused": merge_counts(res, "refused"),
                "errors": merge_counts(res, "errors"),
                "send_to_ack_ms": summary(merge_lists(res, "to_ack")),
                "send_to_stream_start_ms": summary(merge_lists(res, "to_start")),
                "send_to_first_chunk_ms": summary(first),
                "first_token_overhead_ms": summary([x - token_ms for x in first]),
                "provider_first_token_ms": token_ms,
                "chunk_gap_ms": summary(merge_lists(res, "gaps")),
                "chunk_lag_ms": summary(merge_lists(res, "lag")),
                "expected_chunk_gap_ms": max(40.0, token_ms),
                "full_answer_ms": summary(merge_lists(res, "full")),
                "server_first_token_ms": summary(merge_lists(res, "server_first_token")),
                "chunks_per_answer": summary([float(x) for x in merge_lists(res, "chunks_per_answer")]),
                "tokens_per_s_delivered": summary(merge_lists(res, "tokens_per_s_delivered")),
                "tokens_per_s_delivered_p5": round(pct(merge_lists(res, "tokens_per_s_delivered"), 0.05) or 0, 1),
                "server_cpu_s": round(cpu1 - cpu0, 2),
                "server_cpu_pct_core": round(100 * (cpu1 - cpu0) / wall, 1) if wall else None,
                "gen_cpu_pct": round(100 * (g1 - g0) / wall, 1) if wall else None,
                "wall_s": round(wall, 2),
                "loss": self.loss(res),
                "close_codes": merge_counts(res, "close_codes"),
            }
        )
        log(f"{t.name}: assistant {out['ended']}/{s} answers, first chunk p99 "
            f"{out['send_to_first_chunk_ms'].get('p99')} ms, chunk lag p99 {out['chunk_lag_ms'].get('p99')} ms")
        self.close_all()
        return out

    # -- run ---------------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        a = self.args
        started = datetime.now(UTC)
        load_start = " ".join(f"{x:.2f}" for x in os.getloadavg())
        nofile = fixtures.raise_nofile()
        if a.gen_cpus and hasattr(os, "sched_setaffinity"):
            with contextlib.suppress(OSError, ValueError):
                os.sched_setaffinity(0, {int(c) for c in a.gen_cpus.split(",")})
        log(f"RLIMIT_NOFILE {nofile}; harness, Postgres, Valkey and generators on CPU {a.gen_cpus}, "
            f"servers on CPU {a.server_cpus}; temp dir {self.tmp}")
        self.services = Services(self.tmp / "svc", os.environ.get("DATABASE_URL", ""),
                                 os.environ.get("REDIS_URL", "")).start()
        self.pool = GenPool(a.gen_procs)
        runs: list[dict[str, Any]] = []
        for i in range(a.runs):
            # Every run has every target, so each ratio is taken within one run; the order flips every other
            # run so that no target always runs first (fresh Postgres) or last (bloated tables, warm caches).
            order = a.targets if i % 2 == 0 else a.targets[::-1]
            if a.runs > 1:
                log(f"run {i + 1} of {a.runs}: {', '.join(order)}")
            self.results = {name: {} for name in a.targets}
            for name in order:
                self.run_target(name, self.results[name])
            runs.append({"order": order, "targets": self.results, "ratios": ratios(self.results)})
        report = {
            "started": started.isoformat(timespec="seconds"),
            # A figure taken while other work shared the cores is not a quiet figure: say so next to it.
            "load_start": load_start,
            "load_end": " ".join(f"{x:.2f}" for x in os.getloadavg()),
            "duration_s": round((datetime.now(UTC) - started).total_seconds(), 1),
            "command": " ".join(shlex.quote(x) for x in [Path(sys.executable).name, *sys.argv]),
            "quick": a.quick,
            "machine": fixtures.machine_info(),
            "versions": fixtures.versions(),
            "git": fixtures.git_revision(),
            "placement": {"server_cpus": a.server_cpus, "generator_cpus": a.gen_cpus, "generator_procs": a.gen_procs,
                          "postgres_valkey_cpus": a.gen_cpus},
            "settings": {k: v for k, v in vars(a).items() if k not in ("targets", "workloads")},
            "runs": runs,
            # Each figure over the runs: a plain number when every run gave the same, else a Spread (median,
            # range); the markdown prints median [min–max], the JSON the values of every run as well.
            "targets": merge_runs([r["targets"] for r in runs]),
            "ratios": merge_runs([r["ratios"] for r in runs]) or {},
            "notes": self.notes,
        }
        return report

    def run_target(self, name: str, res: dict[str, Any]) -> None:
        """Start one target, run every workload on it, stop it."""
        a = self.args
        t: Target | None = None
        try:
            t = self.make_target(name)
            res["note"] = t.note
            t.server.start()
            time.sleep(0.3 if a.quick else 1.0)
            log(f"{name}: serving on 127.0.0.1:{t.server.port} (pids {t.server.pids()})")
            for wl in a.workloads:
                if wl in ("assistant", "overload") and t.kind != "chatd":
                    continue  # only chatd has an assistant and a commit to overload
                w0 = time.perf_counter()
                try:
                    res[wl] = getattr(self, f"wl_{wl}")(t)
                    res[wl]["workload_wall_s"] = round(time.perf_counter() - w0, 1)  # to plan a full run's time
                except Exception as exc:
                    log(f"{name}: workload {wl} failed: {exc!r}")
                    res[wl] = {"error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc()[-2000:]}
                    with contextlib.suppress(Exception):
                        self.close_all()
                time.sleep(a.settle_s)
        except Exception as exc:
            log(f"{name}: failed: {exc!r}")
            res["error"] = f"{type(exc).__name__}: {exc}"
        finally:
            if t is not None:
                t0 = time.perf_counter()
                t.server.stop()
                log(f"{name}: stopped in {time.perf_counter() - t0:.1f} s")
                res["server_log"] = log_summary(t.server.log_path)

    def close(self) -> None:
        t0 = time.perf_counter()
        if self.pool is not None:
            self.pool.stop()
        if self.services is not None:
            self.services.stop()
        log(f"generators, Postgres and Valkey stopped in {time.perf_counter() - t0:.1f} s")
        if not self.args.keep:
            shutil.rmtree(self.tmp, ignore_errors=True)


def log_summary(path: Path) -> dict[str, int]:
    """Warnings and errors the server logged, counted by event (chatd's JSON lines) or first line (others)."""
    counts: dict[str, int] = {}
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return counts
    for line in text.splitlines():
        key = None
        if line.startswith("{"):
            try:
                ev = json.loads(line)
            except ValueError:
                continue
            if ev.get("level") in ("warning", "error", "critical"):
                key = f"{ev['level']} {ev.get('event')}" + (f": {str(ev['error'])[:60]}" if ev.get("error") else "")
        elif line.startswith(("Traceback", "Task exception")) or "Error:" in line[:120]:
            key = line[:100]
        if key:
            counts[key] = counts.get(key, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: -kv[1])[:15])


# -- report ------------------------------------------------------------------------------------


def _get(d: Any, *path: Any) -> Any:
    for p in path:
        if isinstance(d, dict):
            d = d.get(p)
        elif isinstance(d, list) and isinstance(p, int) and -len(d) <= p < len(d):
            d = d[p]
        else:
            return None
    return d


def _level(res: dict[str, Any], conns: int) -> dict[str, Any] | None:
    row: dict[str, Any]
    for row in _get(res, "connections", "levels") or []:
        if row.get("conns") == conns and "skipped" not in row:
            return row
    return None


def ratios(results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """chatd / each reference (baseline, websockets, peer, baseline-stream) for the headline metrics, all from
    one run.  The all-in ratio divides chatd's server + Postgres + Valkey CPU by the reference's own (the
    in-memory references use no services; the peer's Valkey is counted)."""
    metrics: dict[str, Callable[[dict[str, Any]], Any]] = {
        "fanout_delivered_per_s": lambda r: _get(r, "fanout", "delivered_per_s"),
        "fanout_echo_p99_ms": lambda r: _get(r, "fanout", "echo_ms", "p99"),
        "fanout_cpu_s_per_1m_msgs": lambda r: _get(r, "fanout", "server_cpu_s_per_1m_msgs"),
        "fanout_allin_cpu_s_per_1m_msgs": lambda r: _get(r, "fanout", "allin_cpu_s_per_1m_msgs"),
        "hot_best_rate": lambda r: _get(r, "hot", "best_rate_p99_under_100ms"),
        "rss_per_conn_kib": lambda r: _get(r, "connections", "levels", -1, "rss_per_conn_kib")
        if _get(r, "connections", "levels", -1, "skipped") is None else None,
        "connect_rate_per_s": lambda r: max(
            [lv["connect"]["rate_per_s"] or 0 for lv in _get(r, "connections", "levels") or [] if "connect" in lv],
            default=None,
        ),
    }
    out: dict[str, Any] = {}
    pairs = [(c, ref) for c in results if c.startswith("chatd")
             for ref in ("baseline", "websockets", "peer", "baseline-stream")]
    pairs.append(("baseline", "baseline-stream"))  # what the direct write is worth to the baseline itself
    for chatd, ref in pairs:
        if chatd in results and ref in results:
            row = {}
            for name, fn in metrics.items():
                try:
                    x, y = fn(results[chatd]), fn(results[ref])
                except (TypeError, KeyError, ValueError):
                    x = y = None
                numbers = isinstance(x, (int, float)) and isinstance(y, (int, float)) and y
                row[name] = round(x / y, 3) if numbers else None
            out[f"{chatd}/{ref}"] = row
    return out


def fmt(x: Any, nd: int = 1) -> str:
    if x is None:
        return "–"
    if isinstance(x, Spread):
        return x.render(nd)
    if isinstance(x, float):
        return f"{x:,.{nd}f}"
    if isinstance(x, int):
        return f"{x:,}"
    return str(x)


def markdown(rep: dict[str, Any]) -> str:
    res = rep["targets"]
    names = list(res)
    m = rep["machine"]
    v = rep["versions"]
    lines = [
        f"# chatd benchmark {rep['started']}{' (quick)' if rep['quick'] else ''}",
        "",
        f"- command: `{rep['command']}` ({rep['duration_s']} s), git {rep['git'] or '?'}",
        f"- runs: {len(rep['runs'])}" + (" (every target in each, order flipped every other run); each figure is"
                                          " the median [min–max] over the runs, each ratio the median [min–max]"
                                          " of the runs' own ratios" if len(rep["runs"]) > 1 else ""),
        f"- load average at start / end: {rep.get('load_start', '?')} / {rep.get('load_end', '?')}",
        f"- machine: {m['cpu_model']}, {m['cores']} cores, {m['ram_gib']} GiB, kernel {m['kernel']},"
        f" nofile {m['nofile_soft']}/{m['nofile_hard']}, ports {m['ip_local_port_range']}, somaxconn {m['somaxconn']}",
        "- versions: " + ", ".join(f"{k} {val}" for k, val in v.items()),
        f"- placement: servers on CPU {rep['placement']['server_cpus']}; generator"
        f" ({rep['placement']['generator_procs']} processes), Postgres and Valkey on CPU"
        f" {rep['placement']['generator_cpus']}",
        "- targets: " + "; ".join(f"**{n}** = {res[n].get('note', '')}" for n in names),
        "",
    ]

    def table(title: str, rows: list[tuple[str, Any]]) -> None:
        lines.extend([f"## {title}", "", "| metric | " + " | ".join(names) + " |",
                      "|---|" + "---|" * len(names)])
        for label, fn in rows:
            cells = []
            for n in names:
                try:
                    cells.append(fmt(fn(res[n])))
                except (KeyError, TypeError, IndexError, ValueError):
                    cells.append("–")
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        lines.append("")

    levels = sorted({lv["conns"] for n in names for lv in _get(res[n], "connections", "levels") or []})
    conn_rows: list[tuple[str, Any]] = []
    for lv in levels:
        def row(r: dict[str, Any], lv: int = lv, *path: str) -> Any:
            x = _level(r, lv)
            if x is None:
                skipped = [y for y in _get(r, "connections", "levels") or [] if y.get("conns") == lv]
                return "n/a (fd limit)" if skipped and "skipped" in skipped[0] else None
            return _get(x, *path)

        conn_rows += [
            (f"{lv:,} open / connected", lambda r, lv=lv: (lambda x: f"{x['open']:,}" + (
                f" ({x['connect']['failed']} failed)" if x["connect"]["failed"] else "") if isinstance(x, dict)
                else x)(_level(r, lv) or row(r, lv))),
            (f"{lv:,} connect rate /s", lambda r, lv=lv: row(r, lv, "connect", "rate_per_s")),
            (f"{lv:,} connect p99 ms", lambda r, lv=lv: row(r, lv, "connect", "connect_ms", "p99")),
            (f"{lv:,} RSS KiB / socket", lambda r, lv=lv: row(r, lv, "rss_per_conn_kib")),
            (f"{lv:,} idle CPU % core", lambda r, lv=lv: row(r, lv, "idle_cpu_pct_core")),
        ]
    table("1. Connection scale (idle authenticated sockets)", conn_rows)

    f = ("fanout",)
    table("2. Chat fan-out", [
        ("sockets / room size", lambda r: f"{_get(r, *f, 'conns'):,} / {_get(r, *f, 'room_size')}"),
        ("sends /s offered (held back after busy)", lambda r: f"{fmt(_get(r, *f, 'offered_per_s'))} "
         f"({fmt(_get(r, *f, 'deferred'))})"),
        ("sends /s made (retries)", lambda r: f"{fmt(_get(r, *f, 'send_rate_per_s'))} "
         f"({fmt(_get(r, *f, 'retries'))})"),
        ("acked /s", lambda r: _get(r, *f, "acked_per_s")),
        ("delivered msg /s", lambda r: _get(r, *f, "delivered_per_s")),
        ("send->echo p50 ms", lambda r: _get(r, *f, "echo_ms", "p50")),
        ("send->echo p95 ms", lambda r: _get(r, *f, "echo_ms", "p95")),
        ("send->echo p99 ms", lambda r: _get(r, *f, "echo_ms", "p99")),
        ("send->ack p99 ms (accepted try)", lambda r: _get(r, *f, "ack_ms", "p99")),
        ("first try->final ack p99 ms", lambda r: _get(r, *f, "final_ack_ms", "p99")),
        ("delivery p99 ms (other members)", lambda r: _get(r, *f, "deliver_ms", "p99")),
        ("server CPU % core", lambda r: _get(r, *f, "server_cpu_pct_core")),
        ("server CPU s / 10k frames", lambda r: _get(r, *f, "server_cpu_s_per_10k_frames")),
        ("server CPU s / 1M msgs (= µs / delivery)", lambda r: _get(r, *f, "server_cpu_s_per_1m_msgs")),
        ("Postgres+Valkey CPU s", lambda r: _get(r, *f, "pg_valkey_cpu_s")),
        ("all-in CPU s / 1M msgs (server + Postgres + Valkey)", lambda r: _get(r, *f, "allin_cpu_s_per_1m_msgs")),
        ("loss (missing / dup / out of order)", lambda r: "{missing} / {duplicates} / {out_of_order}".format(
            **_get(r, *f, "loss")) + (f" + {_get(r, *f, 'loss', 'unjoined')} unjoined"
                                      if _get(r, *f, "loss", "unjoined") else "")
            + (f" + {_get(r, *f, 'loss', 'never_acked')} never acked"
               if _get(r, *f, "loss", "never_acked") else "")),
        ("joins /s (retried, failed)", lambda r: f"{fmt(_get(r, *f, 'join', 'rate_per_s'))} "
         f"({_get(r, *f, 'join', 'retried')}, {_get(r, *f, 'join', 'failed')})"),
        ("errors", lambda r: ", ".join(f"{k} {n}" for k, n in (_get(r, *f, "errors") or {}).items()) or "0"),
        ("generator CPU %", lambda r: _get(r, *f, "gen_cpu_pct")),
    ])
    h = ("hot",)
    hot_rows: list[tuple[str, Any]] = [
        ("members (latency probes)", lambda r: f"{_get(r, *h, 'members'):,} ({_get(r, *h, 'probes')})"),
        ("best rate with p99 < 100 ms (msg/s)", lambda r: _get(r, *h, "best_rate_p99_under_100ms")),
        ("joins /s (retried, failed)", lambda r: f"{fmt(_get(r, *h, 'join', 'rate_per_s'))} "
         f"({_get(r, *h, 'join', 'retried')}, {_get(r, *h, 'join', 'failed')})"),
    ]
    rates = sorted({s["rate"] for n in names for s in _get(res[n], "hot", "steps") or []})
    for rate in rates:
        def step(r: dict[str, Any], rate: int = rate) -> dict[str, Any] | None:
            return next((s for s in _get(r, "hot", "steps") or [] if s["rate"] == rate), None)

        hot_rows.append((f"{rate}/s: sent/s, p99 ms, CPU %", lambda r, step=step: (lambda s: "–" if s is None else
                         f"{fmt(s['send_rate_per_s'])}, {fmt(_get(s, 'deliver_ms', 'p99'))}, "
                         f"{fmt(s['server_cpu_pct_core'])}")(step(r))))
    table("3. Hot room (one sender, rate stepped up)", hot_rows)

    asst = [n for n in names if "assistant" in res[n]]
    if asst:
        s = ("assistant",)
        table("4. Assistant streaming (offline provider)", [
            ("streams / answered", lambda r: f"{_get(r, *s, 'streams')} / {_get(r, *s, 'ended')}"
             if _get(r, *s, "streams") else None),
            ("refused (stored, acked, no answer)", lambda r: ", ".join(
                f"{k} {n}" for k, n in (_get(r, *s, "refused") or {}).items()) or "0" if _get(r, *s, "streams")
             else None),
            ("tokens/s per stream", lambda r: _get(r, *s, "tokens_per_s")),
            ("send->first chunk p50 ms", lambda r: _get(r, *s, "send_to_first_chunk_ms", "p50")),
            ("send->first chunk p99 ms", lambda r: _get(r, *s, "send_to_first_chunk_ms", "p99")),
            ("first-token overhead p99 ms", lambda r: _get(r, *s, "first_token_overhead_ms", "p99")),
            ("send->ack p99 ms", lambda r: _get(r, *s, "send_to_ack_ms", "p99")),
            ("send->stream_start p99 ms", lambda r: _get(r, *s, "send_to_stream_start_ms", "p99")),
            ("chunk gap p50 / p99 ms (expected)", lambda r: f"{fmt(_get(r, *s, 'chunk_gap_ms', 'p50'))} / "
             f"{fmt(_get(r, *s, 'chunk_gap_ms', 'p99'))} ({fmt(_get(r, *s, 'expected_chunk_gap_ms'))})"),
            ("chunk lag vs provider schedule p99 ms", lambda r: _get(r, *s, "chunk_lag_ms", "p99")),
            ("tokens/s delivered per stream p50 / p5", lambda r: f"{fmt(_get(r, *s, 'tokens_per_s_delivered', 'p50'))}"
             f" / {fmt(_get(r, *s, 'tokens_per_s_delivered_p5'))}"),
            ("full answer p50 / p99 ms", lambda r: f"{fmt(_get(r, *s, 'full_answer_ms', 'p50'))} / "
             f"{fmt(_get(r, *s, 'full_answer_ms', 'p99'))}"),
            ("server CPU % core", lambda r: _get(r, *s, "server_cpu_pct_core")),
            ("loss (missing / dup)", lambda r: "{missing} / {duplicates}".format(**_get(r, *s, "loss"))),
        ])
        d = ("fanout", "durability")
        table("5. Durability (group commit during the fan-out workload)", [
            ("messages committed /s", lambda r: _get(r, *d, "committed_per_s")),
            ("delivered msg/s in the same run", lambda r: _get(r, "fanout", "delivered_per_s")),
            ("batches", lambda r: _get(r, *d, "batches")),
            ("batch size mean / p95 / max", lambda r: f"{fmt(_get(r, *d, 'batch_size', 'mean'))} / "
             f"{fmt(_get(r, *d, 'batch_size', 'p95'))} / {fmt(_get(r, *d, 'batch_size', 'max'))}"),
            ("PG commits /s (all statements)", lambda r: _get(r, *d, "pg_xact_commits_per_s")),
            ("/metrics: batch mean, commit ms mean", lambda r: f"{fmt(_get(r, *d, 'metrics', 'commit_batch_mean'))}, "
             f"{fmt(_get(r, *d, 'metrics', 'commit_ms_mean'))}" if _get(r, *d, "metrics", "commit_batches") else None),
        ])
    over = [n for n in names if "overload" in res[n]]
    if over:
        o = ("overload",)
        over_rows: list[tuple[str, Any]] = [
            ("sockets (rooms of 2)", lambda r: _get(r, *o, "conns")),
            ("peak acked /s (best step)", lambda r: _get(r, *o, "peak_acked_per_s")),
        ]
        orates = sorted({s["rate"] for n in over for s in _get(res[n], *o, "steps") or []})
        for rate in orates:
            def ostep(r: dict[str, Any], rate: int = rate) -> dict[str, Any] | None:
                return next((s for s in _get(r, "overload", "steps") or [] if s["rate"] == rate), None)

            def cell(r: dict[str, Any], fn: Callable[[dict[str, Any]], str], ostep: Any = ostep) -> str:
                st = ostep(r)
                return "–" if st is None else fn(st)

            over_rows += [
                (f"{rate:,}/s: offered /s, acked /s (% of peak)", lambda r, cell=cell: cell(
                    r, lambda s: f"{fmt(s['offered_per_s'])}, {fmt(s['acked_per_s'])} ({fmt(s['pct_of_peak'])} %)")),
                (f"{rate:,}/s: busy, retries, never acked", lambda r, cell=cell: cell(
                    r, lambda s: f"{fmt(s['busy'])}, {fmt(s['retries'])}, {fmt(s['never_acked'])}")),
                (f"{rate:,}/s: ack p50 / p99 ms (accepted try)", lambda r, cell=cell: cell(
                    r, lambda s: f"{fmt(_get(s, 'ack_ms', 'p50'))} / {fmt(_get(s, 'ack_ms', 'p99'))}")),
                (f"{rate:,}/s: first try->final ack p50 / p99 ms", lambda r, cell=cell: cell(
                    r, lambda s: f"{fmt(_get(s, 'final_ack_ms', 'p50'))} / {fmt(_get(s, 'final_ack_ms', 'p99'))}")),
                (f"{rate:,}/s: server CPU %, all-in CPU s / 1M msgs, generator CPU %", lambda r, cell=cell: cell(
                    r, lambda s: f"{fmt(s['server_cpu_pct_core'])}, {fmt(s['allin_cpu_s_per_1m_msgs'])}, "
                    f"{fmt(s['gen_cpu_pct'])}")),
                (f"{rate:,}/s: missing / dup at the receivers", lambda r, cell=cell: cell(
                    r, lambda s: f"{fmt(_get(s, 'loss', 'missing'))} / {fmt(_get(s, 'loss', 'duplicates'))}")),
            ]
        table("6. Overload (rooms of 2, refused sends retried after retry_after_ms)", over_rows)
    if rep["ratios"]:
        cols = list(next(iter(rep["ratios"].values())).keys())
        lines += ["## Ratios (target / reference, each within one run)", "", "| ratio | " + " | ".join(cols) + " |",
                  "|---|" + "---|" * len(cols)]
        for k, ratio_row in rep["ratios"].items():
            lines.append(f"| {k} | " + " | ".join(fmt(ratio_row[c], 3) for c in cols) + " |")
        lines.append("")
    errors = [(n, wl, body["error"]) for n in names for wl, body in res[n].items()
              if isinstance(body, dict) and "error" in body]
    errors += [(n, "-", res[n]["error"]) for n in names if "error" in res[n]]
    warn = [(n, wl, body["warning"]) for n in names for wl, body in res[n].items()
            if isinstance(body, dict) and "warning" in body]
    logged = [(n, res[n]["server_log"]) for n in names if res[n].get("server_log")]
    if errors or warn or rep["notes"] or logged:
        lines += ["## Notes", ""]
        lines += [f"- {n} {wl}: ERROR {e}" for n, wl, e in errors]
        lines += [f"- {n} {wl}: {w}" for n, wl, w in warn]
        lines += [f"- {n} server log: " + "; ".join(f"{c} x {k}" for k, c in counts.items()) for n, counts in logged]
        lines += [f"- {x}" for x in rep["notes"]]
        lines.append("")
    return "\n".join(lines)


# -- main --------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="chatd benchmark harness (starts its own servers)")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: every workload once at small scale (~30 s), fails unless each produced figures")
    p.add_argument("--runs", type=int, default=0, help="repeat every target this often (default 3; quick 1)")
    p.add_argument("--targets", default="",
                   help="comma list of baseline, baseline-stream, websockets, peer, chatd-1w, chatd-2w"
                        " (default baseline,websockets,peer,chatd-1w,chatd-2w; quick baseline,websockets,chatd-1w)")
    p.add_argument("--workloads", default="connections,fanout,hot,assistant,overload")
    p.add_argument("--server-cpus", default="0", help="taskset -c list for the servers under test ('' = no pinning)")
    p.add_argument("--gen-cpus", default="1", help="CPUs of the harness, generators, Postgres and Valkey")
    p.add_argument("--gen-procs", type=int, default=0, help="generator processes (default: 4, quick: 2)")
    p.add_argument("--connect-concurrency", type=int, default=100, help="connects in flight per generator process")
    p.add_argument("--conn-levels", default="", help="comma list (default 1000,5000,10000,20000; quick 200)")
    p.add_argument("--idle-s", type=float, default=0, help="idle CPU window (default 10; quick 0.5)")
    p.add_argument("--settle-s", type=float, default=0, help="pause after connecting (default 2; quick 0.2)")
    p.add_argument("--fanout-conns", type=int, default=0, help="default 10000; quick 200")
    p.add_argument("--fanout-room-size", type=int, default=10)
    p.add_argument("--fanout-interval", type=float, default=5.0, help="each socket sends every N s")
    p.add_argument("--fanout-duration", type=float, default=0, help="default 40; quick 2")
    p.add_argument("--pad", type=int, default=40, help="characters of padding in each message")
    p.add_argument("--hot-members", type=int, default=0, help="default 1000; quick 50")
    p.add_argument("--hot-probes", type=int, default=100, help="members that parse every frame (latency, seqs)")
    p.add_argument("--hot-rates", default="", help="comma list (default 10,20,50,100,200,400,800,1600; quick 50)")
    p.add_argument("--hot-step-s", type=float, default=0, help="default 8; quick 1")
    p.add_argument("--asst-streams", type=int, default=0, help="default 500; quick 10")
    p.add_argument("--asst-timeout", type=float, default=0, help="seconds to wait for the answers (default 120;"
                   " quick 30)")
    p.add_argument("--tokens-per-s", type=float, default=50.0)
    p.add_argument("--overload-conns", type=int, default=0, help="sockets in rooms of 2 (default 3000; quick 100)")
    p.add_argument("--overload-rates", default="",
                   help="offered sends/s, stepped (default 1000,2000,4000,6000,8000,12000; quick 2000)")
    p.add_argument("--overload-step-s", type=float, default=0, help="default 20; quick 1.5")
    p.add_argument("--overload-drain-s", type=float, default=15.0, help="time for the last retries after a step")
    p.add_argument("--send-queue-max", type=int, default=0,
                   help="CHATD_WS_SEND_QUEUE_MAX for chatd (default chatd's own; quick 32, so that busy and the"
                        " retries happen)")
    p.add_argument("--embedder", default="", help="CHATD_ASSISTANT_EMBEDDER for chatd (default: chatd's own)")
    p.add_argument("--keep", action="store_true", help="keep the temp dir (server logs)")
    p.add_argument("--out-dir", default=str(RESULTS))
    a = p.parse_args(argv)
    q = a.quick

    def dflt(value: Any, full: Any, quick: Any) -> Any:
        return value if value else (quick if q else full)

    asked = bool(a.targets)
    a.targets = [x for x in dflt(a.targets, "baseline,websockets,peer,chatd-1w,chatd-2w",
                                 "baseline,websockets,chatd-1w").split(",") if x]
    if not asked and "peer" in a.targets and not all(importlib.util.find_spec(m) for m in ("socketio", "aiohttp")):
        a.targets.remove("peer")  # the bench extra is not installed: say so rather than report a failed target
        log("peer left out of the default targets: python-socketio/aiohttp missing (pip install -e '.[bench]')")
    unknown = [x for x in a.targets if x not in TARGETS and not x.startswith("chatd-")]
    if unknown:
        p.error(f"unknown targets {unknown}; known: {', '.join(TARGETS)}, chatd-<N>w")
    a.workloads = [x for x in a.workloads.split(",") if x]
    unknown = [x for x in a.workloads if x not in WORKLOADS]
    if unknown:
        p.error(f"unknown workloads {unknown}; known: {', '.join(WORKLOADS)}")
    a.runs = dflt(a.runs, 3, 1)
    a.gen_procs = dflt(a.gen_procs, 4, 2)
    a.conn_levels = [int(x) for x in dflt(a.conn_levels, "1000,5000,10000,20000", "200").split(",")]
    a.idle_s = dflt(a.idle_s, 10.0, 0.5)
    a.settle_s = dflt(a.settle_s, 2.0, 0.2)
    a.fanout_conns = dflt(a.fanout_conns, 10000, 200)
    a.fanout_duration = dflt(a.fanout_duration, 40.0, 2.0)
    a.hot_members = dflt(a.hot_members, 1000, 50)
    a.hot_rates = [int(x) for x in dflt(a.hot_rates, "10,20,50,100,200,400,800,1600", "50").split(",")]
    a.hot_step_s = dflt(a.hot_step_s, 8.0, 1.0)
    a.asst_streams = dflt(a.asst_streams, 500, 10)
    a.asst_timeout = dflt(a.asst_timeout, 120.0, 30.0)
    a.overload_conns = dflt(a.overload_conns, 3000, 100)
    a.overload_rates = [int(x) for x in dflt(a.overload_rates, "1000,2000,4000,6000,8000,12000", "2000").split(",")]
    a.overload_step_s = dflt(a.overload_step_s, 20.0, 1.5)
    a.send_queue_max = dflt(a.send_queue_max, 0, 32)
    if (os.cpu_count() or 1) < 2:
        a.server_cpus = a.gen_cpus = ""
    a.server_cpus = a.server_cpus or None
    return a


def check_figures(rep: dict[str, Any], args: argparse.Namespace) -> list[str]:
    """What --quick asserts: every target ran every workload that applies to it, without error, and each
    produced its figures (numbers, not speeds: a loaded CI box may be slow, never silent)."""
    need: dict[str, list[tuple[str | int, ...]]] = {
        "connections": [("levels", 0, "connect", "rate_per_s"), ("levels", 0, "rss_per_conn_kib"),
                        ("levels", 0, "idle_cpu_pct_core")],
        "fanout": [("delivered_per_s",), ("echo_ms", "p99"), ("ack_ms", "p99"), ("final_ack_ms", "p99"),
                   ("server_cpu_s_per_1m_msgs",), ("allin_cpu_s_per_1m_msgs",), ("pg_valkey_cpu_s",)],
        "hot": [("steps", 0, "delivered"), ("steps", 0, "deliver_ms", "p99")],
        "assistant": [("ended",), ("send_to_first_chunk_ms", "p99"), ("chunk_gap_ms", "p50")],
        "overload": [("peak_acked_per_s",), ("steps", -1, "acked_per_s"), ("steps", -1, "ack_ms", "p99"),
                     ("steps", -1, "final_ack_ms", "p99"), ("steps", -1, "allin_cpu_s_per_1m_msgs")],
    }
    problems: list[str] = []
    for i, run in enumerate(rep["runs"]):
        for name in args.targets:
            res = run["targets"].get(name) or {}
            if "error" in res:
                problems.append(f"run {i + 1} {name}: {res['error']}")
                continue
            chatd = name.startswith("chatd")
            for wl in args.workloads:
                if wl in ("assistant", "overload") and not chatd:
                    continue
                body = res.get(wl)
                if not isinstance(body, dict) or "error" in body:
                    problems.append(f"run {i + 1} {name} {wl}: {(body or {}).get('error', 'no result')}")
                    continue
                for path in need[wl]:
                    x = _get(body, *path)
                    if not isinstance(x, (int, float)) or isinstance(x, bool) or (x == 0 and path[-1] in (
                            "delivered_per_s", "rate_per_s", "delivered", "ended", "peak_acked_per_s")):
                        problems.append(f"run {i + 1} {name} {wl}: no figure {'.'.join(map(str, path))} ({x!r})")
        if "fanout" in args.workloads:
            for key, row in run["ratios"].items():
                if key.startswith("chatd") and row.get("fanout_cpu_s_per_1m_msgs") is None:
                    problems.append(f"run {i + 1} ratio {key}: no CPU ratio")
    return problems


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    bench = Bench(args)
    try:
        report = bench.run()
    finally:
        bench.close()
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    json_path = out_dir / f"bench-{stamp}.json"
    json_path.write_text(json.dumps(report, indent=2, default=json_default))
    md = markdown(report)
    (out_dir / "latest.md").write_text(md + f"\nRaw results: `{json_path.name}`\n")
    print(md)
    log(f"wrote {json_path} and {out_dir / 'latest.md'}")
    if args.quick:
        problems = check_figures(report, args)
        for p in problems:
            log(f"quick check: {p}")
        if problems:
            return 1
        log("quick check: every target and workload produced its figures")
    return 0


if __name__ == "__main__":
    sys.exit(main())
