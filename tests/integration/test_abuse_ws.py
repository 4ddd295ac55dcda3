"""Abusive socket clients: floods of every frame type, and closes that leave a trace.

A flood gets ``rate_limited`` errors (with ``retry_after_ms``) and, if it goes
on, a 1008 close; typing is relayed only when it changes; every close for a
protocol violation leaves a log line.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
from typing import Any

import psutil
import pytest

from tests.chat import connect, join, make_room, send_many
from tests.conftest import Services
from tests.rawws import OP_BINARY, OP_TEXT, RawWS, frame
from tests.support import WS, Chatd
from tests.users import make_users

pytestmark = pytest.mark.reliability


async def _flood(ws: WS, frames: list[dict[str, Any]]) -> None:
    """Write every frame without waiting for anything (one burst on the wire)."""
    assert ws.conn.stream is not None
    data = b"".join(frame(OP_TEXT, json.dumps(f).encode()) for f in frames)
    try:
        await ws.conn.stream.write(data)
    except Exception:  # closed by the server mid-burst
        pass


async def _drain(ws: WS, timeout_s: float = 15) -> tuple[list[dict[str, Any]], int | None]:
    """Every frame until the socket closes (or ``timeout_s``): the frames and the close code."""
    got: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            f = await ws.recv(timeout_s=max(0.1, deadline - time.monotonic()))
        except TimeoutError:
            return got, None
        if f is None:
            return got, ws.conn.close_code
        got.append(f)
    return got, None


async def test_typing_is_relayed_only_when_it_changes(chatd_factory: Any, services: Services) -> None:
    """Dedup alone (the rate limits raised out of the way): 300 false then 300 true relay one true."""
    chatd: Chatd = chatd_factory(
        CHATD_WS_TYPING_RATE_PER_S="100000",
        CHATD_WS_TYPING_BURST="100000",
        CHATD_WS_FRAME_RATE_PER_S="100000",
        CHATD_WS_FRAME_BURST="100000",
        # Time out of the count: with the defaults (2 s refresh, 6 s TTL) a stall within the 300 `true` frames
        # relayed a refresh, and a late first relay let the TTL's `false` into the 1.5 s of quiet below.
        CHATD_WS_TYPING_INTERVAL_S="60",
        CHATD_WS_TYPING_TTL_S="120",
    )
    alice, bob = make_users(services.database_url, 2)
    room = await make_room(chatd, alice, [bob])
    a, b = await connect(chatd, alice), await connect(chatd, bob)
    await join(a, room)
    await join(b, room)
    await _flood(a, [{"type": "typing", "room_id": room, "is_typing": False}] * 300)
    await _flood(a, [{"type": "typing", "room_id": room, "is_typing": True}] * 300)
    await a.send({"type": "ping", "id": "done"})
    await a.expect("pong", reply_to="done", timeout_s=15)
    # The first relay is waited for as long as a loaded machine needs; after it, 1.5 s of quiet ends the count
    # (a second relay would follow the first within milliseconds: the frames were all read before the pong).
    relayed = [(await b.expect("typing", timeout_s=15))["is_typing"]]
    while True:
        try:
            f = await b.expect("typing", timeout_s=1.5)
        except TimeoutError:
            break
        relayed.append(f["is_typing"])
    assert relayed == [True], relayed  # 300 false while not typing: none; 300 true: one


@pytest.mark.parametrize(
    "flood",
    [
        pytest.param(lambda room: {"type": "join", "room_id": room}, id="join"),
        pytest.param(lambda room: {"type": "read", "room_id": room, "seq": 0}, id="read"),
        pytest.param(lambda room: {"type": "typing", "room_id": room, "is_typing": True}, id="typing"),
        pytest.param(lambda room: {"type": "ping"}, id="ping"),
        pytest.param(lambda room: {"type": "join", "room_id": "not a number"}, id="invalid-fields"),
        pytest.param(
            lambda room: {"type": "send", "room_id": room, "content": "x", "client_msg_id": "same"}, id="send"
        ),
    ],
)
async def test_a_flood_is_limited_then_closed_1008(chatd: Chatd, services: Services, flood: Any) -> None:
    (alice,) = make_users(services.database_url, 1)
    room = await make_room(chatd, alice, [])
    ws = await connect(chatd, alice)
    await join(ws, room)
    started = time.monotonic()
    await _flood(ws, [flood(room) | {"id": f"f{i}"} for i in range(2000)])
    got, code = await _drain(ws)
    answered = [f for f in got if str(f.get("reply_to", "")).startswith("f")]
    limited = [f for f in answered if f.get("code") == "rate_limited"]
    assert code == 1008, f"not closed ({code}) after {len(answered)} answers, {len(limited)} rate_limited"
    assert time.monotonic() - started < 15
    assert len(answered) < 600, len(answered)  # the flood was not served
    if flood(room)["type"] != "join" or flood(room)["room_id"] == room:
        assert all(f["retry_after_ms"] > 0 for f in limited)
    closes = [e for e in chatd.events("ws_policy_close") if e["user_id"] == alice.id]
    assert closes and closes[0]["code"] == 1008, chatd.events("ws_policy_close")
    # the worker is fine: a fresh socket works
    again = await connect(chatd, alice)
    await again.send({"type": "ping", "id": "p"})
    await again.expect("pong", reply_to="p")


async def test_every_protocol_violation_close_is_logged(chatd: Chatd, services: Services) -> None:
    (alice,) = make_users(services.database_url, 1)
    cases = {
        1003: [frame(OP_BINARY, b"\x00\x01")],
        1007: [frame(OP_TEXT, b"{nope")] * 3,
        1009: [frame(OP_TEXT, b"x" * 70_000)],
        1002: [frame(OP_TEXT, b'{"type":"ping"}', mask=False)],
    }
    for code, frames in cases.items():
        raw = await RawWS.connect(chatd.port, token=alice.token)
        for f in frames:
            await raw.send(f)
        assert await raw.close_code() == code
        raw.close()
    await asyncio.sleep(0.5)
    logged = {e["code"] for e in chatd.events("ws_protocol_error") + chatd.events("ws_policy_close")}
    assert set(cases) <= logged, logged


async def test_cancel_in_a_room_you_are_not_in_is_not_found(chatd_factory: Any, services: Services) -> None:
    """An outsider cannot tell a running answer from a message that does not exist."""
    server: Chatd = chatd_factory(CHATD_ASSISTANT_OFFLINE_TOKENS_PER_S="20")
    alice, mallory = make_users(services.database_url, 2)
    room = await make_room(server, alice, [], kind="assistant")
    a, m = await connect(server, alice), await connect(server, mallory)
    await join(a, room)
    await a.send({"type": "send", "room_id": room, "content": "ramble on", "client_msg_id": "q1"})
    start = await a.expect("stream_start", room_id=room, timeout_s=30)
    await m.send({"type": "cancel", "message_id": start["message_id"], "id": "c1"})
    running = await m.expect("error", reply_to="c1")
    await m.send({"type": "cancel", "message_id": start["message_id"] + 1000, "id": "c2"})
    missing = await m.expect("error", reply_to="c2")
    assert (running["code"], missing["code"]) == ("not_found", "not_found"), (running, missing)
    end = await a.expect("stream_end", message_id=start["message_id"], timeout_s=60)
    assert end["stop_reason"] == "end_turn"  # mallory's cancel did nothing


async def test_non_reading_clients_are_closed_and_memory_stays_flat(chatd_factory: Any, services: Services) -> None:
    """30 sockets that join a busy room and never read: each closed 1013 at ws.max_buffer_bytes, RSS bounded."""
    buffer_bytes = 262_144
    server: Chatd = chatd_factory(CHATD_WS_MAX_BUFFER_BYTES=str(buffer_bytes), CHATD_WS_SEND_RATE_COUNT="100000")
    users = make_users(services.database_url, 31)
    alice, deaf = users[0], users[1:]
    room = await make_room(server, alice, deaf)
    a = await connect(server, alice)
    await join(a, room)
    assert server.proc is not None
    worker = psutil.Process(server.proc.pid)
    before = worker.memory_info().rss / 2**20
    raws = []
    for user in deaf:  # plain sockets with a tiny receive buffer that are never read from
        raw = socket.socket()
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        raw.connect(("127.0.0.1", server.port))
        raw.sendall(
            (
                "GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
                f"Authorization: Bearer {user.token}\r\n\r\n"
            ).encode()
            + frame(OP_TEXT, json.dumps({"type": "join", "room_id": room}).encode())
        )
        raws.append(raw)
    # Every join served (each announced online) before the flood: polled, not slept on.
    online: set[int] = set()
    while not online >= {u.id for u in deaf}:
        online |= set((await a.expect("presence", timeout_s=30))["online"])
    peak = before
    big = "z" * 3900
    for _ in range(15):  # up to 3,000 messages of 4 KB: far past the kernel buffers of every socket
        await send_many(a, room, [big] * 200)
        a.backlog = []
        peak = max(peak, worker.memory_info().rss / 2**20)
        if len(server.events("slow_consumer_closed")) >= len(deaf):
            break
    closed = len(server.events("slow_consumer_closed"))
    for raw in raws:
        raw.close()
    grown = peak - before
    print(f"non-reading clients: {closed}/{len(deaf)} closed 1013; worker RSS {before:.0f} MiB, peak +{grown:.0f} MiB")
    assert closed == len(deaf)
    assert grown < len(deaf) * buffer_bytes / 2**20 + 40, f"RSS grew {grown:.0f} MiB"
