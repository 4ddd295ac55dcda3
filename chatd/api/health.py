"""Dependency checks behind ``/health/ready``."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

from chatd.realtime.pubsub import FanoutSubscriber
from chatd.storage.db import Database, probe
from chatd.storage.kv import KV

_abandoned: set[asyncio.Task[Any]] = set()  # checks past their timeout, left to finish their cancellation


async def _timed(check: Callable[[], Awaitable[Any]], timeout_s: float) -> dict[str, Any]:
    started = time.perf_counter()
    task = asyncio.ensure_future(check())
    done, _ = await asyncio.wait((task,), timeout=timeout_s)
    if not done:
        # Not awaited: cancelling a query sends psycopg's cancel request, which a hung server does not
        # answer either, and the probe must answer within its timeout.
        task.cancel()
        _abandoned.add(task)
        task.add_done_callback(_forget)
        return {"ok": False, "error": f"no answer within {timeout_s}s"}
    exc = task.exception()
    if exc is not None:  # any failure means "not ready"; the reason is shown
        return {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:300]}
    return {"ok": True, "latency_ms": round((time.perf_counter() - started) * 1000, 2)}


def _forget(task: asyncio.Task[Any]) -> None:
    _abandoned.discard(task)
    if not task.cancelled():
        task.exception()  # retrieved: it was reported as a timeout already


async def check_dependencies(
    db: Database, kv: KV, pubsub: FanoutSubscriber, timeout_s: float
) -> dict[str, dict[str, Any]]:
    """Postgres and Redis answer within ``timeout_s``; the fan-out connection is live (its own view: a PING of
    ours on it would only queue behind the messages, and its reader PINGs it already)."""

    pg_result, redis_result = await asyncio.gather(
        _timed(lambda: probe(db, timeout_s), timeout_s), _timed(kv.ping, timeout_s)
    )
    return {"postgres": pg_result, "redis": redis_result, "pubsub": pubsub.health()}
