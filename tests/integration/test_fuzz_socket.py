"""Property-based fuzzing of the socket protocol against a live worker (hypothesis).

Each example opens a socket, sends a handful of generated frames (well-formed
or not: wrong types, huge numbers, deep nesting, invalid UTF-8, binary frames,
floods), then a ping.  Whatever was sent, the server answers with documented
frames (``error`` codes from chatd/core/errors.py) and either the pong or a
documented close code, within a bound; it never crashes, stalls or logs a
traceback.

The REST side is to be fuzzed the same way with schemathesis against
``/api/v1/openapi.json`` once that document exists (issue 11, not merged yet):
see docs/RELIABILITY.md.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import pytest
import websocket
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chatd.core.errors import ERROR_CODES
from tests.chat import make_room
from tests.conftest import Services
from tests.support import Chatd, http_get
from tests.users import make_users

pytestmark = pytest.mark.reliability

EXAMPLES = 300
CLOSE_CODES = {1002, 1003, 1007, 1008, 1009}  # what a client can earn by sending garbage (PROTOCOL.md §6)
SERVER_TYPES = {
    "hello", "error", "ack", "joined", "left", "message", "message_updated", "message_deleted", "typing",
    "presence", "read", "pong", "authenticated", "token_expiring", "resync_required", "queued",
    "stream_start", "stream_chunk", "stream_end", "reacted",
}  # fmt: skip
CLIENT_TYPES = [
    "join",
    "leave",
    "send",
    "typing",
    "read",
    "edit",
    "delete",
    "react",
    "ping",
    "auth",
    "cancel",
    "regenerate",
]

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=40),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
FIELDS = [
    "room_id",
    "since_seq",
    "content",
    "client_msg_id",
    "is_typing",
    "seq",
    "message_id",
    "token",
    "emoji",
    "add",
    "id",
]


def frames_for(room: int) -> st.SearchStrategy[list[tuple[str, Any]]]:
    """Lists of ("text", str) / ("bytes-as-text", bytes) / ("binary", bytes) frames."""
    ids = st.sampled_from([room, 0, -1, 2**53, 2**64, room + 10_000]) | json_values
    plausible = st.builds(
        lambda t, fields: {"type": t, **fields},
        st.sampled_from(CLIENT_TYPES) | st.text(max_size=12),
        st.dictionaries(st.sampled_from(FIELDS), ids | json_values, max_size=5),
    ).map(lambda obj: ("text", json.dumps(obj)))
    garbage = st.one_of(
        json_values.map(lambda v: ("text", json.dumps(v))),  # valid JSON, not an object
        st.text(max_size=60).map(lambda s: ("text", s)),  # mostly not JSON
        st.binary(max_size=60).map(lambda b: ("bytes-as-text", b)),  # often invalid UTF-8
        st.binary(max_size=60).map(lambda b: ("binary", b)),
        st.integers(min_value=100, max_value=5000).map(lambda n: ("text", "[" * n + "]" * n)),  # deep nesting
        st.just(("text", '{"type": "ping", "x": "\\ud800"}')),  # a lone surrogate escape
        st.just(("text", json.dumps({"type": "send", "room_id": room, "content": "a\ud800", "client_msg_id": "s1"}))),
        st.just(("text", json.dumps({"type": "edit", "message_id": 1, "content": "\udfff"}))),
        st.just(("text", "x" * 70_000)),  # over ws.max_frame_bytes
    )
    flood = st.tuples(plausible, st.integers(min_value=50, max_value=400)).map(lambda fn: [fn[0]] * fn[1])
    return st.one_of(st.lists(st.one_of(plausible, garbage), min_size=1, max_size=8), flood)


def _exchange(url: str, token: str, frames: list[tuple[str, Any]]) -> tuple[list[dict[str, Any]], int | None]:
    """Send the frames and a final ping; read until the pong or the close. (frames received, close code)"""
    conn = websocket.create_connection(url, header=[f"Authorization: Bearer {token}"], timeout=15)
    got: list[dict[str, Any]] = []
    try:
        try:
            for kind, data in frames:
                if kind == "binary":
                    conn.send_binary(data)
                elif kind == "bytes-as-text":
                    conn.send(data, opcode=websocket.ABNF.OPCODE_TEXT)
                else:
                    conn.send(data)
            conn.send(json.dumps({"type": "ping", "id": "fuzz-end"}))
        except (OSError, websocket.WebSocketException):
            pass  # closed mid-way: the close frame is still read below
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            try:
                opcode, data = conn.recv_data(control_frame=True)
            except websocket.WebSocketTimeoutException as exc:
                raise AssertionError(f"stalled: no pong and no close; got {got[-3:]}") from exc
            except (OSError, websocket.WebSocketException):
                return got, None  # dropped without a close frame
            if opcode == websocket.ABNF.OPCODE_CLOSE:
                return got, int.from_bytes(data[:2], "big") if len(data) >= 2 else None
            if opcode == websocket.ABNF.OPCODE_TEXT:
                frame = json.loads(data)
                got.append(frame)
                if frame.get("reply_to") == "fuzz-end":  # the pong, or rate_limited after a flood of pings
                    return got, None
        raise AssertionError(f"stalled for 15 s; got {got[-3:]}")
    finally:
        conn.close()


async def test_fuzzed_frames_get_documented_answers(chatd_factory: Any, services: Services) -> None:
    server: Chatd = chatd_factory(CHATD_WS_SEND_RATE_COUNT="100000")
    (user,) = make_users(services.database_url, 1)
    room = await make_room(server, user, [])
    assert server.proc is not None
    pid = server.proc.pid
    seen: dict[str, int] = {}

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(frames_for(room))
    def fuzz(frames: list[tuple[str, Any]]) -> None:
        got, code = _exchange(server.ws, user.token, frames)
        assert got and got[0]["type"] == "hello", got[:2]
        for frame in got:
            assert frame.get("type") in SERVER_TYPES, frame
            if frame["type"] == "error":
                assert frame["code"] in ERROR_CODES and frame["code"] != "internal", frame
                seen[frame["code"]] = seen.get(frame["code"], 0) + 1
        last = got[-1]
        answered = last.get("reply_to") == "fuzz-end" and (last["type"] == "pong" or last.get("code") == "rate_limited")
        assert answered or code in CLOSE_CODES, f"close {code} after {frames[:3]}"
        if code is not None:
            seen[f"close {code}"] = seen.get(f"close {code}", 0) + 1

    await asyncio.to_thread(fuzz)
    print(f"fuzz: {EXAMPLES} examples; answers {dict(sorted(seen.items()))}")
    status, _ = http_get(server.http + "/health/live")
    assert status == 200 and server.proc.poll() is None and server.proc.pid == pid
    log = server.log()
    assert "Traceback" not in log and '"level": "error"' not in log, [
        line for line in log.splitlines() if "Traceback" in line or '"level": "error"' in line
    ][:3]
