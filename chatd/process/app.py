"""One worker: its services, built once after the fork, wired with only what each uses.

``Worker.create`` opens the pools and builds the services; ``start`` runs
their long-lived loops under supervision; ``application`` is the Tornado app
with the services injected into the handlers (``initialize`` kwargs);
``shutdown`` stops everything in order (docs/ARCHITECTURE.md, section 6).
"""

from __future__ import annotations

import asyncio
import gc
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import tornado.web

from chatd import __version__
from chatd.api import openapi, webapp
from chatd.api import routes as api
from chatd.api.health import check_dependencies
from chatd.api.web import Application, LiveHandler, MetricsHandler, NotFoundHandler, ReadyHandler, log_request
from chatd.api.ws import CONNECTION_TTL_S, ChatSocket, refresh_registrations
from chatd.assistant.answers import Assistant
from chatd.assistant.providers import Provider, make_provider
from chatd.assistant.retrieval import Retriever, load_embedder
from chatd.core.errors import ChatdError, CloseCode
from chatd.process import metrics
from chatd.process.config import Settings
from chatd.process.logs import assistant_log, fields, server_log
from chatd.process.state import ServerState
from chatd.realtime.batching import Batched
from chatd.realtime.fanout import Hub
from chatd.realtime.presence import Presence
from chatd.realtime.pubsub import FanoutSubscriber, Subscriber
from chatd.realtime.repair import Repair
from chatd.realtime.shardsub import ShardedSubscriber
from chatd.realtime.writer import MessageWriter
from chatd.realtime.wshandler import EchoSocket
from chatd.services.accounts import Accounts
from chatd.services.admin import Admin
from chatd.services.content_rules import ContentRules
from chatd.services.files import Files, make_storage
from chatd.services.moderation import Moderation
from chatd.services.ratelimit import SendLimiter
from chatd.services.revocations import Revocations
from chatd.services.rooms import Rooms
from chatd.services.search import Search
from chatd.storage import kv
from chatd.storage.db import Database, open_database

if TYPE_CHECKING:
    from tornado.httpserver import HTTPServer


@dataclass(eq=False)
class Worker:
    settings: Settings
    state: ServerState
    db: Database
    kv: kv.KV
    hub: Hub
    writer: MessageWriter
    repair: Repair
    revocations: Revocations
    presence: Presence
    limiter: SendLimiter
    rooms: Rooms
    accounts: Accounts
    provider: Provider
    retriever: Retriever
    assistant: Assistant
    registrations: Batched[tuple[str, int, str], int]
    files: Files
    search: Search
    admin: Admin
    content_rules: ContentRules
    moderation: Moderation

    @classmethod
    async def create(cls, settings: Settings, worker_id: int) -> Worker:
        state = ServerState(worker_id)
        storage, ws = settings.storage, settings.ws
        db = await open_database(storage, f"chatd-w{worker_id}")
        keys = kv.keys_for(storage)
        redis = kv.KV(kv.connect(storage), keys)

        def subscriber(
            on_message: Callable[[bytes, bytes], None], on_resubscribed: Callable[[], None]
        ) -> FanoutSubscriber:
            if keys.cluster:
                return ShardedSubscriber(storage, keys, on_message, on_resubscribed)
            return Subscriber(storage, on_message, on_resubscribed)

        hub = Hub(redis, db, keys, ws, subscriber)
        writer = MessageWriter(db, hub, settings)
        presence = Presence(redis, hub, ws)
        limiter = SendLimiter(redis, ws.send_rate_count, ws.send_rate_window_s)
        rooms = Rooms(db, redis, hub, writer, presence, limiter, ws)
        accounts = Accounts(db, redis, hub, settings)
        # After the fork: the embedder's OpenMP must not be forked.  One embedding thread per
        # worker: workers embed side by side instead of fighting for both cores.
        provider = make_provider(settings.assistant)
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        retriever = Retriever(db, settings.assistant, state.tasks, load_embedder(settings.assistant.embedder))
        assistant = Assistant(db, redis, hub, provider, retriever, settings, state.tasks)
        rooms.assistant = assistant
        files = Files(db, writer, make_storage(settings), settings)
        cap = settings.auth.max_connections_per_user
        registrations: Batched[tuple[str, int, str], int] = Batched(
            lambda conns: redis.register_connections(conns, cap, CONNECTION_TTL_S)
        )
        content_rules = ContentRules(db, hub, state.tasks, settings.moderation.rules_poll_s)
        try:  # in force before the first send is read; with Postgres away, from the first successful poll on
            await content_rules.reload()
        except ChatdError:
            pass
        rooms.content_rules = content_rules
        files.content_rules = content_rules
        admin = Admin(db, redis, hub, rooms, accounts, settings)
        moderation = Moderation(db, redis, hub, rooms, accounts, admin, content_rules, settings.moderation)
        return cls(
            settings,
            state,
            db,
            redis,
            hub,
            writer,
            Repair(hub, db, ws),
            Revocations(hub, db, accounts.session_ended, ws.probe_interval_s),
            presence,
            limiter,
            rooms,
            accounts,
            provider,
            retriever,
            assistant,
            registrations,
            files,
            Search(db, retriever),
            admin,
            content_rules,
            moderation,
        )

    def start(self) -> None:
        tasks = self.state.tasks
        metrics.set_worker(self.state.worker_id)
        for code in CloseCode:  # every code chatd sends, exported at 0
            metrics.ws_closed.labels(str(int(code)))
        tasks.supervise("fanout-reader", self.hub.subscriber.run)
        tasks.supervise("fanout-subscribe", self.hub.subscriber.flush_wanted)
        tasks.supervise("message-writer", self.writer.run)
        tasks.supervise("fanout-repair", self.repair.run)
        tasks.supervise("fanout-publish", self.hub.outbox.run)
        if self.settings.ws.room_linger_s > 0:
            tasks.supervise("fanout-linger", self.hub.run_linger)
        tasks.supervise("revocations", self.revocations.run)
        tasks.supervise("presence", self.presence.run)
        tasks.supervise("send-quota", self.limiter.run)
        tasks.supervise("connection-registry", lambda: refresh_registrations(self.state, self.kv, self.hub.origin))
        tasks.supervise("metrics-flush", metrics.flush_loop)
        tasks.supervise("auth-reads", self.accounts.status_reads.run)
        tasks.supervise("auth-denylist-reads", self.accounts.denied_reads.run)
        tasks.supervise("connection-registrations", self.registrations.run)
        tasks.supervise("join-reads", self.rooms.join_reads.run)
        tasks.supervise("read-receipts", self.rooms.receipts.run)
        tasks.supervise("metrics-loop-lag", metrics.loop_lag_loop)
        tasks.supervise("metrics-sample", lambda: metrics.sample_loop(self.db.pop_stats, self._ready))
        tasks.supervise("file-sweeper", self.files.run_sweeper)
        tasks.supervise("content-rules", self.content_rules.run)
        tasks.spawn(self.retriever.start(), "retrieval-start")
        self.assistant.start()
        assistant_log.info(
            "assistant_ready", extra=fields(provider=self.provider.name, model=self.settings.assistant.model)
        )
        # Everything built so far lives as long as the worker: keep it out of the cyclic GC's scans,
        # and collect the young generation less often (a chat server allocates many short-lived objects).
        gc.collect()
        gc.freeze()
        gc.set_threshold(*_GC_THRESHOLDS)
        metrics.watch_gc()

    async def _ready(self) -> bool:
        """What /health/ready would answer (for the chatd_ready gauge)."""
        checks = await check_dependencies(self.db, self.kv, self.hub.subscriber, self.settings.storage.health_timeout_s)
        return all(c["ok"] for c in checks.values()) and not self.state.tasks.down and not self.state.draining

    def application(self) -> tornado.web.Application:
        base: dict[str, Any] = {"state": self.state, "settings": self.settings}
        socket_deps = {
            **base,
            "accounts": self.accounts,
            "rooms": self.rooms,
            "hub": self.hub,
            "kv": self.kv,
            "writer": self.writer,
            "register": self.registrations,
        }
        spec: dict[str, Any] = {}
        rest: list[Any] = [
            (r"/health/live", LiveHandler, base),
            (r"/health/ready", ReadyHandler, {**base, "db": self.db, "kv": self.kv, "pubsub": self.hub.subscriber}),
            (r"/metrics", MetricsHandler, base),
            *api.routes(
                self.state,
                self.settings,
                self.db,
                self.accounts,
                self.rooms,
                self.files,
                self.search,
                self.admin,
                spec,
                self.moderation,
            ),
        ]
        spec.update(openapi.document(rest, __version__))  # the same list the application registers
        routes: list[Any] = [
            *rest,
            (r"/ws", ChatSocket, socket_deps),  # the socket protocol: docs/PROTOCOL.md
            *webapp.routes(),  # the web app at /
        ]
        ws = self.settings.ws
        if ws.test_echo_route:  # test only: the conformance suite's echo socket (never on in production)
            routes.insert(0, (r"/test/ws-echo", EchoSocket, {"close_timeout_s": ws.close_timeout_s}))
        return Application(
            routes,
            trusted_proxies=self.settings.server.trusted_proxies,
            default_handler_class=NotFoundHandler,
            default_handler_args=base,
            log_function=log_request,
            compress_response=False,
            websocket_ping_interval=ws.heartbeat_interval_s,
            # Tornado caps the pong wait at the ping interval: a silent socket is
            # closed within heartbeat_interval_s + min(idle_timeout_s, heartbeat_interval_s).
            websocket_ping_timeout=min(ws.idle_timeout_s, ws.heartbeat_interval_s),
            websocket_max_message_size=ws.max_frame_bytes,
        )

    async def shutdown(self, server: HTTPServer) -> None:
        """Finish in-flight work before closing connections, then cancel the rest and close the pools."""
        started = time.monotonic()
        drain_s = self.settings.server.drain_timeout_s
        deadline = started + drain_s
        state = self.state
        state.draining = True  # 1. readiness 503; sockets stop reading frames; no new upgrades
        server.stop()  # stop accepting (this process's copy of the listening socket)
        # 2. every send already read is committed and answered (ack, or error) before its socket closes
        await _within(self.writer.drain(), deadline, "writer")
        sockets = [ws for ws in state.connections if isinstance(ws, ChatSocket)]
        for ws in sockets:  # 3. tell every client to reconnect elsewhere
            ws.force_close(int(CloseCode.GOING_AWAY), "server shutting down")
        # A connection accepted just before stop() has not been counted yet: give its request time to arrive.
        await asyncio.sleep(min(0.25, drain_s))
        # 4. in-flight requests finish, and close handshakes; a socket that has not answered its 1001 within
        # _CLOSE_WAIT_S is not reading: waiting longer (ws.close_timeout_s) would only hold the whole worker.
        close_by = min(deadline, time.monotonic() + _CLOSE_WAIT_S)
        while time.monotonic() < deadline and (  # noqa: ASYNC110  (polled: two counters, no event worth wiring)
            state.in_flight_requests or (state.connections and time.monotonic() < close_by)
        ):
            await asyncio.sleep(0.02)
        for ws in [ws for ws in state.connections if isinstance(ws, ChatSocket)]:
            ws.abort()
        await _within(server.close_all_connections(), max(deadline, time.monotonic() + 0.1), "connections")
        await _within(self.writer.drain(), time.monotonic() + drain_s, "writer")  # sends of the last REST calls
        # 5. the assistant finishes (or cancels and stores) its answers; presence entries are removed
        await _within(self.assistant.drain(), time.monotonic() + drain_s, "assistant")
        await self.retriever.close()
        await _within(self.presence.close(), time.monotonic() + 2, "presence")
        await _within(self.hub.outbox.drain(), time.monotonic() + 2, "publish queue")  # the other workers' copy
        # 6. the rest of the background tasks, then the pools
        await state.tasks.cancel_all(timeout_s=5)
        metrics.hot.flush()
        await self.hub.subscriber.close()
        await self.kv.close()
        await self.db.close(timeout=5)
        server_log.info(
            "worker_stopped",
            extra=fields(
                websockets_closed=len(sockets),
                duration_ms=round((time.monotonic() - started) * 1000),
                gc={str(g): {"runs": int(n), "pause_s": round(t, 3)} for g, (n, t) in metrics.gc_totals.items()},
            ),
        )


# Measured (docs/BENCHMARKS.md, GC): Python's default (700, 10, 10) spent ~6% of the CPU in the collector at
# 12,000 deliveries/s, with full collections of ~170 ms; with these, under 1.5%, no full collection in the run,
# young-generation pauses of ~8 ms.
_GC_THRESHOLDS = (10_000, 10, 100)
_CLOSE_WAIT_S = 2.0  # shutdown: how long sockets get to answer their 1001


async def _within(aw: Any, deadline: float, what: str) -> None:
    try:
        await asyncio.wait_for(aw, max(0.01, deadline - time.monotonic()))
    except TimeoutError:
        server_log.warning("shutdown_step_timeout", extra=fields(step=what))
    except Exception as exc:  # one step failing must not skip the others
        server_log.warning("shutdown_step_failed", extra=fields(step=what, error=repr(exc)[:200]))
