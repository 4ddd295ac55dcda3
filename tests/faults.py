"""Fault injectors shared by the fault tests (test_core_faults.py, test_faults_load.py).

Each breaks a real dependency for the length of a ``with`` block: nothing is mocked.
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import redis

from chatd.embedded import EmbeddedPostgres, EmbeddedValkey


@contextlib.contextmanager
def publish_refused(redis_url: str) -> Iterator[None]:
    """Valkey refuses PUBLISH to everyone (an operator's ACL change) until the block ends."""
    client = redis.Redis.from_url(redis_url)
    client.execute_command("ACL", "SETUSER", "default", "-publish")
    try:
        yield
    finally:
        client.execute_command("ACL", "SETUSER", "default", "+publish")
        client.close()


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
