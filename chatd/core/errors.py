"""The one error tree of chatd.

Every failure a client can see is a ``ChatdError`` subclass.  Each class fixes
three things in one place: the wire ``code`` (REST body and socket ``error``
frame), the HTTP status, and, for protocol violations, the WebSocket close
code.  Handlers raise these; the REST and socket layers render them.  What the
client reads is ``message``; anything else worth knowing goes to the log.
"""

from __future__ import annotations

import enum
from typing import Any, ClassVar


class CloseCode(enum.IntEnum):
    """WebSocket close codes chatd sends (RFC 6455 section 7.4 + private 4xxx)."""

    NORMAL = 1000
    GOING_AWAY = 1001  # server shutting down
    PROTOCOL_ERROR = 1002  # RFC 6455 violation: unmasked frame, invalid close code, reserved bits...
    UNSUPPORTED_DATA = 1003  # binary frame
    INVALID_PAYLOAD = 1007  # invalid JSON / UTF-8, after repeated strikes
    POLICY_VIOLATION = 1008  # banned user, policy
    MESSAGE_TOO_BIG = 1009  # frame over max_frame_bytes
    INTERNAL_ERROR = 1011
    TRY_AGAIN_LATER = 1013  # overloaded / slow consumer
    AUTH_EXPIRED = 4001  # token expired or revoked (logout)
    TOO_MANY_CONNECTIONS = 4029  # per-user connection cap


class ChatdError(Exception):
    """Base of every client-visible error."""

    code: ClassVar[str] = "internal"
    http_status: ClassVar[int] = 500
    default_message: ClassVar[str] = "internal error"

    def __init__(
        self,
        message: str | None = None,
        *,
        retry_after_ms: int | None = None,
        details: dict[str, Any] | None = None,
    ) -> None:
        self.message = message or self.default_message
        self.retry_after_ms = retry_after_ms
        self.details = details
        super().__init__(self.message)

    def to_dict(self) -> dict[str, Any]:
        """The error object as clients see it (REST ``error`` member, socket frame body)."""
        out: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.retry_after_ms is not None:
            out["retry_after_ms"] = self.retry_after_ms
        if self.details:
            out["details"] = self.details
        return out


class BadRequest(ChatdError):
    code = "bad_request"
    http_status = 400
    default_message = "bad request"


class Unauthorized(ChatdError):
    code = "unauthorized"
    http_status = 401
    default_message = "authentication required"


class Forbidden(ChatdError):
    code = "forbidden"
    http_status = 403
    default_message = "forbidden"


class NotFound(ChatdError):
    code = "not_found"
    http_status = 404
    default_message = "not found"


class UnknownAssistant(NotFound):
    """A room picks an assistant the server does not offer (none by that id, or retired)."""

    code = "unknown_assistant"
    default_message = "no such assistant on this server"


class MethodNotAllowed(ChatdError):
    code = "method_not_allowed"
    http_status = 405
    default_message = "method not allowed"


class Conflict(ChatdError):
    code = "conflict"
    http_status = 409
    default_message = "conflict"


class TooLarge(ChatdError):
    code = "too_large"
    http_status = 413
    default_message = "too large"


class UnsupportedType(ChatdError):
    code = "unsupported_type"
    http_status = 415
    default_message = "unsupported content type"


class ContentBlocked(ChatdError):
    """A content rule with action block matched the message (send or edit): nothing is stored, no seq used."""

    code = "content_blocked"
    http_status = 422
    default_message = "the message matches a blocked content rule"


class RangeNotSatisfiable(ChatdError):
    code = "range_not_satisfiable"
    http_status = 416
    default_message = "range not satisfiable"


class HeadersTooLarge(ChatdError):
    code = "headers_too_large"
    http_status = 431
    default_message = "request headers too large"


class RateLimited(ChatdError):
    code = "rate_limited"
    http_status = 429
    default_message = "rate limited"


class QuotaExceeded(ChatdError):
    code = "quota_exceeded"
    http_status = 429
    default_message = "daily token quota exceeded"


class Busy(ChatdError):
    code = "busy"
    http_status = 503
    default_message = "server busy, try again later"


class Unavailable(ChatdError):
    code = "unavailable"
    http_status = 503
    default_message = "a backing service is unavailable, try again"


class LLMUnavailable(ChatdError):
    code = "llm_unavailable"
    http_status = 502
    default_message = "the language model provider is unavailable"


class Internal(ChatdError):
    code = "internal"
    http_status = 500
    default_message = "internal error"


class ProtocolViolation(ChatdError):
    """A socket frame so wrong that the connection is closed with ``close_code``."""

    code = "bad_request"
    http_status = 400
    default_message = "protocol violation"

    def __init__(self, message: str, close_code: CloseCode) -> None:
        super().__init__(message)
        self.close_code = close_code


class ConfigError(Exception):
    """Invalid configuration: raised at start, never inside a handler."""

    def __init__(self, key: str, problem: str) -> None:
        self.key = key
        self.problem = problem
        super().__init__(f"config error: {key}: {problem}")


ERROR_CODES: tuple[str, ...] = tuple(
    sorted(
        {
            cls.code
            for cls in (
                BadRequest,
                Unauthorized,
                Forbidden,
                NotFound,
                MethodNotAllowed,
                Conflict,
                TooLarge,
                UnsupportedType,
                ContentBlocked,
                RangeNotSatisfiable,
                HeadersTooLarge,
                RateLimited,
                QuotaExceeded,
                Busy,
                Unavailable,
                LLMUnavailable,
                Internal,
            )
        }
    )
)
