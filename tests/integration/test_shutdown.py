"""SIGTERM of an idle server: bounded by the clients that answer, not by the ones that do not."""

from __future__ import annotations

import asyncio
import json
import signal
import time
from typing import Any

import psycopg
import pytest
import websocket
from tornado.httpclient import HTTPClientError

from tests.chat import connect
from tests.conftest import Services
from tests.rawws import OP_CLOSE, OP_TEXT, RawWS, close_payload, frame
from tests.support import WS, Chatd
from tests.users import make_users

pytestmark = pytest.mark.reliability


async def _answer_close_after_a_frame(ws: RawWS) -> None:
    """A client whose last frame crosses the server's close: it sends a ping, then its close reply."""
    while True:
        got = await ws.recv(timeout_s=30)
        if got is None:
            return
        if got.opcode == OP_CLOSE:
            await ws.send(frame(OP_TEXT, json.dumps({"type": "ping", "id": "late"}).encode()))
            await ws.send(frame(OP_CLOSE, close_payload(1000)))
            return


async def test_idle_sigterm_is_quick(chatd_factory: Any, services: Services) -> None:
    server: Chatd = chatd_factory(workers=2)
    users = make_users(services.database_url, 6)
    polite = [await connect(server, u) for u in users[:2]]  # Tornado clients: answer the close at once
    crossing = [await RawWS.connect(server.port, token=u.token) for u in users[2:4]]
    deaf = [  # connected, never read again
        await asyncio.to_thread(websocket.create_connection, server.ws, header=[f"Authorization: Bearer {u.token}"])
        for u in users[4:]
    ]
    answering = [asyncio.ensure_future(_answer_close_after_a_frame(ws)) for ws in crossing]
    await asyncio.sleep(0.5)
    started = time.monotonic()
    server.signal(signal.SIGTERM)
    assert server.proc is not None
    code = await asyncio.to_thread(server.proc.wait, 60)
    took_s = time.monotonic() - started
    await asyncio.gather(*answering)
    for conn in deaf:
        conn.close()
    stopped = {e["worker"]: e["duration_ms"] for e in server.events("worker_stopped")}
    print(f"idle SIGTERM with 6 sockets: {took_s:.1f} s; workers {stopped}")
    assert code == 0
    assert polite[0].conn.close_code == 1001
    assert took_s < 6, f"SIGTERM of an idle server took {took_s:.1f} s (workers: {stopped})"


async def test_a_handshake_that_completes_during_the_drain_gets_1001_not_hello(
    chatd_factory: Any, services: Services
) -> None:
    """The handshake's session check is held behind a lock on ``users`` while SIGTERM starts the drain and
    the server closes its sockets with 1001; released, the upgrade completes: it must end in a refusal
    (503) or a 1001 close, never a ``hello`` followed by a dropped connection."""
    server: Chatd = chatd_factory()
    (user,) = make_users(services.database_url, 1)
    bystander = await connect(server, make_users(services.database_url, 1)[0])  # so the drain has a socket to close
    with psycopg.connect(services.database_url) as holder:
        holder.execute("LOCK TABLE users IN ACCESS EXCLUSIVE MODE")
        handshake = asyncio.ensure_future(WS.connect(server.ws, user.token))
        await asyncio.sleep(0.3)  # the handshake waits on the lock
        server.signal(signal.SIGTERM)
        assert (await bystander.closed(timeout_s=5))[0] == 1001  # the drain closed the sockets it had
        holder.rollback()
    try:
        ws = await handshake
    except HTTPClientError as err:
        assert err.code == 503, err
        return
    first = await ws.recv(timeout_s=10)
    assert first is None, f"got {first} after the drain closed the sockets"
    assert ws.conn.close_code == 1001, (ws.conn.close_code, ws.conn.close_reason)
