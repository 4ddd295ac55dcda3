"""BASELINE: the ceiling a Python chat server can reach on this machine (not a product).

A minimal Tornado + uvloop WebSocket broadcast server with rooms: no auth, no
persistence, no Redis, no rate limits, no presence.  It speaks the subset of
chatd's frames that the benchmark generator uses, with the same shapes:

    -> {"type":"join","id":..,"room_id":R}      <- {"type":"joined","room_id":R,"last_seq":N,"online":[],"reply_to":..}
    -> {"type":"send","id":..,"room_id":R,"content":..,"client_msg_id":..}
                                                  <- {"type":"message",...,"seq":N+1,...}  to every socket in R
                                                  <- {"type":"ack",...,"seq":N+1,"reply_to":..}
    -> {"type":"ping","id":..}                    <- {"type":"pong",...}
    on connect                                    <- {"type":"hello",...}

Per-room seqs are an in-memory counter.  Fan-out builds each frame once and
writes the same bytes to every socket, as chatd does.  Sockets are pinged
every 25 s like chatd's default heartbeat, so idle CPU compares.

Write path (``--write-path``): ``direct`` (default) is chatd's own
(chatd/realtime/wsconn.py ``WsConnection._write``): when nothing is queued on
the stream, one ``socket.send()`` and no IOStream bookkeeping; only what the
kernel does not take goes through ``stream.write``.  ``stream`` is Tornado's
``IOStream.write`` for every frame, the path this baseline had before: kept to
show what the direct path is worth, not as the ceiling (with it chatd beat its
own "ceiling" in the hot room).

    python loadtest/baseline_server.py --port 8090 [--write-path stream]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import secrets
import struct
import time
from datetime import UTC, datetime
from typing import Any

import tornado.web
import tornado.websocket
from tornado.iostream import StreamClosedError

_ids = itertools.count(1)
_users = itertools.count(1)
DIRECT = True  # --write-path direct (see the module docstring)


def text_frame(payload: bytes) -> bytes:
    n = len(payload)
    if n < 126:
        return struct.pack("!BB", 0x81, n) + payload
    if n <= 0xFFFF:
        return struct.pack("!BBH", 0x81, 126, n) + payload
    return struct.pack("!BBQ", 0x81, 127, n) + payload


def encode(frame: dict[str, Any]) -> bytes:
    return json.dumps(frame, separators=(",", ":"), ensure_ascii=False).encode()


class Room:
    __slots__ = ("seq", "sockets")

    def __init__(self) -> None:
        self.seq = 0
        self.sockets: set[BaselineSocket] = set()


ROOMS: dict[int, Room] = {}


class BaselineSocket(tornado.websocket.WebSocketHandler):
    def check_origin(self, origin: str) -> bool:
        return True

    def open(self, *args: Any, **kwargs: Any) -> None:
        self.set_nodelay(True)
        self.user_id = next(_users)
        self.rooms: set[int] = set()
        self.write_frame(
            text_frame(
                encode(
                    {
                        "type": "hello",
                        "user_id": self.user_id,
                        "connection_id": secrets.token_hex(8),
                        "server_time": int(time.time() * 1000),
                        "heartbeat_ms": 25000,
                        "protocol": 1,
                    }
                )
            )
        )

    def write_frame(self, frame: bytes) -> None:
        conn = self.ws_connection
        stream = getattr(conn, "stream", None) if conn is not None else None
        if stream is None or conn is None or conn.is_closing():
            return
        if DIRECT and not stream.writing():
            # As chatd: nothing queued, so the bytes can go to the kernel now, in order.  While the stream
            # holds bytes, the frame queues behind them in stream.write below (order kept).
            sock = stream.socket
            if sock is None:
                return
            try:
                sent = sock.send(frame)
            except BlockingIOError:
                sent = 0
            except OSError:  # reset, broken pipe: the stream closes, on_close follows
                stream.close()
                return
            if sent == len(frame):
                return
            frame = frame[sent:]  # the rest of a frame: handed over now, never dropped
        try:
            stream.write(frame)
        except StreamClosedError:
            pass

    def reply(self, frame: dict[str, Any]) -> None:
        self.write_frame(text_frame(encode(frame)))

    def on_message(self, message: str | bytes) -> None:
        try:
            f = json.loads(message)
            kind = f["type"]
        except (ValueError, KeyError, TypeError):
            self.reply({"type": "error", "code": "bad_request", "message": "invalid frame"})
            return
        rid = f.get("id")
        if kind == "send":
            room_id = f["room_id"]
            room = ROOMS.get(room_id)
            if room is None:
                room = ROOMS[room_id] = Room()
            room.seq += 1
            created = datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
            msg_id = next(_ids)
            frame = text_frame(
                encode(
                    {
                        "type": "message",
                        "room_id": room_id,
                        "message_id": msg_id,
                        "seq": room.seq,
                        "sender_id": self.user_id,
                        "role": "user",
                        "kind": "text",
                        "content": f["content"],
                        "client_msg_id": f.get("client_msg_id"),
                        "created_at": created,
                        "deleted": False,
                    }
                )
            )
            for sock in room.sockets:
                sock.write_frame(frame)
            self.reply(
                {
                    "type": "ack",
                    "room_id": room_id,
                    "client_msg_id": f.get("client_msg_id"),
                    "message_id": msg_id,
                    "seq": room.seq,
                    "created_at": created,
                    "reply_to": rid,
                    "duplicate": False,
                }
            )
        elif kind == "join":
            room_id = f["room_id"]
            room = ROOMS.get(room_id)
            if room is None:
                room = ROOMS[room_id] = Room()
            room.sockets.add(self)
            self.rooms.add(room_id)
            self.reply({"type": "joined", "room_id": room_id, "last_seq": room.seq, "online": [], "reply_to": rid})
        elif kind == "leave":
            self._leave(f["room_id"])
            self.reply({"type": "left", "room_id": f["room_id"], "reply_to": rid})
        elif kind == "ping":
            self.reply({"type": "pong", "server_time": int(time.time() * 1000), "reply_to": rid})
        else:
            self.reply({"type": "error", "code": "bad_request", "message": "unknown frame type", "reply_to": rid})

    def _leave(self, room_id: int) -> None:
        self.rooms.discard(room_id)
        room = ROOMS.get(room_id)
        if room is not None:
            room.sockets.discard(self)
            if not room.sockets and room.seq == 0:
                del ROOMS[room_id]

    def on_close(self) -> None:
        for room_id in list(self.rooms):
            self._leave(room_id)


class Health(tornado.web.RequestHandler):
    def get(self) -> None:
        self.write({"status": "ready", "server": "baseline"})


async def main(host: str, port: int, backlog: int) -> None:
    app = tornado.web.Application(
        [(r"/ws", BaselineSocket), (r"/health/ready", Health), (r"/health/live", Health)],
        websocket_ping_interval=25,
        websocket_ping_timeout=25,
    )
    app.listen(port, host, backlog=backlog)
    await asyncio.Event().wait()


if __name__ == "__main__":
    import uvloop

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8090)
    parser.add_argument("--backlog", type=int, default=4096)
    parser.add_argument("--write-path", choices=("direct", "stream"), default="direct")
    args = parser.parse_args()
    DIRECT = args.write_path == "direct"
    uvloop.run(main(args.host, args.port, args.backlog))
