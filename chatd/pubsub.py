"""The worker's one Redis pub/sub connection: confirmed subscriptions, reconnects, resubscribes.

Transport only: what arrives goes to ``on_message(channel, data)``; what it
means is the hub's business.  ``subscribe`` returns once Redis confirmed it,
so a later PUBLISH on that channel reaches this worker.  When the connection
breaks, ``run`` reconnects with backoff, subscribes again to every wanted
channel, and calls ``on_resubscribed`` once Redis confirmed them all: what
was published meanwhile is lost to pub/sub, and the caller reads it back from
Postgres then (not earlier: a read before the confirmation could miss a
publish that lands between the read and the subscription).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any

from chatd import errors, metrics
from chatd.config import StorageSettings
from chatd.kv import close_client, pubsub_client, redis_errors
from chatd.logs import app_log, fields


class Subscriber:
    def __init__(
        self,
        storage: StorageSettings,
        on_message: Callable[[bytes, bytes], None],
        on_resubscribed: Callable[[], None],
    ) -> None:
        # A connection of its own: a busy command pool must never keep the reader from reconnecting.
        # With Sentinel each reconnect asks where the primary is now (kv.pubsub_client).
        self._client = pubsub_client(storage)
        self._timeout_s = storage.redis_timeout_s
        self._on_message = on_message
        self._on_resubscribed = on_resubscribed
        self._wanted: set[str] = set()
        self._pubsub: Any = None
        self._confirm: dict[bytes, asyncio.Future[None]] = {}
        self._resubscribing: set[bytes] | None = None
        self._wake = asyncio.Event()
        self._pending: set[str] = set()
        self._pending_event = asyncio.Event()
        self.connected = False

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
                    await pubsub.subscribe(*channels)
                else:
                    await pubsub.ping()
                    if not first:
                        self._resubscribed()
                self.connected = True
                metrics.pubsub_connected.set(1)
                if not first:
                    app_log.info("fanout_reconnected", extra=fields(channels=len(channels)))
                first = False
                backoff_s = 0.1
                while True:
                    if not pubsub.subscribed:
                        self._wake.clear()
                        await self._wake.wait()  # nothing to listen to until a first subscribe
                        continue
                    msg = await pubsub.get_message(timeout=1.0)
                    if msg is not None:
                        self._dispatch(msg)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # whatever broke, the reader must come back: without it the worker is deaf
                self.connected = False
                metrics.pubsub_connected.set(0)
                self._pubsub = None
                self._resubscribing = None
                for fut in self._confirm.values():
                    if not fut.done():
                        fut.set_exception(errors.Unavailable("fan-out connection lost"))
                        fut.exception()  # retrieved: nobody may be waiting
                self._confirm.clear()
                metrics.pubsub_reconnects.inc()
                app_log.warning("fanout_redis_lost", extra=fields(error=str(exc)[:200], retry_in_s=backoff_s))
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
            fut = self._confirm.pop(channel, None)
            if fut is not None and not fut.done():
                fut.set_result(None)
            if self._resubscribing is not None:
                self._resubscribing.discard(channel)
                if not self._resubscribing:
                    self._resubscribed()

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
        fut = self._confirm.get(key)
        if fut is None:
            fut = asyncio.get_running_loop().create_future()
            self._confirm[key] = fut
            async with redis_errors("subscribe"):
                await pubsub.subscribe(channel)
            self._wake.set()
        try:
            await asyncio.wait_for(asyncio.shield(fut), self._timeout_s)
        except TimeoutError:
            raise errors.Unavailable("fan-out subscription not confirmed, try again") from None

    def want(self, channel: str) -> None:
        """Subscribe without waiting for the confirmation; kept through reconnects.

        Channels wanted meanwhile go out together in one SUBSCRIBE (``flush_wanted``):
        a connect storm subscribes a thousand user channels in a few commands.
        """
        self._wanted.add(channel)
        self._pending.add(channel)
        self._pending_event.set()

    async def flush_wanted(self) -> None:
        """Send the pending SUBSCRIBEs (a supervised loop)."""
        while True:
            await self._pending_event.wait()
            self._pending_event.clear()
            channels = [c for c in self._pending if c in self._wanted]
            self._pending.clear()
            pubsub = self._pubsub
            if not channels or pubsub is None or not self.connected:
                continue  # a reconnect subscribes every wanted channel anyway
            try:
                async with redis_errors("subscribe"):
                    await pubsub.subscribe(*channels)
                self._wake.set()
            except errors.Unavailable:
                pass  # the reader reconnects and subscribes every wanted channel

    async def unsubscribe(self, channel: str) -> None:
        self._wanted.discard(channel)
        self._pending.discard(channel)
        pubsub = self._pubsub
        if pubsub is not None:
            # A lost unsubscribe costs only unwanted messages until the next reconnect.
            with contextlib.suppress(errors.Unavailable):
                async with redis_errors("unsubscribe"):
                    await pubsub.unsubscribe(channel)
