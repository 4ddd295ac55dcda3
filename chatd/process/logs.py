"""Logging: a few named loggers, one JSON event per line (or a text line on a terminal), secrets redacted.

Loggers: ``chatd.server`` (process tree), ``chatd.access`` (one line per
HTTP request), ``chatd.app`` (handlers, fan-out, storage), ``chatd.assistant``.
Fields are passed as ``extra={"fields": {...}}`` and become top-level keys.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import time
from typing import Any, TextIO

server_log = logging.getLogger("chatd.server")
access_log = logging.getLogger("chatd.access")
app_log = logging.getLogger("chatd.app")
assistant_log = logging.getLogger("chatd.assistant")

# Query-string secrets: browsers must pass the WebSocket token in the URL.
_SECRET_QS = re.compile(r"((?:^|[?&;\s])(?:access_token|refresh_token|token)=)[^&;\s\"']*", re.IGNORECASE)
_BEARER = re.compile(r"(Bearer\s+)[A-Za-z0-9._~+/=-]+", re.IGNORECASE)

_worker_label = "master"


def set_worker(label: str) -> None:
    """Name the process in every log line (``master``, ``w0``, ``w1``...)."""
    global _worker_label
    _worker_label = label


def redact(text: str) -> str:
    return _BEARER.sub(r"\1[redacted]", _SECRET_QS.sub(r"\1[redacted]", text))


def _redact_value(value: Any) -> Any:
    if isinstance(value, str):
        return redact(value)
    return value


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        event: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "worker": _worker_label,
            "pid": record.process,
            "event": redact(record.getMessage()),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            for key, value in fields.items():
                event.setdefault(key, _redact_value(value))
        if record.exc_info:
            event["exc"] = redact(self.formatException(record.exc_info))
        return json.dumps(event, ensure_ascii=False, default=str)


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        fields = getattr(record, "fields", None)
        extra = " ".join(f"{k}={v}" for k, v in fields.items()) if isinstance(fields, dict) else ""
        head = f"{time.strftime('%H:%M:%S')} {record.levelname[0]} [{_worker_label}] {record.name}"
        line = f"{head}: {record.getMessage()} {extra}"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return redact(line.rstrip())


def resolve_format(fmt: str, stream: TextIO) -> str:
    """``auto``: text for a person at a terminal, JSON for everything else (systemd, Docker, files, pipes)."""
    if fmt != "auto":
        return fmt
    try:
        return "text" if stream.isatty() else "json"
    except (AttributeError, ValueError):  # closed or not a file
        return "json"


_plain: TextIO | None = None  # text logs: where sentences for a person go too


def setup(level: str = "info", fmt: str = "auto", access: bool = True, stream: TextIO | None = None) -> None:
    """Log to ``stream`` (stderr) in ``fmt``: json, text, or auto (text when ``stream`` is a terminal)."""
    global _plain
    stream = sys.stderr if stream is None else stream
    handler = logging.StreamHandler(stream)
    text = resolve_format(fmt, stream) == "text"
    handler.setFormatter(TextFormatter() if text else JsonFormatter())
    _plain = stream if text else None
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    access_log.disabled = not access
    # Tornado's own access log would duplicate ours (and not redact).
    logging.getLogger("tornado.access").disabled = True
    for noisy in ("httpx", "httpcore", "anthropic", "asyncio"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
    os.environ.setdefault("PYTHONUNBUFFERED", "1")


def ready(url: str) -> None:
    """Every worker serves: where to open the app and how to stop it, in plain words on a terminal."""
    if _plain is None:
        server_log.info("chatd_ready", extra=fields(url=url))
        return
    _plain.write(f"\nchatd is running: open {url} in your browser.\nStop it with Ctrl-C.\n\n")
    _plain.flush()


def fields(**kwargs: Any) -> dict[str, Any]:
    """Shorthand: ``log.info("event", extra=fields(room_id=1))``."""
    return {"fields": kwargs}
