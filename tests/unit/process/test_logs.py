from __future__ import annotations

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
