from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

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


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    logs._plain = None


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
    stream = _Stream(tty)
    logs.setup("info", fmt, stream=stream)
    logs.server_log.info("chatd_listening", extra=logs.fields(port=8080))
    line = stream.getvalue().strip()
    if json_lines:
        assert json.loads(line)["event"] == "chatd_listening"
    else:
        assert not line.startswith("{") and "chatd_listening port=8080" in line


def test_default_format_is_auto() -> None:
    from chatd.process.config import LogSettings

    assert LogSettings().format == "auto"


@pytest.mark.parametrize("tty", [True, False])
def test_ready_says_where_to_open_the_app_in_plain_words_on_a_terminal(tty: bool) -> None:
    stream = _Stream(tty)
    logs.setup("info", "auto", stream=stream)
    logs.ready("http://127.0.0.1:8080/")
    out = stream.getvalue()
    if tty:
        assert "chatd is running: open http://127.0.0.1:8080/ in your browser.\nStop it with Ctrl-C.\n" in out
    else:
        event = json.loads(out)
        assert event["event"] == "chatd_ready" and event["url"] == "http://127.0.0.1:8080/"


@pytest.mark.parametrize(
    ("host", "url"),
    [
        ("127.0.0.1", "http://127.0.0.1:8080/"),
        ("0.0.0.0", "http://127.0.0.1:8080/"),
        ("::", "http://[::1]:8080/"),
        ("chat.internal", "http://chat.internal:8080/"),
    ],
)
def test_app_url(host: str, url: str) -> None:
    from chatd.process.config import Settings, replace
    from chatd.process.server import app_url

    assert app_url(replace(Settings(), "server", host=host), []) == url
