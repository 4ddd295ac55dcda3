"""Redis (Valkey): every command chatd sends, with one error policy.

What the SQL modules of ``chatd.storage`` are for Postgres: callers ask for
operations by purpose (``deny``, ``presence_apply``, ``publish_many``...)
and never touch redis-py.
A Redis that does not answer (down, timeout, pool exhausted, torn connection)
always becomes ``errors.Unavailable``, counted per operation and logged at
most once per operation every ``_LOG_EVERY_S``.  Callers that can do without
Redis catch ``Unavailable`` and say what they do instead; the others let it
reach the client as ``unavailable``.

Scripts (their Lua is ``kv_scripts``) are registered once and sent by SHA (EVALSHA).  The key names come
from ``chatd.keys``; the pub/sub subscriber lives in ``chatd.pubsub``.

``connect`` and ``pubsub_client`` take a plain URL or a ``sentinel://`` one
(``chatd.redisurl``): with Sentinel every new connection asks the sentinels
where the primary is, so after a failover the next command reaches the
promoted replica (the failed ones meanwhile are ``Unavailable`` as usual).

With ``redis+cluster://`` they return redis-py's cluster client, which routes each command by its key's
slot and follows the slot map through failovers and migrations.  Publishes then go over sharded pub/sub
to the logical channel's partition (``Keys.sharded``), and a MULTI only ever touches one hash tag
(``chatd.core.keys``).
"""

from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from typing import Any, ParamSpec, TypeVar

import redis.asyncio as aioredis
from prometheus_client import Counter, Histogram
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool
from redis.exceptions import RedisError

from chatd.core import errors
from chatd.core.keys import Keys
from chatd.process import metrics
from chatd.process.config import StorageSettings
from chatd.process.logs import app_log, fields
from chatd.storage import kv_scripts as scripts
from chatd.storage import redisurl

P = ParamSpec("P")
R = TypeVar("R")
_LOG_EVERY_S = 10.0
_VIEWS_PER_SCRIPT = 500  # rooms per presence_views script call (a pipeline carries all of them)
_last_logged: dict[str, float] = {}

Client = aioredis.Redis | RedisCluster


_op_metrics: dict[str, tuple[Histogram, Counter]] = {}  # op -> (latency histogram, error counter): labels() once per op


@contextlib.asynccontextmanager
async def redis_errors(op: str) -> AsyncIterator[None]:
    """The error policy: any Redis failure leaves as ``Unavailable``.  Every round trip is timed."""
    children = _op_metrics.get(op)
    if children is None:
        children = _op_metrics[op] = (metrics.redis_latency.labels(op), metrics.redis_errors.labels(op))
    started = time.perf_counter()
    try:
        yield
    except (RedisError, OSError, AttributeError) as exc:  # redis-py can raise AttributeError on a torn connection
        children[0].observe(time.perf_counter() - started)
        children[1].inc()
        now = time.monotonic()
        if now - _last_logged.get(op, -_LOG_EVERY_S) >= _LOG_EVERY_S:
            _last_logged[op] = now
            app_log.warning("redis_unavailable", extra=fields(op=op, error=f"{type(exc).__name__}: {exc}"[:200]))
        raise errors.Unavailable("redis unavailable, try again") from None
    children[0].observe(time.perf_counter() - started)


def guarded(op: str) -> Callable[[Callable[P, Awaitable[R]]], Callable[P, Awaitable[R]]]:
    """``redis_errors`` as a decorator, for modules that own their Redis scripts (the job queue)."""

    def decorate(fn: Callable[P, Awaitable[R]]) -> Callable[P, Awaitable[R]]:
        @functools.wraps(fn)
        async def call(*args: P.args, **kwargs: P.kwargs) -> R:
            async with redis_errors(op):
                return await fn(*args, **kwargs)

        return call

    return decorate


def connect(storage: StorageSettings, max_connections: int | None = None) -> Client:
    """A client with a blocking pool: a burst waits for a connection instead of failing at once
    (in a cluster: up to ``max_connections`` per node, beyond which a command fails as ``Unavailable``)."""
    limit = max_connections or storage.redis_pool_max
    timeouts: dict[str, Any] = {
        "socket_timeout": storage.redis_timeout_s,
        "socket_connect_timeout": storage.redis_timeout_s,
        "health_check_interval": 30,
    }
    if redisurl.is_sentinel(storage.redis_url):
        return _sentinel_client(
            storage, _BlockingSentinelPool, max_connections=limit, timeout=storage.redis_timeout_s, **timeouts
        )
    if redisurl.is_cluster(storage.redis_url):
        return cluster_client(storage, max_connections=limit)
    pool = aioredis.BlockingConnectionPool.from_url(
        storage.redis_url, max_connections=limit, timeout=storage.redis_timeout_s, **timeouts
    )
    return aioredis.Redis(connection_pool=pool, decode_responses=False)


def pubsub_client(storage: StorageSettings) -> aioredis.Redis:
    """The pub/sub reader's own client.  Its reads wait as long as the reader says (its liveness deadline,
    ``Subscriber``, which also PINGs an idle connection: no ``health_check_interval``, whose PONGs redis-py
    hides); the Redis timeout bounds the rest (connect, handshake, writes)."""
    kwargs: dict[str, Any] = {
        "socket_timeout": storage.redis_timeout_s,
        "socket_connect_timeout": storage.redis_timeout_s,
        "max_connections": 2,
    }
    if redisurl.is_sentinel(storage.redis_url):
        return _sentinel_client(storage, SentinelConnectionPool, **kwargs)
    return aioredis.Redis.from_url(storage.redis_url, **kwargs)


def cluster_client(storage: StorageSettings, max_connections: int) -> RedisCluster:
    """A Redis Cluster client seeded with the URL's nodes; it reads the slot map from them and keeps it
    current (a MOVED, or a node that stopped answering, makes it ask again)."""
    target = redisurl.parse_cluster(storage.redis_url)
    return RedisCluster(
        startup_nodes=[ClusterNode(host, port) for host, port in target.nodes],
        username=target.username,
        password=target.password,
        socket_timeout=storage.redis_timeout_s,
        socket_connect_timeout=storage.redis_timeout_s,
        max_connections=max_connections,
        decode_responses=False,
    )


def keys_for(storage: StorageSettings) -> Keys:
    """The key layout of the configured Redis: hash-tagged, with pub/sub partitions, in a cluster."""
    if redisurl.is_cluster(storage.redis_url):
        partitions = redisurl.parse_cluster(storage.redis_url).partitions
        return Keys(storage.redis_key_prefix, cluster=True, partitions=partitions)
    return Keys(storage.redis_key_prefix)


async def close_client(client: Client) -> None:
    """Close a client from ``connect`` / ``pubsub_client``, and its sentinel connections if it has any."""
    await client.aclose()
    if isinstance(client, RedisCluster):
        return
    manager = getattr(client.connection_pool, "sentinel_manager", None)
    if isinstance(manager, Sentinel):
        await manager.aclose()


class _BlockingSentinelPool(SentinelConnectionPool, aioredis.BlockingConnectionPool):
    """Sentinel's pool (asks the sentinels where the primary is for every new connection, drops
    connections to a demoted one) with the blocking pool's wait for a free connection."""


def _sentinel_client(
    storage: StorageSettings, pool_class: type[SentinelConnectionPool], **kwargs: Any
) -> aioredis.Redis:
    target = redisurl.parse_sentinel(storage.redis_url)
    # The sentinels answer quickly or not at all: always a timeout, even for the pub/sub client's queries.
    sentinel_kwargs: dict[str, Any] = {
        "socket_timeout": storage.redis_timeout_s,
        "socket_connect_timeout": storage.redis_timeout_s,
        "username": target.sentinel_username,
        "password": target.sentinel_password,
    }
    manager = Sentinel(  # type: ignore[no-untyped-call]
        list(target.sentinels),
        sentinel_kwargs=sentinel_kwargs,
        username=target.username,
        password=target.password,
        db=target.db,
    )
    client: aioredis.Redis = manager.master_for(target.master, connection_pool_class=pool_class, **kwargs)
    return client


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


class KV:
    """The worker's Redis operations (one client, one error policy)."""

    def __init__(self, client: Client, keys: Keys) -> None:
        self.client = client
        self.keys = keys
        self.cluster = isinstance(client, RedisCluster)
        self._connect = client.register_script(scripts.CONNECT)
        self._rate = client.register_script(scripts.RATE)
        self._quota_sync = client.register_script(scripts.QUOTA_SYNC)
        self._presence_apply = client.register_script(scripts.NOW_MS + scripts.PRESENCE_APPLY)
        self._presence_due = client.register_script(scripts.NOW_MS + scripts.PRESENCE_DUE)
        self._presence_views = client.register_script(scripts.PRESENCE_VIEWS)
        self._heartbeat = client.register_script(scripts.NOW_MS + scripts.SWEEP + scripts.HEARTBEAT)
        self._presence_retire = client.register_script(scripts.NOW_MS + scripts.SWEEP + scripts.PRESENCE_RETIRE)
        self._rate_counter = 0

    async def close(self) -> None:
        await close_client(self.client)

    async def ping(self) -> None:
        async with redis_errors("ping"):
            await self.client.ping()

    # -- connections and tokens ---------------------------------------------------

    async def register_connections(
        self, connections: Sequence[tuple[str, int, str]], cap: int, ttl_s: float
    ) -> list[int]:
        """``(token jti, user id, connection id)`` each: -1 token revoked, 0 over the per-user cap, 1 registered.

        One round trip for many handshakes (through ``Batched``)."""
        now_ms = int(time.time() * 1000)
        keys: list[str] = []
        for jti, user_id, _ in connections:
            keys += (self.keys.denied_jti(jti), self.keys.user_connections(user_id))
        args: list[Any] = [now_ms, now_ms + int(ttl_s * 1000), cap, *(c for _, _, c in connections)]
        async with redis_errors("connect"):
            return [int(r) for r in await self._connect(keys=keys, args=args)]

    async def refresh_connections(self, entries: Iterable[tuple[int, str]], ttl_s: float) -> None:
        expiry_ms = int(time.time() * 1000) + int(ttl_s * 1000)
        pipe = self.client.pipeline(transaction=False)
        for user_id, connection_id in entries:
            pipe.zadd(self.keys.user_connections(user_id), {connection_id: expiry_ms}, xx=True)
        async with redis_errors("connections_refresh"):
            await pipe.execute()

    async def report_connections(self, origin: str, count: int, ttl_s: float) -> None:
        expiry_ms = int(time.time() * 1000) + int(ttl_s * 1000)
        async with redis_errors("live_connections"):
            await self.client.hset(self.keys.live_connections(), origin, f"{count}:{expiry_ms}")

    async def live_connections(self) -> dict[str, int]:
        """Sockets per live worker; entries of workers that stopped reporting are dropped."""
        now_ms = int(time.time() * 1000)
        async with redis_errors("live_connections"):
            raw = await self.client.hgetall(self.keys.live_connections())
            out, stale = {}, []
            for origin, value in raw.items():
                count, expiry = _text(value).split(":")
                if int(expiry) < now_ms:
                    stale.append(origin)
                else:
                    out[_text(origin)] = int(count)
            if stale:
                await self.client.hdel(self.keys.live_connections(), *stale)
        return out

    async def unregister_connection(self, user_id: int, connection_id: str) -> None:
        async with redis_errors("disconnect"):
            await self.client.zrem(self.keys.user_connections(user_id), connection_id)

    async def is_denied(self, jti: str) -> bool:
        async with redis_errors("denylist"):
            return bool(await self.client.exists(self.keys.denied_jti(jti)))

    async def denied_many(self, jtis: Sequence[str]) -> list[bool]:
        """``is_denied`` of many tokens in one round trip (through ``Batched``)."""
        async with redis_errors("denylist"):
            values = await self.client.mget([self.keys.denied_jti(jti) for jti in jtis])
        return [value is not None for value in values]

    async def deny(self, jti: str, ttl_s: int) -> None:
        async with redis_errors("denylist"):
            await self.client.set(self.keys.denied_jti(jti), b"1", ex=ttl_s)

    # -- rate limits ----------------------------------------------------------------

    async def rate_hit(self, scope: str, subject: str, limit: int, window_ms: int) -> tuple[bool, int]:
        self._rate_counter += 1
        now_ms = int(time.time() * 1000)
        async with redis_errors("rate_limit"):
            allowed, retry_ms = await self._rate(
                keys=[self.keys.rate(scope, subject)], args=[now_ms, window_ms, limit, f"{now_ms}-{self._rate_counter}"]
            )
        return bool(allowed), int(retry_ms)

    async def quota_sync(
        self, scope: str, deltas: Mapping[str, int], slice_index: int, slices: int, slice_ms: int
    ) -> list[int]:
        args: list[Any] = [self.keys.quota(scope), slice_index, slices, slice_ms]
        for subject, delta in deltas.items():
            args += (subject, delta)
        async with redis_errors("quota_sync"):
            # The key is only the script's route (in a cluster, to the slot of the scope's counters).
            totals = await self._quota_sync(keys=[self.keys.quota(scope)], args=args)
        return [int(t) for t in totals]

    # -- pub/sub (publishing; the subscriber is chatd.pubsub) ------------------------------

    async def publish(self, channel: str, payload: bytes) -> None:
        async with redis_errors("publish"):
            if self.cluster:
                await self.client.spublish(*self.keys.sharded(channel, payload))
            else:
                await self.client.publish(channel, payload)

    async def publish_many(self, items: Sequence[tuple[str, bytes]]) -> None:
        if len(items) == 1:
            await self.publish(*items[0])
            return
        pipe = self.client.pipeline(transaction=False)
        self._queue_publishes(pipe, items)
        async with redis_errors("publish"):
            await pipe.execute()

    def _queue_publishes(self, pipe: Any, items: Sequence[tuple[str, bytes]]) -> None:
        """PUBLISHes, or in a cluster SPUBLISHes to the partitions (the cluster pipeline sends each node its
        own, in order: a channel's messages keep their order)."""
        for channel, payload in items:
            if self.cluster:
                pipe.spublish(*self.keys.sharded(channel, payload))
            else:
                pipe.publish(channel, payload)

    # -- presence ------------------------------------------------------------------

    async def presence_apply(
        self, origin: str, room_id: int, changes: Sequence[tuple[int, int]], grace_s: float
    ) -> tuple[int, list[int]] | None:
        """Add (+1) / remove (-1) this worker's entry of each user: the room's presence revision and the
        users who came online anywhere (to announce with that revision; none: no revision bumped).

        None, and nothing changed, when this worker's heartbeat expired or was swept: beat, then
        apply again (with the entries the sweep removed)."""
        keys = [
            self.keys.presence(room_id),
            self.keys.presence_users(room_id),
            self.keys.worker_rooms(origin),
            self.keys.presence_pending(),
            self.keys.workers(),
            self.keys.presence_revisions(),
            self.keys.presence_grace(room_id),
        ]
        args: list[Any] = [origin, room_id, int(grace_s * 1000)]
        for user, delta in changes:
            args += (user, delta)
        async with redis_errors("presence"):
            registered, *rest = await self._presence_apply(keys=keys, args=args)
        if not registered:
            return None
        rev, *online = rest
        return int(rev), [int(u) for u in online]

    async def presence_due(self, limit: int = 500) -> list[tuple[int, int, list[int]]]:
        """``(room, revision, users)`` whose grace ended with no socket anywhere: announce them offline
        (each once, with that revision)."""
        async with redis_errors("presence"):
            rows = await self._presence_due(
                keys=[self.keys.presence_pending(), self.keys.presence_revisions()],
                args=[self.keys.presence_prefix, limit],
            )
        return [(int(room), int(rev), sorted(int(u) for u in users)) for room, rev, *users in rows]

    async def presence_views(self, rooms: Sequence[tuple[int, int]]) -> dict[int, tuple[int, list[int]]]:
        """``(room, revision the caller's view is at)`` -> for each room whose revision differs (-1: always),
        its revision and online users (in their grace included: their offline is yet to be announced),
        read together.  One round trip (a pipeline) for any number of rooms."""
        if not rooms:
            return {}
        calls = []
        for i in range(0, len(rooms), _VIEWS_PER_SCRIPT):
            chunk = rooms[i : i + _VIEWS_PER_SCRIPT]
            keys = [self.keys.presence_revisions(), self.keys.presence_pending()]
            for room, _ in chunk:
                keys += (self.keys.presence_users(room), self.keys.presence_grace(room))
            calls.append((keys, [x for room, known in chunk for x in (room, known)]))
        async with redis_errors("presence"):
            if self.cluster:  # one call each: a cluster pipeline does not load a script a node lacks (NOSCRIPT)
                replies = [await self._presence_views(keys=keys, args=args) for keys, args in calls]
            else:
                pipe: Any = self.client.pipeline(transaction=False)
                for keys, args in calls:
                    await self._presence_views(keys=keys, args=args, client=pipe)
                replies = await pipe.execute()
        return {
            int(room): (int(rev), sorted({int(u) for u in users})) for rows in replies for room, rev, *users in rows
        }

    async def heartbeat(self, origin: str, ttl_s: float) -> bool:
        """Keep this worker's presence entries alive and sweep dead workers' entries.

        False when this worker's entries were swept meanwhile (Redis lost it for a
        while, or restarted empty): the caller adds them again.
        """
        async with redis_errors("heartbeat"):
            return bool(
                await self._heartbeat(
                    keys=[self.keys.workers(), self.keys.presence_pending()],
                    args=[origin, int(ttl_s * 1000), self.keys.presence_prefix],
                )
            )

    async def presence_retire(self, origin: str, grace_s: float) -> None:
        """Clean shutdown: remove this worker's entries and its heartbeat at once (its users, gone
        everywhere, offline after the grace).  Should it fail, the heartbeat expires and others sweep."""
        async with redis_errors("heartbeat"):
            await self._presence_retire(
                keys=[self.keys.workers(), self.keys.presence_pending()],
                args=[origin, int(grace_s * 1000), self.keys.presence_prefix],
            )

    # -- typing ------------------------------------------------------------------------

    async def typing_relay(self, room_id: int, user_id: int, interval_s: float) -> bool:
        """At most one relayed typing frame per user per room per interval, across instances."""
        async with redis_errors("typing"):
            return bool(
                await self.client.set(
                    self.keys.typing(room_id, user_id), b"1", nx=True, px=max(1, int(interval_s * 1000))
                )
            )

    # -- assistant streams -----------------------------------------------------------------

    async def stream_batch(
        self,
        begins: Sequence[tuple[int, int, Mapping[str, Any], int]],
        appends: Sequence[tuple[int, str, int]],
        publishes: Sequence[tuple[str, bytes]],
    ) -> None:
        """Many streams' Redis side in ONE round trip (MULTI, so a reader sees each step whole):
        streams begun ``(answer id, room, state, ttl_s)``, chunks appended to the catch-up state
        ``(answer id, text, index)`` (text and index move together), then the frames published."""
        pipe = self.client.pipeline(transaction=True)
        for message_id, room_id, state, ttl_s in begins:
            pipe.hset(self.keys.stream(message_id), mapping=dict(state))  # type: ignore[arg-type]
            pipe.expire(self.keys.stream(message_id), ttl_s)
            pipe.set(self.keys.stream_text(message_id), "", ex=ttl_s)
            pipe.sadd(self.keys.room_streams(room_id), message_id)
            pipe.expire(self.keys.room_streams(room_id), ttl_s)
        for message_id, text, index in appends:
            pipe.append(self.keys.stream_text(message_id), text)
            pipe.hset(self.keys.stream(message_id), "index", index)
        if not self.cluster:
            self._queue_publishes(pipe, publishes)
        async with redis_errors("stream"):
            if begins or appends or not self.cluster:
                await pipe.execute()
        if self.cluster and publishes:  # the partitions are other slots than {streams}: after the MULTI
            await self.publish_many(publishes)

    async def stream_clear(self, room_id: int, message_id: int) -> None:
        pipe = self.client.pipeline(transaction=False)
        pipe.delete(self.keys.stream(message_id), self.keys.stream_text(message_id))
        pipe.srem(self.keys.room_streams(room_id), message_id)
        async with redis_errors("stream"):
            await pipe.execute()

    async def stream_state(self, message_id: int) -> dict[bytes, bytes]:
        async with redis_errors("stream"):
            return dict(await self.client.hgetall(self.keys.stream(message_id)))  # type: ignore[arg-type]

    async def room_streams(self, room_id: int) -> list[tuple[int, dict[bytes, bytes], bytes]]:
        """``(answer id, state, text so far)`` of the answers streaming in a room."""
        async with redis_errors("stream"):
            ids = await self.client.smembers(self.keys.room_streams(room_id))
            if not ids:
                return []
            pipe = self.client.pipeline(transaction=True)
            ordered = sorted(int(i) for i in ids)
            for mid in ordered:
                pipe.hgetall(self.keys.stream(mid))
                pipe.get(self.keys.stream_text(mid))
            replies = await pipe.execute()
        out = []
        for n, mid in enumerate(ordered):
            state, text = replies[2 * n], replies[2 * n + 1]
            if state:
                out.append((mid, dict(state), text or b""))
        return out
