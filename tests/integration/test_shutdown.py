"""SIGTERM of an idle server: bounded by the clients that answer, not by the ones that do not."""

from __future__ import annotations

import asyncio
import json
import signal
import time
from typing import Any

import pytest
import websocket

from tests.chat import connect
from tests.conftest import Services
from tests.rawws import OP_CLOSE, OP_TEXT, RawWS, close_payload, frame
from tests.support import Chatd
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
