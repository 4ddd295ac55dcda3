"""HTTP plumbing shared by every REST handler: JSON in, JSON out, one error shape.

Handlers raise ``ChatdError`` subclasses; ``write_error`` renders them as
``{"error": {"code", "message"}}`` with the class's status.  Anything else is
logged with its traceback and the client sees only ``internal``.
"""

from __future__ import annotations

import ipaddress
import json
import re
from collections.abc import Awaitable, Sequence
from typing import Any
from urllib.parse import urlparse

import tornado.httputil
import tornado.routing
import tornado.web
from tornado import httputil
from tornado.http1connection import HTTP1Connection

from chatd.api.health import check_dependencies
from chatd.api.openapi import obj, op
from chatd.core import errors
from chatd.process import metrics
from chatd.process.config import ServerSettings, Settings
from chatd.process.logs import access_log, fields
from chatd.process.state import ServerState
from chatd.realtime.pubsub import FanoutSubscriber
from chatd.storage.db import Database
from chatd.storage.kv import KV

CORS_EXPOSE = "Retry-After, Content-Disposition, Content-Range, Content-Length, Accept-Ranges, ETag"


def origin_allowed(origin: str, host: str, allowed: list[str]) -> bool:
    """``server.allowed_origins`` (``*`` = any), or the same host when the list is empty (socket and REST alike)."""
    if "*" in allowed or origin.rstrip("/") in (o.rstrip("/") for o in allowed):
        return True
    if allowed:
        return False
    return urlparse(origin).netloc.lower() == host.lower()


def allowed_methods(handler: type) -> list[str]:
    """The HTTP methods a chatd handler implements (Tornado's defaults answer 405)."""
    out = []
    for method in ("GET", "POST", "PUT", "PATCH", "DELETE"):
        owner = next((c for c in handler.__mro__ if method.lower() in c.__dict__), None)
        if owner is not None and owner.__module__.startswith("chatd"):
            out.append(method)
    return out


_HTTP_CODES = {
    400: errors.BadRequest,
    401: errors.Unauthorized,
    403: errors.Forbidden,
    404: errors.NotFound,
    405: errors.MethodNotAllowed,
    409: errors.Conflict,
    413: errors.TooLarge,
    429: errors.RateLimited,
    503: errors.Unavailable,
}


_Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(text.strip())
    except ValueError:
        return None


def forwarded_client(
    peer: str, headers: tornado.httputil.HTTPHeaders, trusted: Sequence[_Network]
) -> tuple[str, str | None]:
    """(client IP, scheme or None) of a request whose TCP peer is ``peer``.

    The headers count only when the peer is a trusted proxy: X-Forwarded-For is
    read from the right, skipping trusted proxies (each appends the address it
    saw), so the first untrusted address is the client and anything a client
    wrote further left is ignored.  Without the header, X-Real-IP.
    """

    def is_trusted(addr: ipaddress.IPv4Address | ipaddress.IPv6Address | None) -> bool:
        return addr is not None and any(addr in net for net in trusted)

    if not trusted or not is_trusted(_ip(peer)):
        return peer, None
    client = peer
    chain = [part for value in headers.get_list("X-Forwarded-For") for part in value.split(",") if part.strip()]
    if chain:
        for part in reversed(chain):
            addr = _ip(part)
            if addr is None:
                break  # garbage: stop at the last address a trusted proxy vouched for
            client = str(addr)
            if not is_trusted(addr):
                break
    elif (real := _ip(headers.get("X-Real-IP", ""))) is not None:
        client = str(real)
    proto = headers.get("X-Forwarded-Proto", "").strip().lower()
    return client, proto if proto in ("http", "https") else None


class Application(tornado.web.Application):
    """tornado's Application, with the client address taken from trusted proxies' headers for every route."""

    def __init__(self, *args: Any, trusted_proxies: Sequence[str] = (), **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.trusted_proxies = [ipaddress.ip_network(p, strict=False) for p in trusted_proxies]

    def find_handler(self, request: tornado.httputil.HTTPServerRequest, **kwargs: Any) -> tornado.web._HandlerDelegate:
        if self.trusted_proxies and request.remote_ip:
            request.remote_ip, scheme = forwarded_client(request.remote_ip, request.headers, self.trusted_proxies)
            if scheme:
                request.protocol = scheme
        return super().find_handler(request, **kwargs)


class BaseHandler(tornado.web.RequestHandler):
    state: ServerState
    config: Settings

    def initialize(self, state: ServerState, settings: Settings) -> None:
        self.state = state
        self.config = settings  # (`settings` is Tornado's application settings)
        self._edge_headers()  # set_default_headers ran before initialize: now with the settings

    def _edge_headers(self) -> None:
        """Security headers on every response, and CORS for an allowed Origin (never credentials)."""
        self.set_header("X-Content-Type-Options", "nosniff")
        self.set_header("X-Frame-Options", "DENY")
        self.set_header("Content-Security-Policy", "default-src 'none'; frame-ancestors 'none'")
        self.set_header("Referrer-Policy", "no-referrer")
        config = getattr(self, "config", None)
        if config is None:
            return
        if config.server.hsts_max_age_s and self.request.protocol == "https":
            self.set_header("Strict-Transport-Security", f"max-age={config.server.hsts_max_age_s}")
        origin = self.request.headers.get("Origin")
        if origin and origin_allowed(origin, self.request.host, config.server.allowed_origins):
            # Bearer tokens, no cookies: Access-Control-Allow-Credentials is never sent.
            wildcard = "*" in config.server.allowed_origins
            self.set_header("Access-Control-Allow-Origin", "*" if wildcard else origin)
            self.set_header("Access-Control-Expose-Headers", CORS_EXPOSE)
            if not wildcard:
                self.add_header("Vary", "Origin")

    def options(self, *args: Any) -> None:
        """CORS preflight: 204 with the allowed methods and headers, or 403 for a foreign origin."""
        origin = self.request.headers.get("Origin")
        if not origin or not origin_allowed(origin, self.request.host, self.config.server.allowed_origins):
            raise errors.Forbidden("origin not allowed")
        wanted = self.request.headers.get("Access-Control-Request-Method", "").upper()
        methods = allowed_methods(type(self))
        if wanted and wanted not in methods:
            raise errors.MethodNotAllowed(f"{wanted} not allowed here")
        self.set_header("Access-Control-Allow-Methods", ", ".join(methods))
        self.set_header("Access-Control-Allow-Headers", "Authorization, Content-Type, Range")
        self.set_header("Access-Control-Max-Age", "600")
        self.set_status(204)
        self.finish()

    def prepare(self) -> None:
        self.state.in_flight_requests += 1
        self._counted = True
        # The body is read by now; chunked requests have no Content-Length, so measure it.
        limit = self.config.server.max_body_bytes
        if len(self.request.body or b"") > limit:
            raise errors.TooLarge(f"request body over {limit} bytes")

    def on_finish(self) -> None:
        if getattr(self, "_counted", False):
            self.state.in_flight_requests -= 1
            self._counted = False

    def set_default_headers(self) -> None:
        self.set_header("Content-Type", "application/json; charset=utf-8")
        self.set_header("Cache-Control", "no-store")
        self._edge_headers()

    def send_json(self, payload: Any, status: int = 200) -> None:
        self.set_status(status)
        self.finish(json.dumps(payload, ensure_ascii=False, separators=(",", ":"), default=str))

    def _handle_request_exception(self, e: BaseException) -> None:
        if isinstance(e, errors.ChatdError):
            # An expected, client-facing error: no traceback in the log.
            if self._finished:
                return
            self._render_error(e)
            return
        super()._handle_request_exception(e)

    def _allow(self, status: int) -> None:
        """A 405 lists the methods the resource supports (RFC 9110 §15.5.6: Allow is required)."""
        if status == 405:
            self.set_header("Allow", ", ".join([*allowed_methods(type(self)), "OPTIONS"]))

    def _render_error(self, err: errors.ChatdError) -> None:
        self.clear()
        self.set_status(err.http_status)
        self._allow(err.http_status)
        if err.retry_after_ms is not None:
            self.set_header("Retry-After", str(max(1, -(-err.retry_after_ms // 1000))))
        self.finish(json.dumps({"error": err.to_dict()}, ensure_ascii=False, separators=(",", ":")))

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        # Reached for tornado.web.HTTPError and unexpected exceptions.
        cls = _HTTP_CODES.get(status_code, errors.Internal)
        err = cls()
        exc_info = kwargs.get("exc_info")
        if (
            exc_info
            and isinstance(exc_info[1], tornado.web.HTTPError)
            and exc_info[1].log_message
            and status_code < 500
        ):
            err = cls(exc_info[1].log_message)
        self._allow(status_code)
        self.set_header("Content-Type", "application/json; charset=utf-8")
        self.finish(json.dumps({"error": err.to_dict()}, ensure_ascii=False, separators=(",", ":")))


class NotFoundHandler(BaseHandler):
    def prepare(self) -> None:
        raise errors.NotFound("no such route")


class MetricsHandler(BaseHandler):
    """Prometheus exposition of every worker's metrics (restrict it at the proxy)."""

    @op(
        summary="Prometheus metrics of every worker",
        tag="health",
        auth=False,
        content_type="text/plain",
        responses={200: ("Prometheus text format", {"type": "string"})},
    )
    def get(self) -> None:
        body, content_type = metrics.render()
        self.set_header("Content-Type", content_type)
        self.finish(body)


class LiveHandler(BaseHandler):
    """The process is up and its loop answers."""

    @op(
        summary="Liveness",
        tag="health",
        auth=False,
        responses={200: ("Alive", obj({"status": {"const": "ok"}, "worker": {"type": "integer"}}))},
    )
    def get(self) -> None:
        self.send_json({"status": "ok", "worker": self.state.worker_id})


class ReadyHandler(BaseHandler):
    """Postgres and Redis answer within ``health_timeout_s``, the pub/sub connection is live and every
    background task runs; 503 otherwise."""

    def initialize(  # type: ignore[override]
        self, state: ServerState, settings: Settings, db: Database, kv: KV, pubsub: FanoutSubscriber
    ) -> None:
        super().initialize(state, settings)
        self.db = db
        self.kv = kv
        self.pubsub = pubsub

    @op(
        summary="Readiness: Postgres, Redis, the pub/sub connection and every background task",
        tag="health",
        auth=False,
        responses={
            200: ("Ready", {"type": "object", "required": ["status", "worker", "checks"]}),
            503: ("Not ready", {"type": "object", "required": ["status", "worker", "checks"]}),
        },
    )
    async def get(self) -> None:
        checks = await check_dependencies(self.db, self.kv, self.pubsub, self.config.storage.health_timeout_s)
        down = sorted(self.state.tasks.down)
        checks["tasks"] = {"ok": not down, **({"error": f"restarting: {', '.join(down)}"} if down else {})}
        ready = all(c["ok"] for c in checks.values()) and not self.state.draining
        body = {
            "status": "ready" if ready else ("draining" if self.state.draining else "not_ready"),
            "worker": self.state.worker_id,
            "checks": checks,
        }
        self.send_json(body, 200 if ready else 503)


class RequestLimits(httputil.HTTPServerConnectionDelegate):
    """Caps every request before anything is buffered, wrapping the application for the HTTPServer.

    A head over ``max_header_bytes`` gets 431 and a body over ``max_body_bytes``
    (announced by Content-Length, or counted while a chunked body arrives) gets
    413, both in the JSON error shape.  The rest of a refused body is read and
    discarded, not kept, so the client finishes writing and reads the answer;
    the HTTPServer's ``body_timeout`` bounds how long that may take.
    """

    def __init__(
        self,
        app: httputil.HTTPServerConnectionDelegate,
        settings: ServerSettings,
        streamed: Sequence[re.Pattern[str]] = (),
    ) -> None:
        self.app = app
        self.max_body_bytes = settings.max_body_bytes
        self.max_header_bytes = settings.max_header_bytes
        # Paths whose handler streams the body and enforces a cap of its own (file uploads): not counted here.
        self.streamed = tuple(streamed)

    @staticmethod
    def server_options(settings: ServerSettings) -> dict[str, Any]:
        """The HTTPServer's own limits: a body deadline, and caps high enough that only ours answer."""
        return {
            "body_timeout": settings.body_timeout_s,
            "max_body_size": _UNLIMITED,  # Tornado's cap answers a bare 400: ours counts and answers 413
            "max_header_size": settings.max_header_bytes * 4,  # past this Tornado drops the connection unread
        }

    def start_request(self, server_conn: object, request_conn: httputil.HTTPConnection) -> httputil.HTTPMessageDelegate:
        return _LimitedRequest(self, self.app.start_request(server_conn, request_conn), request_conn)

    def on_close(self, server_conn: object) -> None:
        self.app.on_close(server_conn)


_UNLIMITED = 1 << 62  # a refused body is read to its end (and dropped) within body_timeout


class _LimitedRequest(httputil.HTTPMessageDelegate):
    def __init__(
        self, limits: RequestLimits, inner: httputil.HTTPMessageDelegate, conn: httputil.HTTPConnection
    ) -> None:
        self.limits = limits
        self.inner = inner
        self.conn = conn
        self.refused: errors.ChatdError | None = None
        self.inner_started = False
        self.body_bytes = 0
        self.path = ""
        self.streamed = False

    def headers_received(
        self, start_line: httputil.RequestStartLine | httputil.ResponseStartLine, headers: httputil.HTTPHeaders
    ) -> Awaitable[None] | None:
        assert isinstance(start_line, httputil.RequestStartLine)
        self.path = start_line.path
        head = (
            len(start_line.method) + len(start_line.path) + 12 + sum(len(k) + len(v) + 4 for k, v in headers.get_all())
        )
        if head > self.limits.max_header_bytes:
            self._refuse(errors.HeadersTooLarge(f"request head over {self.limits.max_header_bytes} bytes"))
            return None
        if any(p.match(self.path.split("?", 1)[0]) for p in self.limits.streamed):
            self.streamed = True
            self.inner_started = True
            return self.inner.headers_received(start_line, headers)
        length = headers.get("Content-Length", "")
        if length.isdigit() and int(length) > self.limits.max_body_bytes:
            self._refuse(errors.TooLarge(f"request body over {self.limits.max_body_bytes} bytes"))
            return None
        self.inner_started = True
        return self.inner.headers_received(start_line, headers)

    def data_received(self, chunk: bytes) -> Awaitable[None] | None:
        if self.refused is not None:
            return None  # discarded
        if self.streamed:
            return self.inner.data_received(chunk)
        self.body_bytes += len(chunk)
        if self.body_bytes > self.limits.max_body_bytes:  # chunked: no Content-Length to refuse at the head
            self._refuse(errors.TooLarge(f"request body over {self.limits.max_body_bytes} bytes"))
            self.inner.on_connection_close()  # the handler never runs; its buffered chunks are dropped
            self.inner_started = False
            return None
        return self.inner.data_received(chunk)

    def finish(self) -> None:
        if self.refused is None:
            self.inner.finish()
            return
        err = self.refused
        body = json.dumps({"error": err.to_dict()}, separators=(",", ":")).encode()
        headers = httputil.HTTPHeaders(
            {
                "Content-Type": "application/json; charset=utf-8",
                "Content-Length": str(len(body)),
                "Cache-Control": "no-store",
            }
        )
        self.conn.write_headers(
            httputil.ResponseStartLine("HTTP/1.1", err.http_status, err.default_message), headers, body
        )
        self.conn.finish()
        metrics.http_requests.labels("RequestLimits", str(err.http_status)).inc()
        access_log.info("http_refused", extra=fields(status=err.http_status, path=self.path[:200], reason=err.message))

    def on_connection_close(self) -> None:
        if self.inner_started:
            self.inner.on_connection_close()

    def _refuse(self, err: errors.ChatdError) -> None:
        self.refused = err
        if isinstance(self.conn, HTTP1Connection):
            self.conn.set_max_body_size(_UNLIMITED)


def log_request(handler: tornado.web.RequestHandler) -> None:
    """The access log: method, route, status, duration; the URI is redacted by the formatter."""
    request = handler.request
    status = handler.get_status()
    route = type(handler).__name__
    metrics.http_requests.labels(route, str(status)).inc()
    metrics.http_duration.labels(route).observe(request.request_time())
    level = access_log.warning if status >= 500 else access_log.info
    level(
        "http_request",
        extra=fields(
            method=request.method,
            path=request.uri,
            route=route,
            status=status,
            duration_ms=round(request.request_time() * 1000, 2),
            remote_ip=request.remote_ip,
        ),
    )
