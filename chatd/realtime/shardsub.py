"""The worker's pub/sub in a Redis Cluster: sharded subscriptions to partitions, not to channels.

``chatd.realtime.pubsub.Subscriber``'s contract (the hub cannot tell them apart): ``subscribe`` returns
once Redis confirmed, ``want`` batches, ``on_message(channel, data)`` gets the logical channel
(``chatd:room:7``), and ``on_resubscribed`` runs once a subscription lost on the way is back, so that
what was published meanwhile is read back from Postgres.

What travels is ``chatd.core.keys``'s partitions: a logical channel is wanted, its partition is
SSUBSCRIBEd (once, however many of its channels are wanted) and SUNSUBSCRIBEd when none is wanted any
more; a partition's messages carry their logical channel (``keys.pack``), and those of channels
nobody here wants are dropped.  redis-py's ``ClusterPubSub`` keeps one connection per node holding
partitions, and when the slot map changes (failover, migration) it moves each partition to its new
owner with one SSUBSCRIBE: a confirmation this reader did not ask for is such a move, and whatever
was published between the loss and it is lost to pub/sub, so the hook runs.

Each node's connection has its own reader task: redis-py's round robin over the nodes waits on one
while another has a message (measured: p99 0.3 s with three nodes), too slow for a chat.  A node
whose reads fail (dead, or a primary no more) is retried with backoff, and each failure asks for a
new slot map: once a replica took over, redis-py moves that node's partitions, the others never
stopped.  An SSUBSCRIBE that fails (its node down, its slot moving) is sent again every second after
reading the slot map; only an unexpected error drops every connection, after which the reader
subscribes every wanted partition again, then the hook runs.

Each node's connection keeps ``Subscriber``'s liveness deadline (``storage.pubsub_liveness_s``).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from typing import Any

from redis.exceptions import RedisError

from chatd.core import errors
from chatd.core.keys import Keys, unpack
from chatd.process import metrics
from chatd.process.config import StorageSettings
from chatd.process.logs import app_log, fields
from chatd.realtime.pubsub import Deaf, Liveness, fail
from chatd.storage.kv import close_client, cluster_client, redis_errors

# A node's read holds redis-py's per-node lock that an SSUBSCRIBE on that node waits for: short, so that a
# join waits at most this long for its partition (10 idle reads a second per node cost ~0.1% of a core).
_READ_WAIT_S = 0.1
_MIN_WAIT_S = 0.01  # the shortest read before the liveness deadline is checked
_IDLE_WAIT_S = 0.05  # a node's connection with nothing to read: how long to wait before looking again
_RETRY_EVERY_S = 1.0  # SSUBSCRIBEs that failed are sent again this often (a failover takes seconds)
_SUPERVISE_EVERY_S = 0.1  # how often the nodes that hold partitions are checked for a reader
_POOL_PER_NODE = 4  # the reader's connections per node, plus SSUBSCRIBEs in flight


class ShardedSubscriber:
    def __init__(
        self,
        storage: StorageSettings,
        keys: Keys,
        on_message: Callable[[bytes, bytes], None],
        on_resubscribed: Callable[[], None],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        # A client of its own, as Subscriber's: a busy command pool must never keep the reader from reconnecting.
        self._client = cluster_client(storage, max_connections=_POOL_PER_NODE)
        self.timeout_s = storage.redis_timeout_s
        self._liveness_s = storage.pubsub_liveness_s
        self._clock = clock
        self._keys = keys
        self._on_message = on_message
        self._on_resubscribed = on_resubscribed
        self._channel_partition = {keys.partition_channel(p).encode(): p for p in range(keys.partitions)}
        self._wanted: dict[int, set[bytes]] = {}  # partition -> its wanted logical channels
        self._listening: set[bytes] = set()  # every wanted logical channel (the hot path's lookup)
        self._confirmed: set[int] = set()
        # Confirmed at least once while wanted: confirmed again without an SSUBSCRIBE of ours, it was moved.
        self._confirmed_before: set[int] = set()
        self._lost: set[int] = set()  # wanted, and the node gave their slot away: their next confirmation ends a gap
        self._refresh_slots = False  # read the slot map before the next SSUBSCRIBEs
        self._confirm: dict[int, asyncio.Future[None]] = {}
        self._sent: dict[int, int] = {}  # SSUBSCRIBEs this reader sent, not yet confirmed, per partition
        self._resubscribing: set[int] | None = None
        self._pending: set[int] = set()
        self._pending_event = asyncio.Event()
        self._gap_hook_due = False
        self._failing: dict[str, str] = {}  # node name -> the error its last read failed with
        self._nodes_changed = asyncio.Event()
        self._pubsub: Any = None
        self.connected = False

    @property
    def live(self) -> bool:
        return self.connected and not self._failing

    def health(self) -> dict[str, Any]:
        """The ``pubsub`` entry of ``/health/ready`` (no I/O)."""
        if not self.connected:
            return {"ok": False, "error": "not connected (reconnecting)"}
        if self._failing:
            name, error = next(iter(self._failing.items()))
            return {"ok": False, "error": f"reads from {name} fail: {error}"[:200]}
        nodes = len(self._pubsub.node_pubsub_mapping) if self._pubsub is not None else 0
        return {"ok": True, "partitions": len(self._confirmed), "nodes": nodes}

    async def close(self) -> None:
        await close_client(self._client)

    def _partition(self, channel: str) -> int:
        return self._keys.partition_of(channel)

    async def run(self) -> None:
        """Read forever; start over on a failure no node survived (a supervised task)."""
        backoff_s = 0.1
        first = True
        while True:
            pubsub = self._client.pubsub()
            readers: dict[str, asyncio.Task[None]] = {}
            try:
                self._pubsub = pubsub
                if not first:  # where the slots are may have changed since
                    await self._client.nodes_manager.initialize()
                partitions = sorted(self._wanted)
                if not first:
                    self._resubscribing = set(partitions)
                with contextlib.suppress(errors.Unavailable):  # the failed ones stay pending: flush_wanted
                    await self._ssubscribe(pubsub, partitions)
                self.connected = True
                metrics.pubsub_connected.set(1)
                self._pending_event.set()  # wanted while disconnected: subscribe now
                if not first:
                    app_log.info("fanout_reconnected", extra=fields(partitions=len(partitions)))
                    if not partitions:
                        self._resubscribed()
                first = False
                backoff_s = 0.1
                while True:  # one reader per node holding partitions (redis-py adds nodes as partitions move)
                    for name in [n for n, task in readers.items() if task.done()]:
                        readers.pop(name).result()  # a reader ends when its node holds no partition any more
                    for name in pubsub.node_pubsub_mapping:
                        if name not in readers:
                            readers[name] = asyncio.create_task(self._read_node(pubsub, name), name=f"fanout-{name}")
                    self._nodes_changed.clear()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._nodes_changed.wait(), _SUPERVISE_EVERY_S)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # whatever broke, the reader must come back: without it the worker is deaf
                self.connected = False
                metrics.pubsub_connected.set(0)
                self._pubsub = None
                self._resubscribing = None
                self._sent.clear()
                self._confirmed.clear()
                self._lost.clear()
                for fut in self._confirm.values():
                    fail(fut, "fan-out connection lost")
                self._confirm.clear()
                metrics.pubsub_reconnects.inc()
                app_log.warning("fanout_redis_lost", extra=fields(error=str(exc)[:200], retry_in_s=backoff_s))
                await asyncio.sleep(backoff_s)
                backoff_s = min(backoff_s * 2, 1.0)
            finally:
                for task in readers.values():
                    task.cancel()
                await asyncio.gather(*readers.values(), return_exceptions=True)
                self._failing.clear()
                with contextlib.suppress(Exception):  # the connections may be broken already
                    await pubsub.aclose()

    async def _read_node(self, pubsub: Any, name: str) -> None:
        """Read one node's partitions until it holds none; a failed read is retried with backoff, after
        asking for a new slot map (redis-py then moves the partitions of a node that lost its slots).

        The node's connection has ``Subscriber``'s liveness deadline (``Liveness``): a PING after a third
        of it without a read; nothing read for all of it (a node frozen or cut off: no error ever comes,
        and a failover elsewhere would leave this reader deaf), the connection is dropped and the node
        counts as failing."""
        backoff_s = 0.1
        liveness = Liveness(self._liveness_s, self._clock())
        while name in pubsub.node_pubsub_mapping:
            node = self._client.get_node(node_name=name)
            connection = pubsub.node_pubsub_mapping.get(name)
            if node is None or connection is None or connection.connection is None or not connection.shard_channels:
                # Not connected yet (or being replaced), or nothing subscribed there (its SSUBSCRIBE failed, or its
                # partitions moved away): nothing to wait on, and nothing missed.
                self._failing.pop(name, None)
                await asyncio.sleep(_IDLE_WAIT_S)
                liveness.restart(self._clock())
                continue
            try:
                wait_s = min(_READ_WAIT_S, max(_MIN_WAIT_S, liveness.wait_s(self._clock())))
                msg = await pubsub.get_sharded_message(
                    ignore_subscribe_messages=False, timeout=wait_s, target_node=node
                )
                now = self._clock()
                if msg is not None:
                    liveness.heard(now)
                elif liveness.expired(now):
                    metrics.pubsub_liveness_timeouts.inc()
                    with contextlib.suppress(Exception):  # the next read reconnects and subscribes again
                        await connection.connection.disconnect()
                    raise Deaf(f"nothing read for {liveness.silent_s(now):.1f}s, PINGs unanswered")
                else:
                    if liveness.late(now):  # readiness says so before the deadline, as Subscriber's does
                        self._failing[name] = f"nothing read for {liveness.silent_s(now):.1f}s, PING unanswered"
                    if liveness.ping_due(now):
                        liveness.pinged(now)
                        await connection.ping()
            except (RedisError, OSError, Deaf) as exc:
                if name not in self._failing or isinstance(exc, Deaf):
                    app_log.warning("fanout_node_lost", extra=fields(node=name, error=str(exc)[:200]))
                self._failing[name] = f"{type(exc).__name__}: {exc}"
                await asyncio.sleep(backoff_s)
                backoff_s = min(backoff_s * 2, 1.0)
                with contextlib.suppress(RedisError, OSError):  # the other nodes answer; if none does, retried
                    await self._client.nodes_manager.initialize()
                liveness.restart(self._clock())
                continue
            if msg is None:
                continue
            if self._failing.pop(name, None) is not None:
                app_log.info("fanout_node_back", extra=fields(node=name))
            backoff_s = 0.1
            self._dispatch(msg)
        self._failing.pop(name, None)

    def _dispatch(self, msg: dict[str, Any]) -> None:
        kind = msg.get("type")
        if kind == "smessage" or kind == b"smessage":
            metrics.hot.pubsub_received += 1
            try:
                channel, data = unpack(msg["data"])
            except ValueError:
                metrics.pubsub_bad_envelopes.labels("framing").inc()
                return
            if channel in self._listening:
                self._on_message(channel, data)
            return
        partition = self._channel_partition.get(msg.get("channel") or b"")
        if partition is None:
            return
        if kind == "ssubscribe" or kind == b"ssubscribe":
            self._nodes_changed.set()  # a partition moved may have opened a node's connection: read it
            sent = self._sent.get(partition, 0)
            if sent > 1:
                self._sent[partition] = sent - 1
                return  # a later SSUBSCRIBE of it is still on its way
            self._sent.pop(partition, None)
            if partition not in self._wanted:
                return
            if partition in self._lost or (not sent and partition in self._confirmed_before):
                # Lost on the way (the old owner gave the slot away), or not ours: redis-py moved the
                # partition to the slot's new owner (failover, migration).  What was published meanwhile is lost.
                self._lost.discard(partition)
                self._gap()
            self._confirmed.add(partition)
            self._confirmed_before.add(partition)
            fut = self._confirm.pop(partition, None)
            if fut is not None and not fut.done():
                fut.set_result(None)
            if self._resubscribing is not None:
                self._resubscribing.discard(partition)
                if not self._resubscribing:
                    self._resubscribed()
        elif kind == "sunsubscribe" or kind == b"sunsubscribe":
            if partition in self._wanted and not self._sent.get(partition):
                # Still wanted: the node gave the slot away (a migration: Valkey tells its subscribers), or
                # redis-py is moving it.  redis-py's slot map may not know yet (no command of this client got
                # a MOVED): read it again, then SSUBSCRIBE where the slot is now (flush_wanted).
                self._confirmed.discard(partition)
                self._lost.add(partition)
                self._refresh_slots = True
                self._pending.add(partition)
                self._pending_event.set()
                app_log.info("fanout_partition_moving", extra=fields(partition=partition))

    def _gap(self) -> None:
        """Coalesce the moves of one failover (tens of partitions) into one call of the hook."""
        if self._gap_hook_due:
            return
        self._gap_hook_due = True
        metrics.pubsub_reconnects.inc()
        asyncio.get_running_loop().call_soon(self._run_gap_hook)

    def _run_gap_hook(self) -> None:
        self._gap_hook_due = False
        app_log.info("fanout_partitions_moved")
        self._resubscribed()

    def _resubscribed(self) -> None:
        self._resubscribing = None
        try:
            self._on_resubscribed()
        except Exception as exc:  # the reader must keep reading
            app_log.error("resubscribe_callback_failed", exc_info=exc)

    def _add(self, channel: str) -> int:
        partition = self._partition(channel)
        key = channel.encode()
        self._wanted.setdefault(partition, set()).add(key)
        self._listening.add(key)
        return partition

    async def subscribe(self, channel: str) -> None:
        """Returns once Redis confirmed the channel's partition; ``Unavailable`` when it cannot in time."""
        partition = self._add(channel)
        pubsub = self._pubsub
        if pubsub is None or not self.connected:
            raise errors.Unavailable("fan-out not connected, try again")
        if partition in self._confirmed:
            return
        fut = self._confirm.get(partition)
        if fut is None:
            fut = self._confirm[partition] = asyncio.get_running_loop().create_future()
            await self._ssubscribe(pubsub, [partition])
        try:
            await asyncio.wait_for(asyncio.shield(fut), self.timeout_s)
        except TimeoutError:
            raise errors.Unavailable("fan-out subscription not confirmed, try again") from None

    def want(self, channel: str) -> asyncio.Future[None]:
        """Subscribe (kept through reconnects); the future is done once the partition is confirmed.
        As ``Subscriber.want``: wait for it with a timeout."""
        partition = self._add(channel)
        loop = asyncio.get_running_loop()
        if partition in self._confirmed:
            done: asyncio.Future[None] = loop.create_future()
            done.set_result(None)
            return done
        if not self.connected:
            self._pending.add(partition)
            self._pending_event.set()
            failed: asyncio.Future[None] = loop.create_future()
            fail(failed, "fan-out not connected")
            return failed
        fut = self._confirm.get(partition)
        if fut is None:
            fut = self._confirm[partition] = loop.create_future()
            self._pending.add(partition)
            self._pending_event.set()
        return fut

    async def flush_wanted(self) -> None:
        """Send the pending SSUBSCRIBEs (a supervised loop).  Those that failed (their node down, their slot
        moving) stay pending and are sent again at least every ``_RETRY_EVERY_S``, after a new slot map."""
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._pending_event.wait(), _RETRY_EVERY_S)
            self._pending_event.clear()
            pubsub = self._pubsub
            if pubsub is None or not self.connected:
                continue
            partitions = sorted(p for p in self._pending if p in self._wanted and p not in self._confirmed)
            self._pending.clear()
            if self._refresh_slots:
                self._refresh_slots = False
                with contextlib.suppress(RedisError, OSError):  # else the SSUBSCRIBEs fail again, and are retried
                    await self._client.nodes_manager.initialize()
            if partitions:
                with contextlib.suppress(errors.Unavailable):
                    await self._ssubscribe(pubsub, partitions)

    async def _ssubscribe(self, pubsub: Any, partitions: list[int]) -> None:
        """One SSUBSCRIBE per partition (a command's channels must share a slot).  A failed one goes back
        to pending, to be sent where its slot is then (``flush_wanted``); ``Unavailable`` if any failed."""
        failed = []
        for partition in partitions:
            self._sent[partition] = self._sent.get(partition, 0) + 1
            try:
                async with redis_errors("subscribe"):
                    await pubsub.ssubscribe(self._keys.partition_channel(partition))
            except errors.Unavailable:
                left = self._sent.pop(partition, 1) - 1
                if left > 0:
                    self._sent[partition] = left
                failed.append(partition)
            else:
                self._nodes_changed.set()
        if failed:
            self._pending.update(failed)
            self._refresh_slots = True
            raise errors.Unavailable("fan-out subscription failed, try again")

    async def unsubscribe(self, channel: str) -> None:
        partition = self._partition(channel)
        key = channel.encode()
        self._listening.discard(key)
        channels = self._wanted.get(partition)
        if channels is None:
            return
        channels.discard(key)
        if channels:
            return  # another channel of the partition is still wanted
        del self._wanted[partition]
        self._pending.discard(partition)
        self._confirmed.discard(partition)
        self._confirmed_before.discard(partition)
        self._lost.discard(partition)
        fut = self._confirm.pop(partition, None)
        fail(fut, "unsubscribed")
        pubsub = self._pubsub
        if pubsub is not None:
            # A lost unsubscribe costs only unwanted messages (dropped here) until the next reconnect.
            with contextlib.suppress(errors.Unavailable):
                async with redis_errors("unsubscribe"):
                    await pubsub.sunsubscribe(self._keys.partition_channel(partition))
