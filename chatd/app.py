"""The Tornado application: routes, with the worker's state injected into every handler."""

from __future__ import annotations

from typing import Any

import tornado.web

from chatd.state import ServerState
from chatd.web import LiveHandler, NotFoundHandler, ReadyHandler, log_request


def routes(state: ServerState) -> list[tuple[str, type[tornado.web.RequestHandler], dict[str, Any]]]:
    deps = {"state": state}
    return [
        (r"/health/live", LiveHandler, deps),
        (r"/health/ready", ReadyHandler, deps),
    ]


def make_app(state: ServerState) -> tornado.web.Application:
    return tornado.web.Application(
        routes(state),  # type: ignore[arg-type]
        default_handler_class=NotFoundHandler,
        default_handler_args={"state": state},
        log_function=log_request,
        compress_response=False,
        websocket_ping_interval=state.settings.ws.heartbeat_interval_s,
        websocket_ping_timeout=state.settings.ws.idle_timeout_s,
        websocket_max_message_size=state.settings.ws.max_frame_bytes,
    )
