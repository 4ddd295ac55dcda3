"""RFC 6455 on chatd's socket: close codes, masking, fail-fast UTF-8, and closes a client actually sees.

The Autobahn cases (kosoku) run against a test-only echo route built from the
same protocol class and settings as ``/ws``; the targeted tests below run
against ``/ws`` itself, with a raw client (tests/rawws.py) or websocket-client.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
import zlib
from collections import Counter
from typing import Any

import kosoku
import pytest
import websocket
from tornado.httpclient import HTTPRequest
from tornado.websocket import websocket_connect

from tests.chat import collect_messages, connect, join, make_room, send_many
from tests.conftest import Services
from tests.rawws import OP_CLOSE, OP_CONT, OP_PING, OP_PONG, OP_TEXT, RawWS, close_payload, frame
from tests.support import WS, Chatd, http_get
from tests.users import make_users

pytestmark = pytest.mark.reliability

INVALID_CLOSE_CODES = (0, 999, 1004, 1005, 1006, 1015, 1016, 1100, 2999)


async def _hello(port: int, token: str) -> RawWS:
    ws = await RawWS.connect(port, token=token)
    got = await ws.recv()
    assert got is not None and json.loads(got.payload)["type"] == "hello"
    return ws


async def test_invalid_close_codes_get_1002_and_valid_ones_are_echoed(chatd: Chatd, services: Services) -> None:
    (alice,) = make_users(services.database_url, 1)
    answers: dict[int, int | None] = {}
    for code in (*INVALID_CLOSE_CODES, 1000, 1001, 1003, 1007, 1011, 3000, 4999):
        ws = await _hello(chatd.port, alice.token)
        await ws.send(frame(OP_CLOSE, close_payload(code, b"bye")))
        answers[code] = await ws.close_code()
        ws.close()
    expected = {code: 1002 for code in INVALID_CLOSE_CODES} | {
        code: code for code in (1000, 1001, 1003, 1007, 1011, 3000, 4999)
    }
    assert answers == expected


async def test_close_frame_of_one_byte_or_invalid_utf8_reason_is_refused(chatd: Chatd, services: Services) -> None:
    (alice,) = make_users(services.database_url, 1)
    ws = await _hello(chatd.port, alice.token)
    await ws.send(frame(OP_CLOSE, b"\x03"))  # a length-1 close payload is malformed (Autobahn 7.3.2)
    assert await ws.close_code() == 1002
    ws.close()
    ws = await _hello(chatd.port, alice.token)
    await ws.send(frame(OP_CLOSE, close_payload(1000, b"\xce\xba\xe1\xbd\xb9\xcf\x83\xce\xbc\xce\xb5\xed\xa0\x80")))
    assert await ws.close_code() == 1007  # Autobahn 7.5.1
    ws.close()


async def test_unmasked_client_frame_closes_1002(chatd: Chatd, services: Services) -> None:
    (alice,) = make_users(services.database_url, 1)
    ws = await _hello(chatd.port, alice.token)
    await ws.send(frame(OP_TEXT, json.dumps({"type": "ping", "id": "p"}).encode(), mask=False))
    got = await ws.recv()
    assert got is not None and got.opcode == OP_CLOSE, got  # not a pong
    assert got.close_code == 1002
    ws.close()


_PING = json.dumps({"type": "ping", "id": "p"}).encode()
_LONG = json.dumps({"type": "ping", "id": "p", "pad": "x" * 300}).encode()  # 300 < 65536: the 16-bit form fits


@pytest.mark.parametrize(
    "wire",
    [
        pytest.param(frame(OP_TEXT, _PING, length_form=16), id="text-len26-in-16bit-form"),
        pytest.param(frame(OP_TEXT, _PING, length_form=64), id="text-len26-in-64bit-form"),
        pytest.param(frame(OP_TEXT, _LONG, length_form=64), id="text-len300-in-64bit-form"),
        pytest.param(frame(OP_PING, b"hello", length_form=16), id="ping-in-16bit-form"),
        pytest.param(frame(OP_PONG, b"hello", length_form=16), id="pong-in-16bit-form"),
        pytest.param(frame(OP_CLOSE, close_payload(1000), length_form=16), id="close-in-16bit-form"),
    ],
)
async def test_non_minimal_length_encodings_close_1002(chatd: Chatd, services: Services, wire: bytes) -> None:
    """RFC 6455 5.2: "the minimal number of bytes MUST be used to encode the length"; a control frame's
    payload is at most 125 bytes, so it never uses the 16- or 64-bit form."""
    (alice,) = make_users(services.database_url, 1)
    ws = await _hello(chatd.port, alice.token)
    await ws.send(wire)
    got = await ws.recv()
    assert got is not None and got.opcode == OP_CLOSE, got  # not a pong, an error frame or an echoed close
    assert got.close_code == 1002
    ws.close()


def _deflate(payload: bytes) -> bytes:
    """One permessage-deflate message body (RFC 7692 7.2.1: the trailing 00 00 ff ff removed)."""
    compressor = zlib.compressobj(wbits=-zlib.MAX_WBITS)
    data = compressor.compress(payload) + compressor.flush(zlib.Z_SYNC_FLUSH)
    assert data.endswith(b"\x00\x00\xff\xff")
    return data[:-4]


async def test_compressed_text_of_invalid_utf8_closes_1007(chatd_factory: Any, services: Services) -> None:
    """With permessage-deflate, a text message that inflates to invalid UTF-8 gets 1007, not a dropped TCP
    connection (it was: Tornado aborts on a decode error after decompression)."""
    server: Chatd = chatd_factory(CHATD_WS_COMPRESSION="true")
    (alice,) = make_users(services.database_url, 1)
    ws = await RawWS.connect(server.port, token=alice.token, extensions="permessage-deflate")
    assert b"permessage-deflate" in ws.response.lower(), ws.response
    got = await ws.recv()  # hello (maybe compressed: not parsed)
    assert got is not None and got.opcode == OP_TEXT
    await ws.send(frame(OP_TEXT, _deflate(_PING), rsv1=True))  # a valid compressed frame is served
    got = await ws.recv()
    assert got is not None and got.opcode == OP_TEXT, got
    await ws.send(frame(OP_TEXT, _deflate(b'{"type": "ping", "id": "\xed\xa0\x80"}'), rsv1=True))  # a surrogate
    assert await ws.close_code() == 1007
    ws.close()


async def test_compressed_sockets_get_their_frames_and_fan_out(chatd_factory: Any, services: Services) -> None:
    """permessage-deflate negotiated: hello, acks and fan-out frames (pre-framed once, compressed per socket)
    reach Tornado's client, and what the client sends compressed is served."""
    server: Chatd = chatd_factory(CHATD_WS_COMPRESSION="true")
    alice, bob = make_users(services.database_url, 2)
    room = await make_room(server, alice, [bob])
    sockets = []
    for user in (alice, bob):
        request = HTTPRequest(server.ws, headers={"Authorization": f"Bearer {user.token}"}, request_timeout=20)
        conn = await websocket_connect(request, compression_options={})
        assert conn.headers is not None
        assert "permessage-deflate" in conn.headers.get("Sec-WebSocket-Extensions", "")
        ws = WS(conn)
        assert (await ws.expect("hello"))["user_id"] == user.id
        await join(ws, room)
        sockets.append(ws)
    a, b = sockets
    contents = [f"compressed {i} " + "z" * (i * 100) for i in range(20)]
    acks = await send_many(a, room, contents)
    assert [ack["type"] for ack in acks] == ["ack"] * 20
    got = await collect_messages(b, room, 20)
    assert [m["content"] for m in got] == contents


async def test_invalid_utf8_in_a_first_fragment_fails_fast(chatd: Chatd, services: Services) -> None:
    """The server closes 1007 at the bad fragment, without waiting for a final fragment that never comes."""
    (alice,) = make_users(services.database_url, 1)
    ws = await _hello(chatd.port, alice.token)
    bad = b'{"type": "ping", "x": "\xce\xba\xe1\xbd\xb9\xcf\x83\xce\xbc\xce\xb5\xed\xa0\x80'  # a surrogate
    await ws.send(frame(OP_TEXT, bad, fin=False))
    await ws.send(frame(OP_CONT, b"hello", fin=False))
    started = time.monotonic()
    # Waiting for the final fragment would hold the socket until ws.idle_timeout_s (60 s): any bound well
    # below that proves the fail-fast; 15 s leaves a loaded machine its slack.
    assert await ws.close_code(timeout_s=15) == 1007
    assert time.monotonic() - started < 15
    ws.close()


def _oversize_with_websocket_client(url: str, token: str, size: int) -> int | str:
    """What a typical client sees after sending a frame over the limit: the close code, or the error."""
    conn = websocket.create_connection(url, header=[f"Authorization: Bearer {token}"], timeout=15)
    try:
        conn.recv()  # hello
        conn.send("x" * size)
        while True:
            opcode, data = conn.recv_data(control_frame=True)
            if opcode == websocket.ABNF.OPCODE_CLOSE:
                return int.from_bytes(data[:2], "big")
    except (OSError, websocket.WebSocketException) as exc:
        return type(exc).__name__
    finally:
        conn.close()


async def test_frame_over_max_frame_bytes_reaches_the_client_as_1009(chatd: Chatd, services: Services) -> None:
    (alice,) = make_users(services.database_url, 1)
    seen = [
        await asyncio.to_thread(_oversize_with_websocket_client, chatd.ws, alice.token, 4 * 1024 * 1024)
        for _ in range(10)
    ]
    assert seen == [1009] * 10
    # The worker discarded the payloads instead of buffering them, and still serves.
    ws = await _hello(chatd.port, alice.token)
    ws.close()


async def test_oversize_frame_that_never_ends_is_closed_within_a_bound(chatd: Chatd, services: Services) -> None:
    """A header announcing 8 MiB, then a trickle: 1009 first, the TCP connection closed in bounded time."""
    (alice,) = make_users(services.database_url, 1)
    ws = await _hello(chatd.port, alice.token)
    await ws.send(frame(OP_TEXT, b"", length=8 * 1024 * 1024)[:-4] + b"\x00\x00\x00\x00")
    got = await ws.recv()
    assert got is not None and got.close_code == 1009
    started = time.monotonic()
    ended = False
    while time.monotonic() - started < 20:
        try:
            ws.writer.write(b"x" * 1024)
            await ws.writer.drain()
        except ConnectionError:
            ended = True
            break
        if ws.reader.at_eof():
            ended = True
            break
        await asyncio.sleep(0.1)
    assert ended, "the server kept an endless oversize frame open"
    assert time.monotonic() - started < 15
    ws.close()


def _slow_reader(url: str, token: str, room: int, closed: threading.Event, pause_s: float, stop_at: float) -> int | str:
    """Join, stop reading while the room floods until chatd closed the socket (``closed``), go on not reading
    for ``pause_s`` more, then read on: the close code seen."""
    conn = websocket.create_connection(url, header=[f"Authorization: Bearer {token}"], timeout=30)
    try:
        conn.send(json.dumps({"type": "join", "room_id": room, "id": "j"}))
        closed.wait(stop_at - time.monotonic())
        time.sleep(pause_s)
        while time.monotonic() < stop_at:
            opcode, data = conn.recv_data(control_frame=True)
            if opcode == websocket.ABNF.OPCODE_CLOSE:
                return int.from_bytes(data[:2], "big")
        return "no close"
    except (OSError, websocket.WebSocketException) as exc:
        return type(exc).__name__
    finally:
        conn.close()


async def test_slow_consumer_sees_1013(chatd_factory: Any, services: Services) -> None:
    """A client that stops reading is closed at ws.max_buffer_bytes; reading again within ws.close_timeout_s
    (10 s; Tornado's fixed 5 s before), it finds the frames already in the kernel's buffers, then 1013."""
    server: Chatd = chatd_factory(CHATD_WS_MAX_BUFFER_BYTES="65536", CHATD_WS_SEND_RATE_COUNT="100000")
    alice, slow = make_users(services.database_url, 2)
    room = await make_room(server, alice, [slow])
    a = await connect(server, alice)
    await join(a, room)
    closed = threading.Event()
    # The reader stays deaf for 6 s after the close: longer than Tornado's 5 s, within close_timeout_s (10 s),
    # whatever the flood took to fill the buffers (the close is seen in the log within ~0.1 s).
    reader = asyncio.ensure_future(
        asyncio.to_thread(_slow_reader, server.ws, slow.token, room, closed, 6.0, time.monotonic() + 90)
    )
    await a.expect_presence(slow.id, "online")  # its join was served before the flood

    async def watch() -> None:
        while "slow_consumer_closed" not in server.log():
            await asyncio.sleep(0.1)
        closed.set()

    watching = asyncio.ensure_future(watch())
    big = "y" * 3900
    try:
        for _ in range(8):  # ~6 MB: past the kernel buffers and the 64 KiB bound
            await send_many(a, room, [big] * 200)
            a.backlog = [f for f in a.backlog if f["type"] != "message"]
            if closed.is_set():
                break
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(watching, 10)
    finally:
        watching.cancel()
        closed.set()  # the reader goes on in every case (no thread left waiting)
    assert "slow_consumer_closed" in server.log()
    assert await reader == 1013


# -- the Autobahn cases, through kosoku ---------------------------------------------------------------

AUTOBAHN_CASES = ["1.*", "2.*", "3.*", "4.*", "5.*", "6.*", "7.*", "9.*", "10.*"]
# 9.x sends messages of up to 16 MiB: the echo route gets a frame limit above that (the class is the same).
ECHO_MAX_FRAME_BYTES = 16 * 1024 * 1024 + 1024


async def test_autobahn_cases_pass_on_the_echo_route(chatd_factory: Any) -> None:
    server: Chatd = chatd_factory(CHATD_WS_TEST_ECHO_ROUTE="true", CHATD_WS_MAX_FRAME_BYTES=str(ECHO_MAX_FRAME_BYTES))
    url = f"ws://127.0.0.1:{server.port}/test/ws-echo"
    try:
        results = await asyncio.wait_for(kosoku.run_fuzzingclient(url, AUTOBAHN_CASES, concurrency=2), 240)
    except kosoku.FailureError as failure:
        results = failure.results
    verdicts = Counter((r.behavior.value, r.behavior_close.value) for r in results)
    failed = [
        f"{r.case_id} {r.behavior.value}/{r.behavior_close.value} close={r.remote_close_code}: {r.result_close}"
        for r in results
        if not r.passed
    ]
    print(f"kosoku {len(results)} cases: {dict(verdicts)}")
    assert len(results) >= 290, verdicts  # every selected case ran
    assert not failed, "\n".join(failed)
    # Fail fast on invalid UTF-8 (6.4.x) is OK, not NON-STRICT (which only fails at the end of the message).
    assert [r.case_id for r in results if r.behavior.value == "NON-STRICT"] == []
    assert "Traceback" not in server.log()


async def test_echo_route_is_absent_unless_configured(chatd: Chatd) -> None:
    status, body = http_get(f"{chatd.http}/test/ws-echo")
    assert status == 404 and body["error"]["code"] == "not_found"
