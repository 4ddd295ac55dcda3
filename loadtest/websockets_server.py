"""REFERENCE: the ``websockets`` library's broadcast server, a second ceiling beside baseline_server.py.

Same rooms, frames and replies as baseline_server.py (hello on connect; join -> joined; send -> the
``message`` to every socket of the room, the sender included, then the ``ack``; ping -> pong), written the
way the library's documentation suggests: an asyncio handler per connection (``async for message in ws``),
``websockets.asyncio.server.broadcast`` for the room's fan-out (the frame encoded once, pushed synchronously
to every open connection), ``await ws.send`` for the replies.  No auth, persistence, Redis or compression
(the generator does not offer permessage-deflate; the baseline has none either).  Pings every 25 s like
chatd's default heartbeat.  On uvloop by default, as the baseline and chatd (``--loop asyncio`` for the
stock loop).

    python loadtest/websockets_server.py --port 8091
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import secrets
import time
from datetime import UTC, datetime
from http import HTTPStatus
from typing import Any

from websockets.asyncio.server import ServerConnection, broadcast, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

_ids = itertools.count(1)
_users = itertools.count(1)


def encode(frame: dict[str, Any]) -> str:
    return json.dumps(frame, separators=(",", ":"), ensure_ascii=False)


class Room:
    __slots__ = ("seq", "sockets")

    def __init__(self) -> None:
        self.seq = 0
        self.sockets: set[ServerConnection] = set()


ROOMS: dict[int, Room] = {}


def health(connection: ServerConnection, request: Request) -> Response | None:
    if request.path.startswith("/health/"):
        return connection.respond(HTTPStatus.OK, '{"status":"ready","server":"websockets"}\n')
    return None


async def handler(ws: ServerConnection) -> None:
    user_id = next(_users)
    rooms: set[int] = set()
    try:
        await ws.send(encode({"type": "hello", "user_id": user_id, "connection_id": secrets.token_hex(8),
                              "server_time": int(time.time() * 1000), "heartbeat_ms": 25000, "protocol": 1}))
        async for message in ws:
            try:
                f = json.loads(message)
                kind = f["type"]
            except (ValueError, KeyError, TypeError):
                await ws.send(encode({"type": "error", "code": "bad_request", "message": "invalid frame"}))
                continue
            rid = f.get("id")
            if kind == "send":
                room_id = f["room_id"]
                room = ROOMS.get(room_id)
                if room is None:
                    room = ROOMS[room_id] = Room()
                room.seq += 1
                created = datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
                msg_id = next(_ids)
                frame = encode({"type": "message", "room_id": room_id, "message_id": msg_id, "seq": room.seq,
                                "sender_id": user_id, "role": "user", "kind": "text", "content": f["content"],
                                "client_msg_id": f.get("client_msg_id"), "created_at": created, "deleted": False})
                broadcast(room.sockets, frame)
                await ws.send(encode({"type": "ack", "room_id": room_id, "client_msg_id": f.get("client_msg_id"),
                                      "message_id": msg_id, "seq": room.seq, "created_at": created,
                                      "reply_to": rid, "duplicate": False}))
            elif kind == "join":
                room_id = f["room_id"]
                room = ROOMS.get(room_id)
                if room is None:
                    room = ROOMS[room_id] = Room()
                room.sockets.add(ws)
                rooms.add(room_id)
                await ws.send(encode({"type": "joined", "room_id": room_id, "last_seq": room.seq, "online": [],
                                      "reply_to": rid}))
            elif kind == "leave":
                leave(ws, rooms, f["room_id"])
                await ws.send(encode({"type": "left", "room_id": f["room_id"], "reply_to": rid}))
            elif kind == "ping":
                await ws.send(encode({"type": "pong", "server_time": int(time.time() * 1000), "reply_to": rid}))
            else:
                await ws.send(encode({"type": "error", "code": "bad_request", "message": "unknown frame type",
                                      "reply_to": rid}))
    except ConnectionClosed:
        pass
    finally:
        for room_id in list(rooms):
            leave(ws, rooms, room_id)


def leave(ws: ServerConnection, rooms: set[int], room_id: int) -> None:
    rooms.discard(room_id)
    room = ROOMS.get(room_id)
    if room is not None:
        room.sockets.discard(ws)
        if not room.sockets and room.seq == 0:
            del ROOMS[room_id]


async def main(host: str, port: int, backlog: int) -> None:
    async with serve(handler, host, port, process_request=health, compression=None, ping_interval=25,
                     ping_timeout=25, backlog=backlog) as server:
        await server.serve_forever()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8091)
    parser.add_argument("--backlog", type=int, default=4096)
    parser.add_argument("--loop", choices=("uvloop", "asyncio"), default="uvloop")
    args = parser.parse_args()
    if args.loop == "uvloop":
        import uvloop

        uvloop.run(main(args.host, args.port, args.backlog))
    else:
        asyncio.run(main(args.host, args.port, args.backlog))
