"""server_frames: the exact output of every builder, encode, and stored rows as frames."""

from __future__ import annotations

import inspect
import json
from typing import Any

import pytest

from chatd.core import client_frames, server_frames
from chatd.core.errors import BadRequest, RateLimited

MISSING = object()  # marks "delete this member" in the tables below
MAX = client_frames.MAX_SAFE_INT
UUID = "3f2b8c1e-9d4a-4e6f-8b7a-1c2d3e4f5a6b"

def dumps(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False)


# --------------------------------------------------------------------------
# encode
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("frame", "expected"),
    [
        ({"type": "x", "reply_to": None, "a": 1}, '{"type":"x","a":1}'),
        ({"a": [1, 2], "b": {"c": "d"}}, '{"a":[1,2],"b":{"c":"d"}}'),
        ({"deleted": False, "seq": 0, "s": ""}, '{"deleted":false,"seq":0,"s":""}'),
        ({"usage": {"n": None}}, '{"usage":{"n":null}}'),  # only top-level None is dropped
        ({"content": "안녕하세요"}, '{"content":"안녕하세요"}'),
        ({"content": 'é\n"q"'}, '{"content":"é\\n\\"q\\""}'),
    ],
)
def test_encode(frame: dict[str, Any], expected: str) -> None:
    assert server_frames.encode(frame) == expected
    assert server_frames.encode_bytes(frame) == expected.encode("utf-8")


def test_encode_keeps_korean_unescaped_and_is_compact() -> None:
    text = server_frames.encode(server_frames.typing(room_id=1, user_id=2, is_typing=True) | {"content": "안녕하세요"})
    assert "안녕하세요" in text
    assert "\\u" not in text
    assert " " not in text


def test_encode_refuses_nan() -> None:
    with pytest.raises(ValueError):
        server_frames.encode({"x": float("nan")})


# --------------------------------------------------------------------------
# Server frame builders: exact output
# --------------------------------------------------------------------------

BUILDER_CASES: list[tuple[str, dict[str, Any], dict[str, Any]]] = [
    (
        "hello",
        server_frames.hello(
            user_id=1,
            connection_id="c-1",
            server_time_ms=1700000000000,
            heartbeat_ms=25000,
            limits={"send": {"count": 20, "window_ms": 10000}, "typing": {"per_s": 3.0, "burst": 10}},
        ),
        {
            "type": "hello",
            "user_id": 1,
            "connection_id": "c-1",
            "server_time": 1700000000000,
            "heartbeat_ms": 25000,
            "protocol": 1,
            "limits": {"send": {"count": 20, "window_ms": 10000}, "typing": {"per_s": 3.0, "burst": 10}},
        },
    ),
    (
        "token_expiring",
        server_frames.token_expiring(expires_in_ms=60000),
        {"type": "token_expiring", "expires_in_ms": 60000},
    ),
    (
        "authenticated",
        server_frames.authenticated(expires_at_ms=1700000900000, reply_to="a1"),
        {"type": "authenticated", "expires_at_ms": 1700000900000, "reply_to": "a1"},
    ),
    (
        "joined",
        server_frames.joined(room_id=5, last_seq=41, epoch="e1", online=[1, 2], reply_to=3, edit_rev=8),
        {
            "type": "joined",
            "room_id": 5,
            "last_seq": 41,
            "epoch": "e1",
            "edit_rev": 8,
            "online": [1, 2],
            "reply_to": 3,
        },
    ),
    (
        "left",
        server_frames.left(room_id=5, reply_to=None),
        {"type": "left", "room_id": 5, "reply_to": None},
    ),
    (
        "resync_required",
        server_frames.resync_required(room_id=5, last_seq=9000, epoch="e1", reply_to="j"),
        {"type": "resync_required", "room_id": 5, "last_seq": 9000, "epoch": "e1", "reply_to": "j"},
    ),
    (
        "ack",
        server_frames.ack(
            room_id=5,
            client_msg_id=UUID,
            message_id=77,
            seq=42,
            created_at="2026-01-02T03:04:05.678Z",
            reply_to="s1",
            duplicate=True,
        ),
        {
            "type": "ack",
            "room_id": 5,
            "client_msg_id": UUID,
            "message_id": 77,
            "seq": 42,
            "created_at": "2026-01-02T03:04:05.678Z",
            "reply_to": "s1",
            "duplicate": True,
        },
    ),
    (
        "message",
        server_frames.message(
            room_id=5,
            message_id=77,
            seq=42,
            sender_id=None,
            role="assistant",
            kind="text",
            content="안녕하세요",
            client_msg_id=None,
            created_at="2026-01-02T03:04:05.678Z",
        ),
        {
            "type": "message",
            "room_id": 5,
            "message_id": 77,
            "seq": 42,
            "sender_id": None,
            "role": "assistant",
            "kind": "text",
            "content": "안녕하세요",
            "client_msg_id": None,
            "created_at": "2026-01-02T03:04:05.678Z",
            "edited_at": None,
            "deleted": False,
        },
    ),
    (
        "message_updated",
        server_frames.message_updated(room_id=5, message_id=77, seq=43, content="new", edited_at="t2", rev=6),
        {
            "type": "message_updated",
            "room_id": 5,
            "message_id": 77,
            "seq": 43,
            "content": "new",
            "edited_at": "t2",
            "reactions": [],
            "rev": 6,
        },
    ),
    (
        "message_deleted",
        server_frames.message_deleted(room_id=5, message_id=77, seq=44, rev=7),
        {"type": "message_deleted", "room_id": 5, "message_id": 77, "seq": 44, "rev": 7},
    ),
    (
        "reacted",
        server_frames.reacted(room_id=5, message_id=77, emoji="👍", add=True, changed=False, reply_to="r1"),
        {
            "type": "reacted",
            "room_id": 5,
            "message_id": 77,
            "emoji": "👍",
            "add": True,
            "changed": False,
            "reply_to": "r1",
        },
    ),
    (
        "typing",
        server_frames.typing(room_id=5, user_id=2, is_typing=False),
        {"type": "typing", "room_id": 5, "user_id": 2, "is_typing": False},
    ),
    (
        "read",
        server_frames.read(room_id=5, user_id=2, seq=44, mention_count=1),
        {"type": "read", "room_id": 5, "user_id": 2, "seq": 44, "mention_count": 1},
    ),
    (
        "receipts",
        server_frames.receipts(room_id=5, seqs={3: 40, 2: 44}),
        {
            "type": "receipts",
            "room_id": 5,
            "receipts": [{"user_id": 2, "read_seq": 44}, {"user_id": 3, "read_seq": 40}],
        },
    ),
    (
        "presence",
        server_frames.presence(room_id=5, online=[3], offline=[2]),
        {"type": "presence", "room_id": 5, "online": [3], "offline": [2]},
    ),
    (
        "pong",
        server_frames.pong(server_time_ms=1700000000123, reply_to=8),
        {"type": "pong", "server_time": 1700000000123, "reply_to": 8},
    ),
    (
        "error",
        server_frames.error(RateLimited("slow down", retry_after_ms=1500), reply_to="s2"),
        {
            "type": "error",
            "code": "rate_limited",
            "message": "slow down",
            "reply_to": "s2",
            "retry_after_ms": 1500,
            "details": None,
        },
    ),
    (
        "queued",
        server_frames.queued(room_id=5, reply_to_message_id=77, position=2),
        {"type": "queued", "room_id": 5, "reply_to_message_id": 77, "position": 2},
    ),
    (
        "stream_start",
        server_frames.stream_start(room_id=5, message_id=78, reply_to_message_id=77, model="m-1"),
        {
            "type": "stream_start",
            "room_id": 5,
            "message_id": 78,
            "reply_to_message_id": 77,
            "model": "m-1",
        },
    ),
    (
        "stream_start",
        server_frames.stream_start(room_id=5, message_id=79, reply_to_message_id=77, model="m-1", supersedes=78),
        {
            "type": "stream_start",
            "room_id": 5,
            "message_id": 79,
            "reply_to_message_id": 77,
            "model": "m-1",
            "resumed": True,
            "supersedes": 78,
        },
    ),
    (
        "cancelled",
        server_frames.cancelled(room_id=5, reply_to_message_id=77),
        {"type": "cancelled", "room_id": 5, "reply_to_message_id": 77},
    ),
    (
        "stream_chunk",
        server_frames.stream_chunk(room_id=5, message_id=78, index=0, content="Hel"),
        {"type": "stream_chunk", "room_id": 5, "message_id": 78, "index": 0, "content": "Hel"},
    ),
    (
        "stream_end",
        server_frames.stream_end(
            room_id=5,
            message_id=78,
            seq=45,
            stop_reason="end_turn",
            input_tokens=120,
            output_tokens=30,
            first_token_ms=350,
            latency_ms=2100,
        ),
        {
            "type": "stream_end",
            "room_id": 5,
            "message_id": 78,
            "seq": 45,
            "stop_reason": "end_turn",
            "usage": {"input_tokens": 120, "output_tokens": 30},
            "first_token_ms": 350,
            "latency_ms": 2100,
        },
    ),
]


@pytest.mark.parametrize(("name", "frame", "expected"), BUILDER_CASES, ids=[case[0] for case in BUILDER_CASES])
def test_builder_output(name: str, frame: dict[str, Any], expected: dict[str, Any]) -> None:
    assert frame == expected
    assert frame["type"] == name
    assert next(iter(frame)) == "type"  # "type" leads on the wire, for humans reading logs
    assert json.loads(server_frames.encode(frame)) == {k: v for k, v in expected.items() if v is not None}


def test_every_server_builder_is_tested() -> None:
    builders = {
        "hello", "token_expiring", "authenticated", "joined", "left", "resync_required",
        "ack", "message", "message_updated", "message_deleted", "typing", "read",
        "receipts", "reacted", "presence", "pong", "error", "queued", "cancelled", "stream_start", "stream_chunk",
        "stream_end",
    }  # fmt: skip
    assert {case[0] for case in BUILDER_CASES} == builders
    public = {
        name
        for name, value in vars(server_frames).items()
        if inspect.isfunction(value) and value.__module__ == server_frames.__name__ and not name.startswith("_")
    }
    # Covered elsewhere: serializers, row readers (below) and the room/announcement builders (integration tests).
    others = {
        "encode", "encode_bytes", "iso", "room_object", "message_from_row", "change_from_row",
        "stream_end_from_row", "room_added", "room_removed", "room_updated", "announcement",
    }  # fmt: skip
    assert public - others == builders


@pytest.mark.parametrize(
    ("frame", "wire"),
    [
        (
            server_frames.message(
                room_id=5, message_id=77, seq=42, sender_id=None, role="system", kind="system",
                content="방에 입장했습니다", client_msg_id=None, created_at="t",
            ),
            '{"type":"message","room_id":5,"message_id":77,"seq":42,"role":"system",'
            '"kind":"system","content":"방에 입장했습니다","created_at":"t","deleted":false}',
        ),
        (
            server_frames.error(BadRequest("join.room_id must be a positive integer"), reply_to=None),
            '{"type":"error","code":"bad_request","message":"join.room_id must be a positive integer"}',
        ),
        (
            server_frames.error(BadRequest("x", details={"field": "room_id"}), reply_to=3),
            '{"type":"error","code":"bad_request","message":"x","reply_to":3,'
            '"details":{"field":"room_id"}}',
        ),
        (
            server_frames.stream_end(
                room_id=1, message_id=2, seq=3, stop_reason="cancelled", input_tokens=5,
                output_tokens=0, first_token_ms=None, latency_ms=40,
            ),
            '{"type":"stream_end","room_id":1,"message_id":2,"seq":3,"stop_reason":"cancelled",'
            '"usage":{"input_tokens":5,"output_tokens":0},"latency_ms":40}',
        ),
    ],
)  # fmt: skip
def test_encoded_wire_shape(frame: dict[str, Any], wire: str) -> None:
    assert server_frames.encode(frame) == wire


def test_joined_copies_the_online_list() -> None:
    online = [1, 2]
    frame = server_frames.joined(room_id=1, last_seq=0, epoch="e1", online=online, reply_to=None)
    online.append(3)
    assert frame["online"] == [1, 2]


def test_builders_are_keyword_only() -> None:
    with pytest.raises(TypeError):
        server_frames.read(1, 2, 3)  # type: ignore[call-arg]



# -- stored rows as frames, and frames back to payloads ---------------------------------------------------


def _row(**changes: object) -> dict[str, object]:
    import datetime as dt

    row: dict[str, object] = {
        "id": 9, "room_id": 7, "seq": 3, "sender_id": None, "role": "assistant", "kind": "text", "content": "hi",
        "client_msg_id": None, "reply_to_id": 8, "status": "final", "superseded_at": None, "deleted_at": None,
        "edited_at": None, "created_at": dt.datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=dt.UTC),
    }  # fmt: skip
    row.update(changes)
    return row


def test_message_from_row_marks_answers() -> None:
    frame = server_frames.message_from_row(_row(status="cancelled"))
    assert frame["created_at"] == "2026-01-02T03:04:05.678Z"
    assert frame["reply_to_message_id"] == 8 and frame["status"] == "cancelled" and "superseded" not in frame


def test_change_from_row_is_an_update_or_a_delete() -> None:
    import datetime as dt

    edited = _row(edited_at=dt.datetime(2026, 1, 2, 3, 5, tzinfo=dt.UTC), content="new")
    assert server_frames.change_from_row(edited) == {
        "type": "message_updated", "room_id": 7, "message_id": 9, "seq": 3, "content": "new",
        "edited_at": "2026-01-02T03:05:00.000Z", "reactions": [], "rev": None,
    }  # fmt: skip
    assert server_frames.change_from_row(_row(deleted_at=edited["edited_at"]))["type"] == "message_deleted"


@pytest.mark.parametrize(
    ("generation", "stop_reason"),
    [({"g_stop_reason": "max_tokens", "g_output_tokens": 5}, "max_tokens"), ({}, "end_turn")],
)
def test_stream_end_from_row(generation: dict[str, object], stop_reason: str) -> None:
    end = server_frames.stream_end_from_row(_row(**generation))
    assert end["stop_reason"] == stop_reason and end["message_id"] == 9 and end["seq"] == 3
    assert end["usage"]["output_tokens"] == generation.get("g_output_tokens", 0)
