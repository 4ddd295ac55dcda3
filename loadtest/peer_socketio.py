"""PEER: the same chat rooms workload on python-socketio (AsyncServer + AsyncRedisManager) on aiohttp + uvloop.

What a team would build on the usual Python stack instead of chatd: rooms
are Socket.IO rooms, every emit goes through the Redis manager (pub/sub on
the same Valkey as chatd), per-room seqs come from Redis INCR.  No auth, no
persistence.  Several processes may share the port (``--reuse-port``); rooms
work across them through Redis.

Events (Engine.IO v4 / Socket.IO v5 over the websocket transport):

    -> 42N["join",{"room_id":R}]                      <- 43N[{"room_id":R,"last_seq":N}]
    -> 42N["send",{"room_id":R,"content":..,"client_msg_id":..}]
                                                      <- 42["message",{...,"seq":N+1,...}] to the room
                                                      <- 43N[{"type":"ack","seq":N+1,...}]

    python loadtest/peer_socketio.py --port 8091 --redis-url unix:///path/valkey.sock
"""

from __future__ import annotations

import argparse
import itertools
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any, TypeVar

import redis.asyncio as aioredis
import socketio
from aiohttp import web

_ids = itertools.count(1)

_Handler = TypeVar("_Handler", bound=Callable[..., Awaitable[Any]])


def on(sio: socketio.AsyncServer, event: str) -> Callable[[_Handler], _Handler]:
    """``@sio.on(event)`` with a type: python-socketio has no annotations (its decorator returns the handler)."""
    register: Callable[[str], Callable[[_Handler], _Handler]] = sio.on
    return register(event)


def build(redis_url: str, prefix: str) -> tuple[web.Application, socketio.AsyncServer]:
    # redis-py >= 8 caps a pool at 100 connections and RAISES beyond (MaxConnectionsError): under a burst of
    # concurrent events that drops emits.  Give the manager room, and the counters a pool that waits instead.
    manager = socketio.AsyncRedisManager(
        redis_url, channel=f"{prefix}socketio", redis_options={"max_connections": 2000}
    )
    sio = socketio.AsyncServer(
        async_mode="aiohttp",
        client_manager=manager,
        cors_allowed_origins="*",
        ping_interval=25,
        ping_timeout=20,
        logger=False,
        engineio_logger=False,
    )
    counters = aioredis.Redis(
        connection_pool=aioredis.BlockingConnectionPool.from_url(redis_url, max_connections=64, timeout=10)
    )

    @on(sio, "connect")  # what @sio.event does with the name
    async def connect(sid: str, environ: dict[str, Any], auth: Any = None) -> bool:
        return True

    @on(sio, "join")
    async def join(sid: str, data: dict[str, Any]) -> dict[str, Any]:
        room_id = int(data["room_id"])
        await sio.enter_room(sid, f"r{room_id}")
        last = await counters.get(f"{prefix}seq:{room_id}")
        return {"type": "joined", "room_id": room_id, "last_seq": int(last or 0), "online": []}

    @on(sio, "send")
    async def send(sid: str, data: dict[str, Any]) -> dict[str, Any]:
        room_id = int(data["room_id"])
        seq = int(await counters.incr(f"{prefix}seq:{room_id}"))
        created = datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
        msg_id = next(_ids)
        message = {
            "type": "message",
            "room_id": room_id,
            "message_id": msg_id,
            "seq": seq,
            "sender_id": 0,
            "role": "user",
            "kind": "text",
            "content": data["content"],
            "client_msg_id": data.get("client_msg_id"),
            "created_at": created,
            "deleted": False,
        }
        await sio.emit("message", message, room=f"r{room_id}")
        return {
            "type": "ack",
            "room_id": room_id,
            "client_msg_id": data.get("client_msg_id"),
            "message_id": msg_id,
            "seq": seq,
            "created_at": created,
            "duplicate": False,
        }

    @on(sio, "ping")
    async def ping(sid: str, data: Any = None) -> dict[str, Any]:
        return {"type": "pong", "server_time": int(time.time() * 1000)}

    async def health(request: web.Request) -> web.Response:
        return web.json_response({"status": "ready", "server": "peer-socketio"})

    app = web.Application()
    sio.attach(app)
    app.router.add_get("/health/ready", health)
    app.router.add_get("/health/live", health)
    return app, sio


async def main(args: argparse.Namespace) -> None:
    import asyncio

    app, _ = build(args.redis_url, args.prefix)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, args.host, args.port, backlog=args.backlog, reuse_port=args.reuse_port)
    await site.start()
    await asyncio.Event().wait()


if __name__ == "__main__":
    import uvloop

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8091)
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--prefix", default="peer:")
    parser.add_argument("--backlog", type=int, default=4096)
    parser.add_argument("--reuse-port", action="store_true")
    uvloop.run(main(parser.parse_args()))
