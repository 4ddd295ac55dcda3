from __future__ import annotations

import io
import json
import logging

import pytest

from chatd.process import logs


@pytest.mark.parametrize(
    ("raw", "hidden"),
    [
        ("GET /ws?access_token=eyJhbGciOi.abc.def HTTP/1.1", "eyJhbGciOi.abc.def"),
        ("/ws?room=1&token=sekrit&x=2", "sekrit"),
        ("refresh_token=r3fr3sh", "r3fr3sh"),
        ("Authorization: Bearer abc.def.ghi", "abc.def.ghi"),
    ],
)
def test_redact(raw: str, hidden: str) -> None:
    out = logs.redact(raw)
    assert hidden not in out
    assert "[redacted]" in out


def test_json_line_has_fields_and_redacts() -> None:
    record = logging.LogRecord("chatd.access", logging.INFO, __file__, 1, "http_request", None, None)
    record.fields = {"path": "/ws?access_token=SECRET123", "status": 101}
    line = logs.JsonFormatter().format(record)
    event = json.loads(line)
    assert event["event"] == "http_request"
    assert event["status"] == 101
    assert event["level"] == "info" and event["logger"] == "chatd.access"
    assert "SECRET123" not in line


class _Stream(io.StringIO):
    def __init__(self, tty: bool) -> None:
        super().__init__()
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty


@pytest.mark.parametrize(
    ("fmt", "tty", "json_lines"),
    [("auto", True, False), ("auto", False, True), ("json", True, True), ("text", False, False)],
)
def test_auto_format_is_text_on_a_terminal_and_json_elsewhere(fmt: str, tty: bool, json_lines: bool) -> None:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    stream = _Stream(tty)
    try:
        logs.setup("info", fmt, stream=stream)
        logs.server_log.info("chatd_listening", extra=logs.fields(port=8080))
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
    line = stream.getvalue().strip()
    if json_lines:
        assert json.loads(line)["event"] == "chatd_listening"
    else:
        assert not line.startswith("{") and "chatd_listening port=8080" in line


def test_default_format_is_auto() -> None:
    from chatd.process.config import LogSettings

    assert LogSettings().format == "auto"
