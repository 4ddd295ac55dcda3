"""Fault injectors shared by the fault tests (test_core_faults.py, test_faults_load.py).

Each breaks a real dependency for the length of a ``with`` block: nothing is mocked.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import threading
from collections.abc import Iterator
from pathlib import Path

import redis
from redis.connection import parse_url

from chatd.process.embedded import EmbeddedPostgres, EmbeddedValkey


@contextlib.contextmanager
def refused(redis_url: str, what: str) -> Iterator[None]:
    """Valkey refuses a command or a category (``publish``, ``@scripting``) to everyone (an operator's
    ACL change) until the block ends; every other command goes through."""
    client = redis.Redis.from_url(redis_url)
    client.execute_command("ACL", "SETUSER", "default", f"-{what}")
    try:
        yield
    finally:
        client.execute_command("ACL", "SETUSER", "default", f"+{what}")
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


class SubscribeGate:
    """A TCP proxy in front of Valkey that can hold back SUBSCRIBEs naming one channel.

    ``hold(channel)``: a client's bytes that subscribe to ``channel`` (and whatever that client sends
    after them) wait in the proxy until ``release()``, so Redis confirms the subscription late while
    every other command, PUBLISH included, goes through.  Point a chatd's ``REDIS_URL`` at ``url``.
    The proxy runs on a thread of its own: the test's loop blocks while chatd starts.
    """

    def __init__(self, redis_url: str) -> None:
        self._target = parse_url(redis_url)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="subscribe-gate", daemon=True)
        self._server: asyncio.Server | None = None
        self._open = asyncio.Event()
        self._open.set()
        self._channel = b""
        self._writers: set[asyncio.StreamWriter] = set()
        self.held = 0  # SUBSCRIBEs caught while holding
        self.url = ""

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

    def stop(self) -> None:
        async def stop() -> None:
            self._open.set()
            if self._server is not None:
                self._server.close()
            for writer in list(self._writers):
                writer.close()

        if self._thread.is_alive():
            asyncio.run_coroutine_threadsafe(stop(), self._loop).result(10)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)

    async def _serve(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        if "path" in self._target:
            server_r, server_w = await asyncio.open_unix_connection(self._target["path"])
        else:
            server_r, server_w = await asyncio.open_connection(self._target["host"], self._target.get("port", 6379))
        self._writers.update((client_w, server_w))
        pumps = [
            asyncio.ensure_future(self._pump(client_r, server_w, gated=True)),
            asyncio.ensure_future(self._pump(server_r, client_w, gated=False)),
        ]
        try:
            await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in pumps:
                task.cancel()
            for writer in (client_w, server_w):
                writer.close()
                self._writers.discard(writer)

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, gated: bool) -> None:
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            while data := await reader.read(65536):
                if gated and not self._open.is_set() and b"\r\n" + self._channel + b"\r\n" in data:
                    if b"SUBSCRIBE" in data.upper():
                        self.held += 1
                        await self._open.wait()
                writer.write(data)
                await writer.drain()
