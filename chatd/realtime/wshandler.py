"""``WebSocket``: the Tornado request handler that upgrades a request and hands the stream to ``WsConnection``.

``get`` checks the upgrade request (RFC 6455 4.2.1), negotiates permessage-deflate, answers ``101`` through
``finish()`` (access log as for any request), takes the stream with the public ``detach()`` and runs the
connection.  Subclasses implement the ``open`` / ``on_message`` / ``on_close`` callbacks as with Tornado's own
``WebSocketHandler``.  ``EchoSocket`` is the conformance endpoint (Autobahn).
"""

from __future__ import annotations

from collections.abc import Awaitable
from typing import Any

import tornado.web
from wsproto.extensions import PerMessageDeflate

from chatd.process.logs import app_log, fields
from chatd.realtime.wsconn import WsConnection, accept_value


def _deflate_offer(header: str) -> str | None:
    """The first permessage-deflate offer of a Sec-WebSocket-Extensions header (RFC 7692 5.1)."""
    for offer in header.split(","):
        if offer.split(";", 1)[0].strip().lower() == "permessage-deflate":
            return offer.strip()
    return None


class WebSocket(tornado.web.RequestHandler):
    """A server WebSocket on public Tornado API: ``get`` upgrades, then ``WsConnection`` runs it.

    Subclasses implement ``on_message`` (and may ``open``, ``on_close``, ``count_close_sent``,
    ``get_compression_options``); ``close``, ``abort`` and ``ws_connection`` (None once closed) as with
    Tornado's ``WebSocketHandler``.  Settings read from the application: ``websocket_ping_interval``,
    ``websocket_ping_timeout``, ``websocket_max_message_size``.
    """

    close_timeout_s: float = 5.0
    ws_connection: WsConnection | None = None
    close_code: int | None = None
    close_reason: str | None = None
    _ws: WsConnection | None = None
    _on_close_called = False

    async def get(self, *args: Any, **kwargs: Any) -> None:
        headers = self.request.headers
        if headers.get("Upgrade", "").lower() != "websocket":
            self.set_status(400)
            self.finish('Can "Upgrade" only to "WebSocket".')
            return
        if "upgrade" not in [v.strip() for v in headers.get("Connection", "").lower().split(",")]:
            self.set_status(400)
            self.finish('"Connection" must be "Upgrade".')
            return
        if headers.get("Sec-WebSocket-Version") not in ("7", "8", "13"):
            self.set_status(426)
            self.set_header("Sec-WebSocket-Version", "7, 8, 13")
            self.finish()
            return
        key = headers.get("Sec-WebSocket-Key")
        if not key or not headers.get("Host"):
            self.set_status(400)
            self.finish("Missing/Invalid WebSocket headers")
            return
        compression = self.get_compression_options()
        deflate: PerMessageDeflate | None = None
        offer = _deflate_offer(headers.get("Sec-WebSocket-Extensions", "")) if compression is not None else None
        if offer is not None:
            deflate = PerMessageDeflate()
            accepted = deflate.accept(offer)
            if isinstance(accepted, str):
                self.set_header("Sec-WebSocket-Extensions", f"permessage-deflate; {accepted}".rstrip("; "))
            else:
                deflate = None
        self.clear_header("Content-Type")
        self.set_status(101)
        self.set_header("Upgrade", "websocket")
        self.set_header("Connection", "Upgrade")
        self.set_header("Sec-WebSocket-Accept", accept_value(key))
        self.finish()
        stream = self.detach()
        stream.set_nodelay(True)  # small frames: no Nagle delay
        conn = WsConnection(
            self,
            stream,
            deflate,
            compression,
            int(self.settings.get("websocket_max_message_size", 10 * 1024 * 1024)),
            self.close_timeout_s,
        )
        self.ws_connection = self._ws = conn
        stream.set_close_callback(lambda: self._connection_closed(conn))
        interval = float(self.settings.get("websocket_ping_interval") or 0)
        conn.start_pinging(interval, float(self.settings.get("websocket_ping_timeout") or interval))
        try:
            opened = self.open(*args, **kwargs)
            if opened is not None:
                await opened
        except Exception as exc:
            app_log.error("ws_open_failed", exc_info=exc, extra=fields(connection_id=conn._id()))
            conn.abort()
        if not stream.closed():
            await conn.run()
        self._connection_closed(conn)

    def _connection_closed(self, conn: WsConnection) -> None:
        """The TCP connection ended (or is ending): ``on_close`` once."""
        if self._on_close_called:
            return
        self._on_close_called = True
        self.ws_connection = None
        self.close_code, self.close_reason = conn.close_code, conn.close_reason
        if not conn.stream.closed():
            conn.stream.close()
        self.on_close()

    # -- the subclass's side ------------------------------------------------------------

    def open(self, *args: Any, **kwargs: Any) -> Awaitable[None] | None:
        return None

    def on_message(self, message: str | bytes) -> Awaitable[None] | None:
        raise NotImplementedError

    def on_close(self) -> None:
        pass

    def count_close_sent(self, code: int | None, reason: str | None) -> None:
        """Called once per close frame chatd starts (not for the echo of a client's)."""

    def get_compression_options(self) -> dict[str, Any] | None:
        """None: no permessage-deflate; a dict (``compression_level``, ``mem_level``): offered deflate accepted."""
        return None

    # -- what the subclass calls -----------------------------------------------------------

    def close(self, code: int | None = None, reason: str | None = None) -> None:
        if self.ws_connection is not None:
            self.ws_connection.close(code, reason)

    def abort(self) -> None:
        """Drop the TCP connection now (shutdown: the client did not answer the close frame in time)."""
        if self._ws is not None:
            self._ws.abort()

    def write_message(self, message: str | bytes, binary: bool = False) -> None:
        if self.ws_connection is not None and not self.ws_connection.is_closing():
            self.ws_connection.send_message(message)


class EchoSocket(WebSocket):
    """TEST ONLY (``ws.test_echo_route``): echoes every message, for the Autobahn conformance cases.

    The same connection class, size limit and close timeout as ``/ws``; no
    authentication, so it is never routed unless that setting is on.
    """

    def initialize(self, close_timeout_s: float) -> None:
        self.close_timeout_s = close_timeout_s

    def on_message(self, message: str | bytes) -> None:
        self.write_message(message)
