"""Micro-benchmark: the cost of writing one broadcast to N WebSockets in Tornado, two ways.

(a) ``handler.write_message(text)`` per socket: Tornado frames the message for
    every socket (header, a Future per call).
(b) the frame built ONCE (``chatd.core.wsframe.ws_text_frame``) and the same bytes
    written to every socket's ``ws_connection.stream`` with ``stream.write``:
    what chatd's fan-out does (``ChatSocket.write_frame``).

The server (this process, pinned to ``--server-cpu``) holds N real loopback
WebSocket connections whose client ends live in a drainer process (pinned to
``--client-cpu``) that reads and discards everything, so kernel buffers never
fill.  Only the server-side loop over the sockets is timed; the drainer
checks that every byte arrived.

    python loadtest/bench_fanout.py                   # N = 1000, 5000, 10000
    python loadtest/bench_fanout.py --conns 2000 --rounds 50

Loopback only; bounded by N and the number of rounds.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import selectors
import socket
import statistics
import sys
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def _pin(cpu: int | None) -> None:
    if cpu is not None and hasattr(os, "sched_setaffinity") and (os.cpu_count() or 1) > cpu:
        os.sched_setaffinity(0, {cpu})


def _raise_nofile() -> None:
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


# -- drainer (the client ends) ------------------------------------------------------------


def drainer(pipe: Any, port: int, n: int, cpu: int | None) -> None:
    """Open ``n`` WebSockets, then read and count bytes until told to stop."""
    _pin(cpu)
    _raise_nofile()
    request = (
        f"GET /ws HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    ).encode()
    socks: list[socket.socket] = []
    for start in range(0, n, 200):
        batch = []
        for _ in range(min(200, n - start)):
            s = socket.create_connection(("127.0.0.1", port), timeout=30)
            s.sendall(request)
            batch.append(s)
        for s in batch:
            head = b""
            while b"\r\n\r\n" not in head:
                chunk = s.recv(4096)
                if not chunk:
                    raise ConnectionError("closed during handshake")
                head += chunk
            if not head.startswith(b"HTTP/1.1 101"):
                raise ConnectionError(head[:200].decode(errors="replace"))
            s.setblocking(False)
        socks += batch
    sel = selectors.DefaultSelector()
    for s in socks:
        sel.register(s, selectors.EVENT_READ)
    pipe.send({"ready": len(socks)})
    # Nothing is read while the server is timed: a reader on the other core would contend for the
    # sockets' locks inside the loopback send path and make the timings noisy.  The frames of a whole
    # run fit in the receive buffers (rounds x 3 x ~200 bytes << tcp_rmem).
    total = 0
    while True:
        msg = pipe.recv()
        if msg == "count":
            while True:  # read until a whole select round finds nothing more
                events = sel.select(0.2)
                if not events:
                    break
                for key, _ in events:
                    sock = key.fileobj
                    assert isinstance(sock, socket.socket)
                    try:
                        while True:
                            data = sock.recv(262144)
                            if not data:
                                sel.unregister(sock)
                                break
                            total += len(data)
                    except BlockingIOError:
                        pass
            pipe.send(total)
        elif msg == "stop":
            for s in socks:
                s.close()
            pipe.send("bye")
            return


# -- server -----------------------------------------------------------------------------------


def _poll_recv(pipe: Connection, timeout_s: float) -> object:
    """The drainer's next message, or False if none comes within ``timeout_s``."""
    return pipe.poll(timeout_s) and pipe.recv()


async def run(conns: list[int], rounds: int, payload_bytes: int, client_cpu: int | None) -> list[dict[str, Any]]:
    import multiprocessing as mp

    import tornado.web
    import tornado.websocket
    from tornado.netutil import bind_sockets

    from chatd.core import server_frames, wsframe

    handlers: list[tornado.websocket.WebSocketHandler] = []

    class Sock(tornado.websocket.WebSocketHandler):
        def open(self, *args: Any, **kwargs: Any) -> None:
            self.set_nodelay(True)
            handlers.append(self)

        def on_close(self) -> None:
            if self in handlers:
                handlers.remove(self)

    app = tornado.web.Application([(r"/ws", Sock)], websocket_ping_interval=None)
    from tornado.httpserver import HTTPServer

    server = HTTPServer(app)
    [listener] = bind_sockets(0, "127.0.0.1", backlog=4096)
    server.add_sockets([listener])
    port = listener.getsockname()[1]

    frame_obj = {
        "type": "message",
        "room_id": 7,
        "message_id": 9001,
        "seq": 121,
        "sender_id": 42,
        "role": "user",
        "kind": "text",
        "content": "",
        "client_msg_id": "c-0001",
        "created_at": "2025-06-01T12:00:01.482Z",
        "deleted": False,
    }
    base = len(server_frames.encode_bytes(frame_obj))
    frame_obj["content"] = "x" * max(0, payload_bytes - base)
    text = server_frames.encode(frame_obj)
    payload = text.encode()
    frame = wsframe.ws_text_frame(payload)

    ctx = mp.get_context("spawn")
    out = []
    for n in conns:
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=drainer, args=(child, port, n, client_cpu), daemon=True)
        proc.start()
        loop = asyncio.get_running_loop()
        ready = await loop.run_in_executor(None, _poll_recv, parent, 300)
        if not ready:
            raise RuntimeError("drainer did not connect")
        deadline = time.monotonic() + 30
        while len(handlers) < n and time.monotonic() < deadline:  # noqa: ASYNC110  # bounded wait for opens
            await asyncio.sleep(0.01)
        socks = list(handlers)
        assert len(socks) == n, f"{len(socks)} of {n} sockets open"
        streams = [st for h in socks if h.ws_connection is not None and (st := h.ws_connection.stream) is not None]

        def method_a(socks: list[Any] = socks) -> float:
            t0 = time.perf_counter()
            for h in socks:
                h.write_message(text)
            return time.perf_counter() - t0

        def method_b(streams: list[Any] = streams) -> float:
            t0 = time.perf_counter()
            for st in streams:
                st.write(frame)
            return time.perf_counter() - t0

        def method_b_plus_encode(streams: list[Any] = streams) -> float:  # (b) + encoding and framing once
            t0 = time.perf_counter()
            fr = wsframe.ws_text_frame(server_frames.encode_bytes(frame_obj))
            for st in streams:
                st.write(fr)
            return time.perf_counter() - t0

        times: dict[str, list[float]] = {"a": [], "b": [], "b+encode": []}
        methods = [("a", method_a), ("b", method_b), ("b+encode", method_b_plus_encode)]
        for _ in range(rounds):  # interleaved, so drift in the machine hits every method alike
            for name, fn in methods:
                gc.collect()
                times[name].append(fn())
                await asyncio.sleep(0.002)  # let the IOLoop finish partial writes
                while any(st.writing() for st in streams):  # noqa: ASYNC110  # bounded by delivery
                    await asyncio.sleep(0.002)
        parent.send("count")
        received = await loop.run_in_executor(None, parent.recv)
        expected = rounds * n * len(frame) * len(methods)
        parent.send("stop")
        await loop.run_in_executor(None, _poll_recv, parent, 30)
        proc.join(10)
        deadline = time.monotonic() + 10
        while handlers and time.monotonic() < deadline:  # noqa: ASYNC110  # bounded wait for closes
            await asyncio.sleep(0.02)
        us = {k: statistics.median(v) / n * 1e6 for k, v in times.items()}
        row = {
            "conns": n,
            "frame_bytes": len(frame),
            "rounds": rounds,
            "us_per_frame_write_message": round(us["a"], 3),
            "us_per_frame_prebuilt_stream_write": round(us["b"], 3),
            "us_per_frame_prebuilt_incl_encode": round(us["b+encode"], 3),
            "ratio_write_message_over_prebuilt": round(us["a"] / us["b"], 2) if us["b"] else None,
            "bytes_expected": expected,
            "bytes_received": received,
            "delivered_ok": received == expected,
        }
        out.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    server.stop()
    return out


def main() -> int:
    p = argparse.ArgumentParser(description="Tornado fan-out micro-benchmark: write_message vs prebuilt frame bytes")
    p.add_argument("--conns", default="1000,5000,10000")
    p.add_argument("--rounds", type=int, default=20, help="broadcasts per method (frames must fit in rcvbuf)")
    p.add_argument("--payload", type=int, default=200, help="JSON payload bytes of the broadcast message")
    p.add_argument("--server-cpu", type=int, default=0)
    p.add_argument("--client-cpu", type=int, default=1)
    p.add_argument("--out", default="", help="also write the rows as JSON here")
    a = p.parse_args()
    _raise_nofile()
    two = (os.cpu_count() or 1) >= 2
    _pin(a.server_cpu if two else None)
    import uvloop

    rows = uvloop.run(run([int(x) for x in a.conns.split(",")], a.rounds, a.payload, a.client_cpu if two else None))
    import tornado

    print(f"# Tornado fan-out: µs per delivered frame (tornado {tornado.version}, {a.rounds} rounds, median)\n")
    print(
        "| sockets | frame bytes | (a) write_message | (b) prebuilt stream.write | (b) + encode once | a / b | "
        "all bytes delivered |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['conns']:,} | {r['frame_bytes']} | {r['us_per_frame_write_message']:.2f} | "
            f"{r['us_per_frame_prebuilt_stream_write']:.2f} | {r['us_per_frame_prebuilt_incl_encode']:.2f} | "
            f"{r['ratio_write_message_over_prebuilt']:.2f} | {'yes' if r['delivered_ok'] else 'NO'} |"
        )
    if a.out:
        Path(a.out).write_text(json.dumps(rows, indent=2))
    return 0 if all(r["delivered_ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
