"""The worker's one Redis pub/sub connection: confirmed subscriptions, reconnects, resubscribes.

Transport only: what arrives goes to ``on_message(channel, data)``; what it
means is the hub's business.  ``subscribe`` returns once Redis confirmed it,
so a later PUBLISH on that channel reaches this worker; ``want`` batches the
SUBSCRIBEs of many callers (a connect storm) and returns a future of the same
confirmation.  When the connection
breaks, ``run`` reconnects with backoff, subscribes again to every wanted
channel, and calls ``on_resubscribed`` once Redis confirmed them all: what
was published meanwhile is lost to pub/sub, and the caller reads it back from
Postgres then (not earlier: a read before the confirmation could miss a
publish that lands between the read and the subscription).

A connection can also die without breaking: a NAT or firewall that forgot it,
a host that vanished, send no RST, and a reader that only waits would wait
for ~15 minutes, deaf while it looks connected.  So the reader keeps a
liveness deadline (``storage.pubsub_liveness_s``, ``Liveness``): anything read
proves the connection alive; a third of the deadline without a read, it sends
a PING; the whole deadline without one, it drops the connection and takes the
reconnect path above.  ``live`` is what ``/health/ready`` reports.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from typing import Any, Protocol

from chatd.core import errors
from chatd.process import metrics
from chatd.process.config import StorageSettings
from chatd.process.logs import app_log, fields
from chatd.storage.kv import close_client, pubsub_client, redis_errors

_MIN_WAIT_S = 0.05  # the shortest read the reader makes before it checks its deadline


class FanoutSubscriber(Protocol):
    """What the hub, the health checks and the worker need of a subscriber: ``Subscriber`` (one Redis,
    Sentinel) or ``chatd.realtime.shardsub.ShardedSubscriber`` (a Redis Cluster)."""

    timeout_s: float
    connected: bool

    @property
    def live(self) -> bool: ...

    def health(self) -> dict[str, Any]: ...

    async def run(self) -> None: ...

    async def flush_wanted(self) -> None: ...

    async def subscribe(self, channel: str) -> None: ...

    def want(self, channel: str) -> asyncio.Future[None]: ...

    async def unsubscribe(self, channel: str) -> None: ...

    async def close(self) -> None: ...


class Liveness:
    """When the pub/sub connection needs a PING, and when it counts as dead (pure: times are given).

    Anything read proves the connection alive: a message, a confirmation, a PONG.  Nothing read for a
    third of ``deadline_s``: a PING is due (again a third later while unanswered).  Nothing read for
    ``deadline_s``: dead.  ``late``: silent for two thirds of it, a PING unanswered for a whole third:
    readiness says not ok from then on, though the deadline has not come yet.
    """

    def __init__(self, deadline_s: float, now: float) -> None:
        self.deadline_s = deadline_s
        self.ping_every_s = deadline_s / 3
        self.heard_at = self.pinged_at = now

    def restart(self, now: float) -> None:
        """A new connection: its deadline counts from now."""
        self.heard_at = self.pinged_at = now

    def heard(self, now: float) -> None:
        self.heard_at = now

    def pinged(self, now: float) -> None:
        self.pinged_at = now

    def silent_s(self, now: float) -> float:
        return now - self.heard_at

    def ping_due(self, now: float) -> bool:
        return now - max(self.heard_at, self.pinged_at) >= self.ping_every_s

    def expired(self, now: float) -> bool:
        return now - self.heard_at >= self.deadline_s

    def late(self, now: float) -> bool:
        return now - self.heard_at >= 2 * self.ping_every_s

    def wait_s(self, now: float) -> float:
        """How long the reader may wait for a message before it must PING or give up (0 when it must now)."""
        due = min(max(self.heard_at, self.pinged_at) + self.ping_every_s, self.heard_at + self.deadline_s)
        return max(0.0, due - now)


class Deaf(Exception):
    """Nothing read on the pub/sub connection within the liveness deadline."""


def fail(fut: asyncio.Future[None] | None, reason: str) -> None:
    """Fail a confirmation not yet given, as ``Unavailable``; retrieved, as nobody may be waiting on it."""
    if fut is not None and not fut.done():
        fut.set_exception(errors.Unavailable(reason))
        fut.exception()


class Subscriber:
    def __init__(
        self,
        storage: StorageSettings,
        on_message: Callable[[bytes, bytes], None],
        on_resubscribed: Callable[[], None],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        # A connection of its own: a busy command pool must never keep the reader from reconnecting.
        # With Sentinel each reconnect asks where the primary is now (kv.pubsub_client).
        self._client = pubsub_client(storage)
        self.timeout_s = storage.redis_timeout_s  # the longest wait for a confirmation
        self._clock = clock
        self._liveness = Liveness(storage.pubsub_liveness_s, clock())
        self._on_message = on_message
        self._on_resubscribed = on_resubscribed
        self._wanted: set[str] = set()
        self._pubsub: Any = None
        self._confirm: dict[bytes, asyncio.Future[None]] = {}
        # Per channel, on the current connection: SUBSCRIBEs sent and not yet confirmed (a channel
        # unsubscribed and wanted again has two in flight: only the last confirmation counts), and
        # the channels Redis confirmed since (a publish on them now reaches this worker).
        self._unconfirmed: dict[bytes, int] = {}
        self._confirmed: set[bytes] = set()
        self._resubscribing: set[bytes] | None = None
        self._pending: set[str] = set()
        self._pending_event = asyncio.Event()
        self.connected = False

    @property
    def live(self) -> bool:
        """Connected, and nothing suggests the connection is dead (``Liveness.late``)."""
        return self.connected and not self._liveness.late(self._clock())

    def health(self) -> dict[str, Any]:
        """The ``pubsub`` entry of ``/health/ready`` (no I/O: the reader's PINGs do the probing)."""
        if not self.connected:
            return {"ok": False, "error": "not connected (reconnecting)"}
        now = self._clock()
        silent_s = self._liveness.silent_s(now)
        if self._liveness.late(now):
            return {"ok": False, "error": f"nothing read for {silent_s:.1f}s, PING unanswered"}
        return {"ok": True, "silent_ms": round(silent_s * 1000)}

    async def close(self) -> None:
        await close_client(self._client)

    async def run(self) -> None:
        """Read forever; reconnect on any failure (a supervised task)."""
        backoff_s = 0.1
        first = True
        while True:
            pubsub = self._client.pubsub(ignore_subscribe_messages=False)
            try:
                channels = sorted(self._wanted)
                self._pubsub = pubsub
                if channels:
                    if not first:
                        self._resubscribing = {c.encode() for c in channels}
                    self._sent(channels)
                    await pubsub.subscribe(*channels)
                else:
                    await pubsub.ping()
                    if not first:
                        self._resubscribed()
                liveness = self._liveness
                liveness.restart(self._clock())
                self.connected = True
                metrics.pubsub_connected.set(1)
                self._pending_event.set()  # wanted while disconnected, after the snapshot above: subscribe now
                if not first:
                    app_log.info("fanout_reconnected", extra=fields(channels=len(channels)))
                first = False
                backoff_s = 0.1
                while True:
                    # Read even with nothing subscribed: the PONGs keep the deadline honest.
                    wait_s = max(_MIN_WAIT_S, liveness.wait_s(self._clock()))
                    msg = await pubsub.get_message(timeout=wait_s)
                    now = self._clock()
                    if msg is not None:
                        liveness.heard(now)
                        self._dispatch(msg)
                    elif liveness.expired(now):
                        raise Deaf(f"nothing read for {liveness.silent_s(now):.1f}s, PINGs unanswered")
                    elif liveness.ping_due(now):
                        await pubsub.ping()
                        liveness.pinged(now)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # whatever broke, the reader must come back: without it the worker is deaf
                self.connected = False
                metrics.pubsub_connected.set(0)
                self._pubsub = None
                self._resubscribing = None
                self._unconfirmed.clear()
                self._confirmed.clear()
                for fut in self._confirm.values():
                    fail(fut, "fan-out connection lost")
                self._confirm.clear()
                metrics.pubsub_reconnects.inc()
                if isinstance(exc, Deaf):  # half-open: no error would ever have come
                    metrics.pubsub_liveness_timeouts.inc()
                    event = "pubsub_liveness_timeout"
                else:
                    event = "fanout_redis_lost"
                app_log.warning(event, extra=fields(error=str(exc)[:200], retry_in_s=backoff_s))
                await asyncio.sleep(backoff_s)
                backoff_s = min(backoff_s * 2, 1.0)  # at most a second after Redis (or a promoted replica) is back
            finally:
                with contextlib.suppress(Exception):  # the connection may be broken already
                    await pubsub.aclose()  # type: ignore[no-untyped-call]

    def _dispatch(self, msg: dict[str, Any]) -> None:
        kind = msg.get("type")
        channel: bytes = msg["channel"]
        if kind == b"message" or kind == "message":
            metrics.hot.pubsub_received += 1
            self._on_message(channel, msg["data"])
        elif kind == b"subscribe" or kind == "subscribe":
            left = self._unconfirmed.pop(channel, 1) - 1
            if left > 0:
                self._unconfirmed[channel] = left  # a later SUBSCRIBE of it is still on its way
            elif channel.decode() in self._wanted:
                self._confirmed.add(channel)
                fut = self._confirm.pop(channel, None)
                if fut is not None and not fut.done():
                    fut.set_result(None)
            if self._resubscribing is not None:
                self._resubscribing.discard(channel)
                if not self._resubscribing:
                    self._resubscribed()

    def _sent(self, channels: list[str]) -> None:
        for channel in channels:
            key = channel.encode()
            self._unconfirmed[key] = self._unconfirmed.get(key, 0) + 1
            self._confirmed.discard(key)

    def _resubscribed(self) -> None:
        self._resubscribing = None
        try:
            self._on_resubscribed()
        except Exception as exc:  # the reader must keep reading
            app_log.error("resubscribe_callback_failed", exc_info=exc)

    async def subscribe(self, channel: str) -> None:
        """Returns once Redis confirmed; ``Unavailable`` when it cannot within the Redis timeout."""
        self._wanted.add(channel)
        pubsub = self._pubsub
        if pubsub is None or not self.connected:
            raise errors.Unavailable("fan-out not connected, try again")
        key = channel.encode()
        if key in self._confirmed:
            return
        fut = self._confirm.get(key)
        if fut is None:
            fut = asyncio.get_running_loop().create_future()
            self._confirm[key] = fut
            self._sent([channel])
            async with redis_errors("subscribe"):
                await pubsub.subscribe(channel)
        try:
            await asyncio.wait_for(asyncio.shield(fut), self.timeout_s)
        except TimeoutError:
            raise errors.Unavailable("fan-out subscription not confirmed, try again") from None

    def want(self, channel: str) -> asyncio.Future[None]:
        """Subscribe (kept through reconnects); the future is done once Redis confirmed the subscription.

        Channels wanted meanwhile go out together in one SUBSCRIBE (``flush_wanted``):
        a connect storm subscribes a thousand user channels in a few commands.  Already
        confirmed: a done future, nothing sent.  The future fails with ``Unavailable`` when
        the connection is down or breaks before the confirmation (the channel stays wanted:
        the reconnect subscribes it, then ``on_resubscribed`` runs); it may never resolve if
        Redis does not answer, so wait for it with a timeout (``timeout_s``).
        """
        self._wanted.add(channel)
        key = channel.encode()
        if key in self._confirmed:
            done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            done.set_result(None)
            return done
        if not self.connected:
            self._pending.add(channel)  # flushed once connected, should the reconnect's SUBSCRIBE have missed it
            self._pending_event.set()
            failed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            fail(failed, "fan-out not connected")
            return failed
        fut = self._confirm.get(key)
        if fut is None:  # else a SUBSCRIBE of it is queued or on its way already
            fut = self._confirm[key] = asyncio.get_running_loop().create_future()
            self._pending.add(channel)
            self._pending_event.set()
        return fut

    async def flush_wanted(self) -> None:
        """Send the pending SUBSCRIBEs (a supervised loop)."""
        while True:
            await self._pending_event.wait()
            self._pending_event.clear()
            pubsub = self._pubsub
            if pubsub is None or not self.connected:
                continue  # kept pending: the reader sets the event once it is connected again
            channels = [c for c in self._pending if c in self._wanted]
            self._pending.clear()
            if not channels:
                continue
            try:
                self._sent(channels)
                async with redis_errors("subscribe"):
                    await pubsub.subscribe(*channels)
            except errors.Unavailable:
                pass  # the reader reconnects and subscribes every wanted channel

    async def unsubscribe(self, channel: str) -> None:
        self._wanted.discard(channel)
        self._pending.discard(channel)
        key = channel.encode()
        self._confirmed.discard(key)
        fut = self._confirm.pop(key, None)
        fail(fut, "unsubscribed")  # wanted again later: a new SUBSCRIBE and a new confirmation
        pubsub = self._pubsub
        if pubsub is not None:
            # A lost unsubscribe costs only unwanted messages until the next reconnect.
            with contextlib.suppress(errors.Unavailable):
                async with redis_errors("unsubscribe"):
                    await pubsub.unsubscribe(channel)
