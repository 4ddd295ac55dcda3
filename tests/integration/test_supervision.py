"""The master supervises its embedded Postgres and Valkey like its workers: killed, they come back."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

from chatd.process.embedded import EmbeddedPostgres
from tests.chat import connect, join, make_room, send
from tests.support import WS, Chatd, http_get
from tests.users import make_users


async def wait_event(server: Chatd, name: str, count: int = 1, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while len(server.events(name)) < count:
        assert time.monotonic() < deadline, f"no {name} in the log:\n{server.log()[-3000:]}"
        await asyncio.sleep(0.1)


async def delivered(sender: WS, receiver: WS, room: int, text: str, timeout_s: float = 30) -> None:
    """Send until one is acked and reaches the other socket (the first tries may meet the outage)."""
    deadline = time.monotonic() + timeout_s
    while True:
        assert time.monotonic() < deadline, f"{text!r} never delivered"
        reply = await send(sender, room, text)
        if reply["type"] == "ack":
            try:
                await receiver.expect("message", timeout_s=5, content=text)
                return
            except TimeoutError:
                pass
        await asyncio.sleep(0.3)


async def test_killed_embedded_services_are_restarted(tmp_path: Path) -> None:
    data_dir = tmp_path / "var"
    server = Chatd("", "", tmp_path / "serve.log", workers=2, data_dir=data_dir)
    server.env = {"DATABASE_URL": "", "REDIS_URL": "", "CHATD_SERVER_REUSE_PORT": "true"}
    server.start()
    try:
        alice, bob = make_users(EmbeddedPostgres(data_dir).url, 2)
        room = await make_room(server, alice, [bob])
        a, b = await connect(server, alice), await connect(server, bob)
        await join(a, room)
        await join(b, room)
        await delivered(a, b, room, "before")

        valkey = int((data_dir / "valkey" / "valkey.pid").read_text())
        os.kill(valkey, signal.SIGKILL)
        await wait_event(server, "embedded_valkey_restarted")
        new_valkey = int((data_dir / "valkey" / "valkey.pid").read_text())
        assert new_valkey != valkey
        await delivered(a, b, room, "after valkey")  # fan-out across workers runs on the new Valkey

        postmaster = int((data_dir / "postgres" / "postmaster.pid").read_text().split()[0])
        os.kill(postmaster, signal.SIGKILL)
        await wait_event(server, "embedded_postgres_restarted")
        await delivered(a, b, room, "after postgres")  # stored (acked) and fanned out again
        deadline = time.monotonic() + 30
        while http_get(server.http + "/health/ready")[0] != 200:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.2)

        died = server.events("embedded_valkey_died")
        assert died and died[0]["cause"] == "signal 9" and died[0]["service_pid"] == valkey
        for ws in (a, b):
            ws.abort()
    finally:
        assert server.stop() == 0
    assert not (data_dir / "postgres" / "postmaster.pid").exists()
