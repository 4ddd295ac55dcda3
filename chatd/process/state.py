"""Per-worker server state, as uvicorn's ``ServerState``: counters, connections, tasks.

Services (pools, hub, writer...) are not here: each is handed only what it
uses (see ``app.py``).  This is what shutdown and the health probes need to
see: the live sockets, the in-flight requests, the draining flag and every
background task.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from chatd.process import metrics
from chatd.process.logs import app_log, fields

if TYPE_CHECKING:
    from chatd.realtime.wshandler import WebSocket

_RESTART_MAX_BACKOFF_S = 5.0


class Tasks:
    """Every background task of a worker: tracked, logged when it fails, cancelled on shutdown.

    ``spawn`` runs a coroutine once.  ``supervise`` runs a long-lived loop for
    the worker's lifetime: if it raises, the failure is logged and counted,
    the task is reported ``down`` (readiness answers 503) and it is restarted
    after a backoff (0.1 s doubling up to 5 s).
    """

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[Any]] = set()
        self.down: set[str] = set()

    def spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def supervise(self, name: str, run: Callable[[], Awaitable[None]]) -> asyncio.Task[Any]:
        metrics.task_restarts.labels(name)  # exported at 0 from the start: alerts see the first restart
        return self.spawn(self._supervised(name, run), name)

    async def _supervised(self, name: str, run: Callable[[], Awaitable[None]]) -> None:
        failures = 0
        while True:
            started = time.monotonic()
            try:
                await run()
                raise RuntimeError("returned")  # a long-lived loop must not end while the worker runs
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if time.monotonic() - started > 60:
                    failures = 0
                failures += 1
                backoff_s = min(_RESTART_MAX_BACKOFF_S, 0.1 * 2 ** (failures - 1))
                self.down.add(name)
                metrics.task_restarts.labels(name).inc()
                app_log.error("task_failed", exc_info=exc, extra=fields(task=name, restart_in_s=backoff_s))
                await asyncio.sleep(backoff_s)
                self.down.discard(name)
                app_log.info("task_restarted", extra=fields(task=name))

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
    worker_id: int
    tasks: Tasks = field(default_factory=Tasks)
    connections: set[WebSocket] = field(default_factory=set)
    in_flight_requests: int = 0
    draining: bool = False
    started_at: float = field(default_factory=time.time)
