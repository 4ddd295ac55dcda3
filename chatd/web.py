"""HTTP plumbing shared by every REST handler: JSON in, JSON out, one error shape.

Handlers raise ``ChatdError`` subclasses; ``write_error`` renders them as
``{"error": {"code", "message"}}`` with the class's status.  Anything else is
logged with its traceback and the client sees only ``internal``.
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlparse

import tornado.httputil
import tornado.routing
import tornado.web

from chatd import errors, metrics
from chatd.config import Settings
from chatd.health import check_dependencies
from chatd.kv import KV
from chatd.logs import access_log, fields
from chatd.openapi import obj, op
from chatd.state import ServerState
from chatd.store import Database

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

    def json_body(self) -> dict[str, Any]:
        try:
            body = json.loads(self.request.body or b"null")
        except (ValueError, UnicodeDecodeError):
            raise errors.BadRequest("request body is not valid JSON") from None
        if not isinstance(body, dict):
            raise errors.BadRequest("request body must be a JSON object")
        return body

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

    def _render_error(self, err: errors.ChatdError) -> None:
        self.clear()
        self.set_status(err.http_status)
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
    """Postgres and Redis answer within ``health_timeout_s`` and every background task runs; 503 otherwise."""

    def initialize(self, state: ServerState, settings: Settings, db: Database, kv: KV) -> None:  # type: ignore[override]
        super().initialize(state, settings)
        self.db = db
        self.kv = kv

    @op(
        summary="Readiness: Postgres, Redis and every background task",
        tag="health",
        auth=False,
        responses={
            200: ("Ready", {"type": "object", "required": ["status", "worker", "checks"]}),
            503: ("Not ready", {"type": "object", "required": ["status", "worker", "checks"]}),
        },
    )
    async def get(self) -> None:
        checks = await check_dependencies(self.db, self.kv, self.config.storage.health_timeout_s)
        down = sorted(self.state.tasks.down)
        checks["tasks"] = {"ok": not down, **({"error": f"restarting: {', '.join(down)}"} if down else {})}
        ready = all(c["ok"] for c in checks.values()) and not self.state.draining
        body = {
            "status": "ready" if ready else ("draining" if self.state.draining else "not_ready"),
            "worker": self.state.worker_id,
            "checks": checks,
        }
        self.send_json(body, 200 if ready else 503)


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
