"""The Tornado application: the worker's services, built once, injected into every handler."""

from __future__ import annotations

import os
from typing import Any

import tornado.web

from chatd import api
from chatd.accounts import Accounts
from chatd.assistant import Assistant
from chatd.fanout import Hub
from chatd.logs import assistant_log, fields
from chatd.providers import make_provider
from chatd.retrieval import Retriever, load_embedder
from chatd.rooms import MessageWriter, Rooms
from chatd.state import ServerState
from chatd.web import Application, LiveHandler, MetricsHandler, NotFoundHandler, ReadyHandler, log_request
from chatd.ws import ChatSocket, refresh_registrations


def _assistant(state: ServerState, hub: Hub) -> Assistant:
    """Provider, retriever and assistant of this worker (after the fork: the embedder's OpenMP must not be forked)."""
    provider = make_provider(state.settings.assistant)
    # One embedding thread per worker: workers embed side by side instead of fighting for both cores.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    retriever = Retriever(state, load_embedder(state.settings.assistant.embedder))
    state.tasks.spawn(retriever.start(), "retrieval-start")
    state.drainers.append(retriever.close)
    assistant = Assistant(state, hub, provider, retriever)
    assistant.start()
    assistant_log.info("assistant_ready", extra=fields(provider=provider.name, model=state.settings.assistant.model))
    return assistant


def make_app(state: ServerState) -> tornado.web.Application:
    """Build the services of one worker and start their background tasks (inside the loop)."""
    hub = Hub(state)
    writer = MessageWriter(state, hub)
    rooms = Rooms(state, hub, writer)
    accounts = Accounts(state, hub)
    hub.start()
    writer.start()
    rooms.assistant = _assistant(state, hub)
    state.tasks.spawn(refresh_registrations(state), "connection-registry")

    base = {"state": state}
    routes: list[Any] = [
        (r"/health/live", LiveHandler, base),
        (r"/health/ready", ReadyHandler, base),
        (r"/metrics", MetricsHandler, base),
        (r"/ws", ChatSocket, {"state": state, "accounts": accounts, "rooms": rooms, "hub": hub}),
        *api.routes(state, accounts, rooms),
    ]
    ws = state.settings.ws
    return Application(
        routes,
        trusted_proxies=state.settings.server.trusted_proxies,
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
