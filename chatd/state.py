"""Per-worker shared state, created after the fork and passed to every handler.

Like uvicorn's ``ServerState``: the one place that holds the pools, the live
connections and the background tasks, so shutdown can close them in order.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import redis.asyncio as aioredis
from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool

from chatd.config import Settings
from chatd.keys import Keys
from chatd.logs import app_log, fields

if TYPE_CHECKING:
    from tornado.websocket import WebSocketHandler


class Tasks:
    """Every background task of a worker: tracked, logged when it fails, cancelled on shutdown."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[Any]] = set()

    def spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            app_log.error("background_task_failed", exc_info=task.exception(), extra=fields(task=task.get_name()))

    def __len__(self) -> int:
        return len(self._tasks)

    async def cancel_all(self, timeout_s: float) -> None:
        pending = list(self._tasks)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending, timeout=timeout_s)


@dataclass(eq=False)
class ServerState:
    settings: Settings
    worker_id: int
    pg: AsyncConnectionPool
    redis: aioredis.Redis
    keys: Keys
    tasks: Tasks = field(default_factory=Tasks)
    connections: set[WebSocketHandler] = field(default_factory=set)
    drainers: list[Callable[[], Awaitable[None]]] = field(default_factory=list)  # run before tasks are cancelled
    in_flight_requests: int = 0
    draining: bool = False
    started_at: float = field(default_factory=time.time)

    @classmethod
    async def create(cls, settings: Settings, worker_id: int) -> ServerState:
        storage = settings.storage
        pg: AsyncConnectionPool = AsyncConnectionPool(
            storage.database_url,
            min_size=storage.pg_pool_min,
            max_size=storage.pg_pool_max,
            timeout=storage.pg_timeout_s,
            kwargs={"autocommit": True, "row_factory": dict_row},
            # No per-checkout check (a round trip on every query): store.connection() sweeps the pool
            # with pool.check() when a connection turns out broken, e.g. after a Postgres restart.
            open=False,
            name=f"chatd-w{worker_id}",
        )
        # wait=False: a worker starts and serves (readiness 503) while Postgres is down.
        await pg.open(wait=False)
        # Blocking pool: a burst waits for a free connection instead of failing with "Too many connections".
        redis_pool = aioredis.BlockingConnectionPool.from_url(
            storage.redis_url,
            max_connections=storage.redis_pool_max,
            timeout=storage.redis_timeout_s,
            socket_timeout=storage.redis_timeout_s,
            socket_connect_timeout=storage.redis_timeout_s,
            health_check_interval=30,
        )
        client = aioredis.Redis(connection_pool=redis_pool, decode_responses=False)
        return cls(settings=settings, worker_id=worker_id, pg=pg, redis=client, keys=Keys(storage.redis_key_prefix))

    async def close(self) -> None:
        for drain in self.drainers:
            try:
                await asyncio.wait_for(drain(), self.settings.server.drain_timeout_s)
            except (TimeoutError, Exception) as exc:
                app_log.warning("drain_incomplete", extra=fields(error=repr(exc)[:200]))
        await self.tasks.cancel_all(timeout_s=5)
        await self.redis.aclose()
        await self.pg.close(timeout=5)
