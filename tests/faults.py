"""Fault injectors shared by the fault tests (test_core_faults.py, test_faults_load.py).

Each breaks a real dependency for the length of a ``with`` block: nothing is mocked.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self, TypeVar

import redis
from redis.connection import parse_url

from chatd.process.embedded import EmbeddedPostgres, EmbeddedValkey

R = TypeVar("R")


@contextlib.contextmanager
def refused(redis_url: str, what: str) -> Iterator[None]:
    """Valkey refuses a command or a category (``publish``, ``@scripting``) to everyone (an operator's
    ACL change) until the block ends; every other command goes through."""
    client = redis.Redis.from_url(redis_url)
    client.execute_command("ACL", "SETUSER", "default", f"-{what}")  # type: ignore[no-untyped-call]  # redis-py
    try:
        yield
    finally:
        client.execute_command("ACL", "SETUSER", "default", f"+{what}")  # type: ignore[no-untyped-call]  # redis-py
        client.close()


def publish_refused(redis_url: str) -> contextlib.AbstractContextManager[None]:
    """Valkey refuses PUBLISH to everyone until the block ends."""
    return refused(redis_url, "publish")


def scripts_refused(redis_url: str) -> contextlib.AbstractContextManager[None]:
    """Valkey refuses EVAL / EVALSHA (every Lua script) to everyone until the block ends."""
    return refused(redis_url, "@scripting")


def children(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


@contextlib.contextmanager
def stopped(pids: list[int]) -> Iterator[None]:
    """SIGSTOP the processes: their connections stay open, nothing answers, until the block ends."""
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)


@contextlib.contextmanager
def paused(pg: EmbeddedPostgres) -> Iterator[None]:
    """SIGSTOP the postmaster and every backend: connections stay open, nothing answers."""
    postmaster = pg.running_pid()
    assert postmaster is not None
    with stopped([postmaster, *children(postmaster)]):
        yield


def valkey_pid(valkey: EmbeddedValkey) -> int:
    return int(valkey.pid_file.read_text())


def kill_valkey(valkey: EmbeddedValkey) -> None:
    """SIGKILL: no goodbye; ``valkey.start()`` brings it back on the same socket path."""
    os.kill(valkey_pid(valkey), signal.SIGKILL)


class _Proxy:
    """A TCP proxy on loopback in front of Valkey, on a thread (and event loop) of its own: the test's loop
    blocks while chatd starts.  Point a chatd's ``REDIS_URL`` at ``url``.  ``stop`` (or the end of a
    ``with`` block) closes every connection it holds and its listening socket.  Subclasses decide what
    happens to the bytes (``_pump``)."""

    name = "proxy"

    def __init__(self, redis_url: str) -> None:
        self._target = parse_url(redis_url)  # type: ignore[no-untyped-call]  # redis-py has no annotation here
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name=self.name, daemon=True)
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._links: set[_Link] = set()  # the connections open (until both their sides are closed)
        self._serving: set[asyncio.Task[None]] = set()
        self.url = ""

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> str:
        self._thread.start()
        self._server = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._serve, "127.0.0.1", 0), self._loop
        ).result(10)
        port = self._server.sockets[0].getsockname()[1]
        auth = ""
        if self._target.get("password"):
            auth = f"{self._target.get('username') or ''}:{self._target['password']}@"
        self.url = f"redis://{auth}127.0.0.1:{port}/{self._target.get('db', 0)}"
        return self.url

    def stop(self) -> None:
        async def stop() -> None:
            self._stopping()
            if self._server is not None:
                self._server.close()
            for writer in list(self._writers):
                writer.close()
            if self._serving:  # each ends once both its sides are closed
                _, late = await asyncio.wait(self._serving, timeout=5)
                for task in late:
                    task.cancel()

        if self._thread.is_alive():
            asyncio.run_coroutine_threadsafe(stop(), self._loop).result(10)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
            if not self._thread.is_alive():
                self._loop.close()

    def _run(self, fn: Callable[[], R]) -> R:
        """``fn()`` on the proxy's loop (its state is the loop's alone); its result."""

        async def call() -> R:
            return fn()

        return asyncio.run_coroutine_threadsafe(call(), self._loop).result(10)

    def _stopping(self) -> None:
        """On the proxy's loop, before the connections close."""

    async def _serve(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._serving.add(task)
        try:
            await self._forward(client_r, client_w)
        finally:
            self._serving.discard(task)

    async def _forward(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        if "path" in self._target:
            server_r, server_w = await asyncio.open_unix_connection(self._target["path"])
        else:
            server_r, server_w = await asyncio.open_connection(self._target["host"], self._target.get("port", 6379))
        self._writers.update((client_w, server_w))
        link = _Link()
        self._links.add(link)
        pumps = [
            asyncio.ensure_future(self._pump(client_r, server_w, link, upstream=True)),
            asyncio.ensure_future(self._pump(server_r, client_w, link, upstream=False)),
        ]
        try:
            await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
            if link.blackholed:
                # A half-open connection tells neither side that the other went: each end stays open until
                # its own side closes it (or the proxy stops).
                await asyncio.wait(pumps)
        finally:
            for task in pumps:
                task.cancel()
            await asyncio.gather(*pumps, return_exceptions=True)
            for writer in (client_w, server_w):
                writer.close()
                self._writers.discard(writer)
            self._links.discard(link)

    async def _pump(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, link: _Link, upstream: bool
    ) -> None:
        raise NotImplementedError


@dataclass(eq=False)
class _Link:
    """One proxied connection (client side and server side)."""

    blackholed: bool = False


class SubscribeGate(_Proxy):
    """A TCP proxy in front of Valkey that can hold back SUBSCRIBEs naming one channel.

    ``hold(channel)``: a client's bytes that subscribe to ``channel`` (and whatever that client sends
    after them) wait in the proxy until ``release()``, so Redis confirms the subscription late while
    every other command, PUBLISH included, goes through.  Point a chatd's ``REDIS_URL`` at ``url``.
    The proxy runs on a thread of its own: the test's loop blocks while chatd starts.
    """

    name = "subscribe-gate"

    def __init__(self, redis_url: str) -> None:
        super().__init__(redis_url)
        self._open = asyncio.Event()
        self._open.set()
        self._channel = b""
        self.held = 0  # SUBSCRIBEs caught while holding

    def hold(self, channel: str) -> None:
        async def hold() -> None:
            self._channel = channel.encode()
            self.held = 0
            self._open.clear()

        asyncio.run_coroutine_threadsafe(hold(), self._loop).result(10)

    def release(self) -> None:
        self._loop.call_soon_threadsafe(self._open.set)

    async def wait_held(self, timeout_s: float = 10) -> None:
        """Until a SUBSCRIBE to the held channel is waiting in the proxy."""
        async with asyncio.timeout(timeout_s):
            while not self.held:
                await asyncio.sleep(0.01)

    def _stopping(self) -> None:
        self._open.set()

    async def _pump(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, link: _Link, upstream: bool
    ) -> None:
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            while data := await reader.read(65536):
                if upstream and not self._open.is_set() and b"\r\n" + self._channel + b"\r\n" in data:
                    if b"SUBSCRIBE" in data.upper():
                        self.held += 1
                        await self._open.wait()
                writer.write(data)
                await writer.drain()


class Blackhole(_Proxy):
    """A TCP proxy in front of Valkey that can turn the connections open at one moment into half-open ones.

    ``blackhole()``: every connection open now stops forwarding in both directions, and neither of its
    sockets is closed: what either side sends is read and dropped, no RST, no FIN, as when a NAT or a
    firewall forgets a connection or the host behind it vanishes.  Connections opened later are forwarded
    as usual (the realistic case: the old connection is dead, a new one works).  A blackholed connection
    stays so until a side closes it or the proxy stops.  ``with Blackhole(url) as proxy:`` then point a
    chatd's ``REDIS_URL`` at ``proxy.url``.
    """

    name = "blackhole"

    def __init__(self, redis_url: str) -> None:
        super().__init__(redis_url)
        self.dropped_bytes = 0  # read from a blackholed connection and never forwarded

    def blackhole(self) -> int:
        """Blackhole every connection open now; how many."""

        def mark() -> int:
            for link in self._links:
                link.blackholed = True
            return len(self._links)

        return self._run(mark)

    def open_connections(self) -> tuple[int, int]:
        """(forwarded, blackholed) connections open now."""

        def count() -> tuple[int, int]:
            dead = sum(1 for link in self._links if link.blackholed)
            return len(self._links) - dead, dead

        return self._run(count)

    async def _pump(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, link: _Link, upstream: bool
    ) -> None:
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            while data := await reader.read(65536):
                if link.blackholed:
                    self.dropped_bytes += len(data)
                    continue
                writer.write(data)
                await writer.drain()


async def lock_waiters(probe: Any, at_least: int, query_like: str, timeout_s: float = 15) -> None:
    """Until ``at_least`` sessions wait on a lock while running a statement LIKE ``query_like`` (``probe``: a
    psycopg connection in autocommit, so each read sees pg_stat_activity afresh)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        row = probe.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
            " AND wait_event_type = 'Lock' AND query LIKE %s",
            (query_like,),
        ).fetchone()
        if row is not None and int(row[0]) >= at_least:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"{at_least} statements like {query_like!r} never queued behind the lock")
