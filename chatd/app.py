"""The Tornado application: the worker's services, built once, injected into every handler."""

from __future__ import annotations

from typing import Any

import tornado.web

from chatd import api
from chatd.accounts import Accounts
from chatd.fanout import Hub
from chatd.rooms import MessageWriter, Rooms
from chatd.state import ServerState
from chatd.web import LiveHandler, NotFoundHandler, ReadyHandler, log_request
from chatd.ws import ChatSocket, refresh_registrations


def make_app(state: ServerState) -> tornado.web.Application:
    """Build the services of one worker and start their background tasks (inside the loop)."""
    hub = Hub(state)
    writer = MessageWriter(state, hub)
    rooms = Rooms(state, hub, writer)
    accounts = Accounts(state, hub)
    hub.start()
    writer.start()
    state.tasks.spawn(refresh_registrations(state), "connection-registry")

    base = {"state": state}
    routes: list[Any] = [
        (r"/health/live", LiveHandler, base),
        (r"/health/ready", ReadyHandler, base),
        (r"/ws", ChatSocket, {"state": state, "accounts": accounts, "rooms": rooms, "hub": hub}),
        *api.routes(state, accounts, rooms),
    ]
    ws = state.settings.ws
    return tornado.web.Application(
        routes,
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
