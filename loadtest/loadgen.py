"""Load generator processes of loadtest/bench.py: many WebSocket clients per process, driven by commands.

One process = one uvloop event loop holding thousands of ``wsclient`` sockets.
The harness starts several (``GenPool``), sends each the same command with its
share of the work, and merges the answers.  Commands:

``connect``   open sockets (chatd: ``Authorization: Bearer``; Socket.IO: Engine.IO v4 ``40``), wait for ``hello``
``join``      join rooms, remember each socket's ``last_seq`` baseline per room
``chat``      send on a schedule (``t=<unix time>`` inside each content), then drain; latencies + seq tracks;
              a send refused ``busy``/``unavailable``/``rate_limited`` is resent after ``retry_after_ms``
``assistant`` every listed socket sends one prompt at once; follow queued/stream_start/stream_chunk/stream_end
``stats``     open sockets, close codes, CPU time of this process
``close``     close every socket

Message bookkeeping per (socket, room): a ``SeqTrack`` counts distinct seqs
after the join baseline, duplicates and out-of-order arrivals; the harness
compares the counts with the highest acked seq of each room (loss = 0 check).
Refused sends (docs/PROTOCOL.md §3 ``send``, §10 step 7): the socket resends a send answered ``busy``,
``unavailable`` or ``rate_limited`` with the same ``client_msg_id`` and content once ``retry_after_ms`` has
passed, and sends nothing new meanwhile (scheduled sends then are counted as held back, not offered).
Every send offered once must end acked: ``lat_final`` is first try -> final ack, ``lat_ack`` the accepted
try's own send -> ack; what is still unacked when the drain ends is reported as ``never_acked``.

"Light" sockets (hot-room members that are not latency probes) only count
``message`` frames by prefix, without JSON decoding: the generator has one
core and must stay faster than the server it measures.
"""

from __future__ import annotations

import asyncio
import heapq
import json
import os
import random
import re
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

from wsclient import HandshakeError, WSProtocol, connect

loads = json.loads
perf = time.perf_counter
wall = time.time
_TOKEN = re.compile(r"\S+\s*")  # chatd.assistant.providers._TOKEN: how the offline provider cuts its reply into tokens

MSG_PREFIX_CHATD = b'{"type":"message"'
MSG_PREFIX_SIO = b'42["message"'
RETRY_CODES = frozenset({"busy", "unavailable", "rate_limited"})  # refusals a client resends (PROTOCOL.md §3)


class SeqTrack:
    """Seqs of one room seen by one socket, from its join baseline on."""

    __slots__ = ("baseline", "count", "dup", "next", "ooo", "pending")

    def __init__(self, baseline: int) -> None:
        self.baseline = baseline
        self.next = baseline + 1
        self.count = 0
        self.dup = 0
        self.ooo = 0
        self.pending: set[int] | None = None

    def offer(self, seq: int) -> None:
        if seq == self.next:
            self.count += 1
            self.next += 1
            pending = self.pending
            if pending:
                while self.next in pending:
                    pending.discard(self.next)
                    self.next += 1
        elif seq > self.next:
            if self.pending is None:
                self.pending = set()
            if seq in self.pending:
                self.dup += 1
            else:
                self.pending.add(seq)
                self.count += 1
                self.ooo += 1
        elif seq > self.baseline:
            self.dup += 1
        # seq <= baseline: replayed history from before the join point, not ours to count


class AsstRun:
    """One prompt and its streamed answer, as seen by the prompting socket."""

    __slots__ = ("chunk_tokens", "chunks", "end", "prompt_id", "queued", "refused", "rid", "t_ack", "t_end", "t_send",
                 "t_start")

    def __init__(self, t_send: float) -> None:
        self.t_send = t_send
        self.rid = 0
        self.refused: str | None = None  # error code when the answer was refused (busy, unavailable, ...)
        self.t_ack: float | None = None
        self.t_start: float | None = None
        self.t_end: float | None = None
        self.prompt_id: int | None = None
        self.queued = 0
        self.chunks: list[float] = []
        self.chunk_tokens: list[int] = []
        self.end: dict[str, Any] | None = None


class Gen:
    """Per-process state shared by every socket."""

    def __init__(self) -> None:
        self.conns: dict[int, Conn] = {}
        self.reset()
        self.close_codes: Counter[str] = Counter()
        self.join_outstanding = 0
        self.join_failed: list[tuple[int, int]] = []
        self.joins_done = asyncio.Event()
        self.track_deliver = True

    def reset(self) -> None:
        self.sent = 0
        self.acked = 0
        self.delivered = 0
        self.errors: Counter[str] = Counter()
        self.lat_ack: list[float] = []
        self.lat_echo: list[float] = []
        self.lat_deliver: list[float] = []
        self.max_seq: dict[int, int] = {}
        self.outstanding = 0  # sends without ack/error yet
        self.deferred = 0  # scheduled sends skipped because the server said busy (retry_after_ms not over)
        self.asst_done = 0
        self.offered = 0  # distinct messages sent at least once (first tries)
        self.retries = 0  # resends of refused sends
        self.retry_waiting = 0  # refused sends waiting for their retry_after_ms
        self.lat_final: list[float] = []  # first try -> final ack
        self.tries: Counter[int] = Counter()  # tries per finally acked message
        self.retrying = False  # a chat round is on: refused sends are resent (off for the assistant prompts)
        self.round: int = getattr(self, "round", 0) + 1  # stale resend timers of an earlier round do nothing


class Conn(WSProtocol):
    """A chatd-protocol socket (chatd itself and the baseline server)."""

    proto = "chatd"

    def __init__(self, gen: Gen, key: int, host: str, path: str, headers: dict[str, str], light: bool) -> None:
        super().__init__(host, path, headers)
        self.gen = gen
        self.key = key
        self.light = light
        self.user_id = 0
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.tracks: dict[int, SeqTrack] = {}
        self.light_count = 0
        self.pending: dict[int, tuple[str, float, int, str]] = {}  # request id -> (kind, t, room, cmid)
        self.echo: dict[str, float] = {}
        self.n = 0
        self.asst: AsstRun | None = None
        self.quiet_until = 0.0  # told busy: a well-behaved client sends nothing before retry_after_ms
        self.offers: dict[str, tuple[float, str, int]] = {}  # client_msg_id -> (first try, content, tries): unacked

    # -- incoming ---------------------------------------------------------------------

    def on_text(self, payload: bytes) -> None:
        if self.light and payload.startswith(MSG_PREFIX_CHATD):
            self.light_count += 1
            self.gen.delivered += 1
            return
        try:
            f = loads(payload)
        except ValueError:
            self.gen.errors["bad_frame"] += 1
            return
        self.on_frame(f)

    def on_frame(self, f: dict[str, Any]) -> None:
        t = f.get("type")
        if t == "message":
            self.on_message(f)
        elif t == "ack":
            self.on_reply(f.get("reply_to"), f)
        elif t == "joined":
            self.on_reply(f.get("reply_to"), f)
        elif t == "hello":
            self.user_id = f.get("user_id", 0)
            if not self.ready.done():
                self.ready.set_result(None)
        elif t == "error":
            rid = f.get("reply_to")
            if rid is not None and rid in self.pending:
                self.on_reply(rid, f)
            else:
                self.gen.errors[f"error:{f.get('code')}"] += 1
                run = self.asst
                if run is not None and rid == run.rid and run.t_end is None and run.refused is None:
                    run.refused = str(f.get("code"))  # stored and acked, but no answer will come
                    self.gen.asst_done += 1
        elif t in ("stream_chunk", "stream_start", "stream_end", "queued"):
            self.on_assistant(t, f)

    def on_message(self, f: dict[str, Any]) -> None:
        gen = self.gen
        gen.delivered += 1
        room = f["room_id"]
        tr = self.tracks.get(room)
        if tr is not None:
            tr.offer(f["seq"])
        cmid = f.get("client_msg_id")
        if cmid is not None:
            t0 = self.echo.pop(cmid, None)
            if t0 is not None:
                gen.lat_echo.append((perf() - t0) * 1000)
                return
            if gen.track_deliver:
                content = f.get("content", "")
                if content.startswith("t="):
                    end = content.find(" ")
                    try:
                        gen.lat_deliver.append((wall() - float(content[2:end])) * 1000)
                    except ValueError:
                        pass

    def on_reply(self, rid: Any, f: dict[str, Any]) -> None:
        entry = self.pending.pop(rid, None) if rid is not None else None
        if entry is None:
            return
        kind, t0, room, cmid = entry
        gen = self.gen
        if kind == "join":
            if f.get("type") == "joined":
                if self.light:
                    self.light_count = 0
                    self.tracks[room] = SeqTrack(int(f.get("last_seq", 0)))
                else:
                    self.tracks[room] = SeqTrack(int(f.get("last_seq", 0)))
            else:
                gen.errors[f"join:{f.get('code')}"] += 1
                gen.join_failed.append((self.key, room))
            gen.join_outstanding -= 1
            if gen.join_outstanding <= 0:
                gen.joins_done.set()
            return
        gen.outstanding -= 1
        if f.get("type") == "ack":
            gen.acked += 1
            now = perf()
            gen.lat_ack.append((now - t0) * 1000)
            offer = self.offers.pop(cmid, None)
            if offer is not None:
                gen.lat_final.append((now - offer[0]) * 1000)
                gen.tries[offer[2]] += 1
            seq = int(f.get("seq", 0))
            if seq > gen.max_seq.get(room, 0):
                gen.max_seq[room] = seq
            if self.asst is not None and kind == "prompt":
                self.asst.t_ack = perf()
                self.asst.prompt_id = f.get("message_id")
        else:
            gen.errors[f"{kind}:{f.get('code')}"] += 1
            self.echo.pop(cmid, None)
            code = f.get("code")
            if code == "busy":
                self.quiet_until = max(self.quiet_until, perf() + int(f.get("retry_after_ms", 0)) / 1000)
            if code in RETRY_CODES and gen.retrying and cmid in self.offers:
                # §10 step 7: the same client_msg_id and content again, once retry_after_ms has passed (a
                # backoff for unavailable, which carries none); a stored first try then acks as a duplicate.
                delay = int(f.get("retry_after_ms") or 0) / 1000 or 0.2
                gen.retry_waiting += 1
                asyncio.get_running_loop().call_later(delay, self.resend, cmid, room, kind, gen.round)
            elif kind == "prompt" and self.asst is not None and self.asst.refused is None:
                self.asst.refused = str(code)  # the prompt itself was refused: no answer will come
                gen.asst_done += 1

    def on_assistant(self, t: str, f: dict[str, Any]) -> None:
        run = self.asst
        if run is None:
            return
        now = perf()
        if t == "queued":
            run.queued += 1
        elif t == "stream_start":
            if run.t_start is None:
                run.t_start = now
        elif t == "stream_chunk":
            run.chunks.append(now)
            run.chunk_tokens.append(len(_TOKEN.findall(f.get("content", ""))))
        elif t == "stream_end":
            if run.t_end is None:
                run.t_end = now
                run.end = f
                seq = int(f.get("seq") or 0)
                room = f["room_id"]
                if seq > self.gen.max_seq.get(room, 0):
                    self.gen.max_seq[room] = seq
                self.gen.asst_done += 1

    def on_close(self) -> None:
        code = self.close_code if self.close_code is not None else 1006
        self.gen.close_codes[str(code)] += 1
        if not self.ready.done():
            self.ready.set_exception(ConnectionError(f"closed before hello ({code} {self.close_reason})"))
        for kind, _, _, _ in self.pending.values():
            if kind == "join":
                self.gen.join_outstanding -= 1
            else:
                self.gen.outstanding -= 1
        if self.pending and self.gen.join_outstanding <= 0:
            self.gen.joins_done.set()
        self.pending.clear()

    # -- outgoing ---------------------------------------------------------------------

    def next_id(self) -> int:
        self.n += 1
        return self.n

    def join(self, room: int) -> None:
        rid = self.next_id()
        self.pending[rid] = ("join", perf(), room, "")
        self.gen.join_outstanding += 1
        self.send_text(b'{"type":"join","id":%d,"room_id":%d}' % (rid, room))

    def send_chat(self, room: int, pad: str, kind: str = "send") -> int:
        rid = self.next_id()
        cmid = f"c{self.key}-{rid}"
        content = f"t={wall():.6f} k={self.key} n={rid} {pad}"
        if kind in ("send", "prompt"):
            self.offers[cmid] = (perf(), content, 1)
            self.gen.offered += 1
        self._transmit(rid, room, content, cmid, kind)
        return rid

    def _transmit(self, rid: int, room: int, content: str, cmid: str, kind: str) -> None:
        t0 = perf()
        self.pending[rid] = (kind, t0, room, cmid)
        self.echo[cmid] = t0
        self.gen.outstanding += 1
        self.gen.sent += 1
        self.send_text(self.send_frame(rid, room, content, cmid))

    def resend(self, cmid: str, room: int, kind: str, round_: int) -> None:
        gen = self.gen
        if round_ != gen.round:
            return  # a timer of an earlier round: its counters are gone
        gen.retry_waiting -= 1
        offer = self.offers.get(cmid)
        if offer is None or self.closed or not gen.retrying:
            return  # the drain ended: it stays in offers and is reported never acked
        if self.quiet_until > perf():  # told busy again meanwhile (another send): wait for that too
            gen.retry_waiting += 1
            asyncio.get_running_loop().call_later(self.quiet_until - perf(), self.resend, cmid, room, kind, round_)
            return
        self.offers[cmid] = (offer[0], offer[1], offer[2] + 1)
        gen.retries += 1
        rid = self.next_id()
        if kind == "prompt" and self.asst is not None:
            self.asst.rid = rid  # the answer's own refusals (after the ack) name the try that was acked
        self._transmit(rid, room, offer[1], cmid, kind)

    @staticmethod
    def send_frame(rid: int, room: int, content: str, cmid: str) -> bytes:
        return f'{{"type":"send","id":{rid},"room_id":{room},"content":"{content}","client_msg_id":"{cmid}"}}'.encode()


class SioConn(Conn):
    """The same client over Socket.IO v5 / Engine.IO v4 (websocket transport only)."""

    proto = "sio"

    def on_text(self, payload: bytes) -> None:
        if self.light and payload.startswith(MSG_PREFIX_SIO):
            self.light_count += 1
            self.gen.delivered += 1
            return
        head = payload[:2]
        if head == b"42":  # event
            try:
                name, data = loads(payload[2:])[:2]
            except ValueError:
                self.gen.errors["bad_frame"] += 1
                return
            if name == "message":
                self.on_message(data)
            return
        if head == b"43":  # ack
            i = payload.find(b"[")
            rid = int(payload[2:i])
            data = loads(payload[i:])
            f = data[0] if data else {}
            entry = self.pending.get(rid)
            if entry is not None and entry[0] == "join":
                f = {**f, "type": "joined"}
            self.on_reply(rid, f)
            return
        if payload == b"2":  # Engine.IO ping
            self.send_text(b"3")
            return
        if payload[:1] == b"0" and head != b"40":  # Engine.IO open
            self.send_text(b"40")
            return
        if head == b"40":  # namespace connected
            if not self.ready.done():
                self.ready.set_result(None)
            return
        if head == b"44" or head == b"41":
            self.gen.errors[f"sio:{payload[:80]!r}"] += 1

    def join(self, room: int) -> None:
        rid = self.next_id()
        self.pending[rid] = ("join", perf(), room, "")
        self.gen.join_outstanding += 1
        self.send_text(b'42%d["join",{"room_id":%d}]' % (rid, room))

    @staticmethod
    def send_frame(rid: int, room: int, content: str, cmid: str) -> bytes:
        return f'42{rid}["send",{{"room_id":{room},"content":"{content}","client_msg_id":"{cmid}"}}]'.encode()


# -- commands ----------------------------------------------------------------------------


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


async def cmd_connect(gen: Gen, cmd: dict[str, Any]) -> dict[str, Any]:
    t = cmd["target"]
    host, port, proto = t["host"], t["port"], t["proto"]
    path = t.get("path") or ("/socket.io/?EIO=4&transport=websocket" if proto == "sio" else "/ws")
    cls: type[Conn] = SioConn if proto == "sio" else Conn
    ips: list[str | None] = cmd.get("local_ips") or [None]
    sem = asyncio.Semaphore(cmd.get("concurrency", 200))
    timeout_s = cmd.get("timeout_s", 30.0)
    light_keys = set(cmd.get("light", []))
    lat: list[float] = []
    errors: Counter[str] = Counter()
    started = perf()
    cpu0 = time.process_time()

    async def one(i: int, key: int, token: str) -> None:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        async with sem:
            t0 = perf()
            try:
                conn = await connect(
                    lambda: cls(gen, key, f"{host}:{port}", path, headers, key in light_keys),
                    host,
                    port,
                    local_ip=ips[i % len(ips)],
                    timeout_s=timeout_s,
                )
                assert isinstance(conn, Conn)
                await asyncio.wait_for(asyncio.shield(conn.ready), timeout_s)
            except HandshakeError as exc:
                errors[f"http {exc.status}"] += 1
                return
            except (OSError, TimeoutError, ConnectionError) as exc:
                errors[type(exc).__name__ + ": " + str(exc)[:60]] += 1
                return
            lat.append((perf() - t0) * 1000)
            gen.conns[key] = conn

    await asyncio.gather(*(one(i, k, tok) for i, (k, tok) in enumerate(cmd["conns"])))
    return {
        "ok": len(lat),
        "failed": sum(errors.values()),
        "errors": dict(errors),
        "elapsed_s": perf() - started,
        "lat_ms": lat,
        "cpu_s": time.process_time() - cpu0,
    }


async def cmd_join(gen: Gen, cmd: dict[str, Any]) -> dict[str, Any]:
    """Join rooms with at most ``window`` joins in flight; refused joins are retried like a client would."""
    started = perf()
    deadline = started + cmd.get("timeout_s", 60)
    window = cmd.get("window", 100)
    retries = cmd.get("retries", 3)
    todo = list(cmd["joins"])
    sent = retried = 0
    first_errors: Counter[str] = Counter()
    for attempt in range(retries + 1):
        gen.join_failed = []
        errors_before = Counter({k: v for k, v in gen.errors.items() if k.startswith("join:")})
        for key, room in todo:
            conn = gen.conns.get(key)
            if conn is None or conn.closed:
                continue
            while gen.join_outstanding >= window and perf() < deadline:  # noqa: ASYNC110  # bounded window
                await asyncio.sleep(0.005)
            conn.join(room)
            sent += 1
        while gen.join_outstanding > 0 and perf() < deadline:  # noqa: ASYNC110  # bounded by the deadline
            await asyncio.sleep(0.01)
        if attempt == 0:
            first_errors = Counter({k: v for k, v in gen.errors.items() if k.startswith("join:")}) - errors_before
        todo = gen.join_failed
        if not todo or perf() >= deadline or attempt == retries:
            break
        retried += len(todo)
        await asyncio.sleep(1.0 + attempt)  # back off, then retry the refused ones
    return {
        "sent": sent,
        "retried": retried,
        "outstanding": gen.join_outstanding,
        "failed": len(gen.join_failed),
        "first_errors": dict(first_errors),
        "elapsed_s": perf() - started,
    }


async def _wait_until(t_wall: float) -> None:
    delay = t_wall - wall()
    if delay > 0:
        await asyncio.sleep(delay)


async def _drain(gen: Gen, drain_s: float, done: Callable[[], bool]) -> None:
    deadline = perf() + drain_s
    last = -1
    stable_since = perf()
    while perf() < deadline:
        if gen.delivered != last:
            last = gen.delivered
            stable_since = perf()
        elif done() and perf() - stable_since > 0.5:
            return
        await asyncio.sleep(0.05)


def _tracks(gen: Gen) -> list[tuple[int, int, int, int, int]]:
    out = []
    for conn in gen.conns.values():
        for room, tr in conn.tracks.items():
            if conn.light:
                out.append((room, tr.baseline, conn.light_count, 0, 0))
            else:
                out.append((room, tr.baseline, tr.count, tr.dup, tr.ooo))
    return out


async def cmd_chat(gen: Gen, cmd: dict[str, Any]) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    gen.reset()
    gen.track_deliver = cmd.get("track_deliver", True)
    gen.retrying = cmd.get("retry", True)
    for c in gen.conns.values():
        c.offers.clear()
        c.quiet_until = 0.0
    senders = [(gen.conns[k], room) for k, room in cmd["senders"] if k in gen.conns]
    interval = float(cmd["interval_s"])
    duration = float(cmd["duration_s"])
    pad = "x" * int(cmd.get("pad", 40))
    await _wait_until(cmd["start_at"])
    cpu0 = time.process_time()
    t0 = loop.time()
    end = t0 + duration
    # Random phases: evenly spaced schedules in several generator processes would line up by chance and
    # hand the server artificial pairs (visible as group-commit batches of exactly 2).
    heap = [(t0 + random.random() * interval, i) for i in range(len(senders))]
    heapq.heapify(heap)
    late: list[float] = []
    while heap:
        now = loop.time()
        due, i = heap[0]
        if due >= end:
            break  # the earliest pending send is past the end: so are all the others
        if due > now:
            await asyncio.sleep(due - now)
            continue
        while heap and heap[0][0] <= now:
            due, i = heapq.heappop(heap)
            if due >= end:
                continue
            conn, room = senders[i]
            if conn.closed:
                pass
            elif conn.quiet_until > perf():
                gen.deferred += 1  # offered but held back, as the protocol asks of a client told busy
                heapq.heappush(heap, (due + interval, i))
            else:
                conn.send_chat(room, pad)
                late.append((now - due) * 1000)
                heapq.heappush(heap, (due + interval, i))
        await asyncio.sleep(0)
    if loop.time() < end:
        # A process without senders (the hot room's other members) listens until the round's end too: drained
        # early, it would stop counting while the sender still sends, and report its members' frames as missing.
        await asyncio.sleep(end - loop.time())
    send_wall = loop.time() - t0
    acked_in_window = gen.acked  # throughput: acks within the send window, not those of the drain after it
    await _drain(gen, cmd.get("drain_s", 10.0), lambda: gen.outstanding <= 0 and gen.retry_waiting <= 0)
    gen.retrying = False
    return {
        "sent": gen.sent,
        "offered": gen.offered,
        "retries": gen.retries,
        "never_acked": sum(len(c.offers) for c in gen.conns.values()),
        "lat_final": gen.lat_final,
        "tries": dict(gen.tries),
        "deferred": gen.deferred,
        "acked": gen.acked,
        "acked_in_window": acked_in_window,
        "outstanding": gen.outstanding,
        "errors": dict(gen.errors),
        "delivered": gen.delivered,
        "lat_ack": gen.lat_ack,
        "lat_echo": gen.lat_echo,
        "lat_deliver": gen.lat_deliver,
        "max_seq": gen.max_seq,
        "tracks": _tracks(gen),
        "send_wall_s": send_wall,
        "sched_late_p99_ms": _pct(late, 0.99),
        "cpu_s": time.process_time() - cpu0,
        "wall_s": loop.time() - t0,
        "open": sum(1 for c in gen.conns.values() if not c.closed),
        "close_codes": dict(gen.close_codes),
    }


async def cmd_assistant(gen: Gen, cmd: dict[str, Any]) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    gen.reset()
    gen.retrying = True  # a prompt refused busy is resent like any send; its t_send stays the first try's
    for c in gen.conns.values():
        c.offers.clear()
        c.quiet_until = 0.0
    prompts = [(gen.conns[k], room) for k, room in cmd["prompts"] if k in gen.conns]
    await _wait_until(cmd["start_at"])
    cpu0 = time.process_time()
    t0 = loop.time()
    for conn, room in prompts:
        asst = conn.asst = AsstRun(perf())
        asst.rid = conn.send_chat(room, cmd.get("text", "please summarize what we said about the benchmark"), "prompt")
    deadline = perf() + cmd.get("timeout_s", 120)
    while gen.asst_done < len(prompts) and perf() < deadline:  # noqa: ASYNC110  # polled counter, bounded
        await asyncio.sleep(0.05)
    await _drain(gen, 3.0, lambda: gen.outstanding <= 0)
    gen.retrying = False
    dt = 1.0 / float(cmd["tokens_per_s"])
    first_chunk, to_start, to_ack, full, gaps, lag = [], [], [], [], [], []
    server_first, server_latency, chunks_per, tok_rate = [], [], [], []
    stop: Counter[str] = Counter()
    refused: Counter[str] = Counter()
    for conn, _ in prompts:
        run = conn.asst
        if run is None:
            continue
        if run.refused is not None:
            refused[run.refused] += 1
        if run.t_ack is not None:
            to_ack.append((run.t_ack - run.t_send) * 1000)
        if run.t_start is not None:
            to_start.append((run.t_start - run.t_send) * 1000)
        if run.chunks:
            first_chunk.append((run.chunks[0] - run.t_send) * 1000)
            chunks_per.append(len(run.chunks))
            cum = 0
            k1 = run.chunk_tokens[0]
            for j, (ts, ntok) in enumerate(zip(run.chunks, run.chunk_tokens, strict=True)):
                cum += ntok
                if j:
                    gaps.append((ts - run.chunks[j - 1]) * 1000)
                    lag.append((ts - (run.chunks[0] + (cum - k1) * dt)) * 1000)
            span = run.chunks[-1] - run.chunks[0]
            if span > 0:
                tok_rate.append((cum - k1) / span)
        if run.t_end is not None and run.end is not None:
            full.append((run.t_end - run.t_send) * 1000)
            stop[str(run.end.get("stop_reason"))] += 1
            if run.end.get("first_token_ms") is not None:
                server_first.append(float(run.end["first_token_ms"]))
            server_latency.append(float(run.end.get("latency_ms", 0)))
        conn.asst = None
    return {
        "prompts": len(prompts),
        "retries": gen.retries,
        "ended": len(full),
        "acked": gen.acked,
        "errors": dict(gen.errors),
        "stop_reasons": dict(stop),
        "refused": dict(refused),
        "to_ack": to_ack,
        "to_start": to_start,
        "first_chunk": first_chunk,
        "full": full,
        "gaps": gaps,
        "lag": lag,
        "server_first_token": server_first,
        "server_latency": server_latency,
        "chunks_per_answer": chunks_per,
        "tokens_per_s_delivered": tok_rate,
        "delivered": gen.delivered,
        "max_seq": gen.max_seq,
        "tracks": _tracks(gen),
        "cpu_s": time.process_time() - cpu0,
        "wall_s": loop.time() - t0,
        "open": sum(1 for c in gen.conns.values() if not c.closed),
        "close_codes": dict(gen.close_codes),
    }


async def cmd_close(gen: Gen, cmd: dict[str, Any]) -> dict[str, Any]:
    conns = list(gen.conns.values())
    for i, conn in enumerate(conns):
        conn.close()
        if i % 500 == 499:
            await asyncio.sleep(0)
    deadline = perf() + cmd.get("timeout_s", 5.0)
    while perf() < deadline and any(not c.closed for c in conns):  # noqa: ASYNC110  # bounded
        await asyncio.sleep(0.05)
    for c in conns:
        if not c.closed:
            c.abort()
    gen.conns.clear()
    gen.close_codes.clear()
    return {"closed": len(conns)}


async def cmd_stats(gen: Gen, cmd: dict[str, Any]) -> dict[str, Any]:
    return {
        "open": sum(1 for c in gen.conns.values() if not c.closed),
        "close_codes": dict(gen.close_codes),
        "cpu_total_s": time.process_time(),
        "errors": dict(gen.errors),
    }


COMMANDS = {
    "connect": cmd_connect,
    "join": cmd_join,
    "chat": cmd_chat,
    "assistant": cmd_assistant,
    "close": cmd_close,
    "stats": cmd_stats,
}


async def serve(pipe: Any) -> None:
    loop = asyncio.get_running_loop()
    gen = Gen()
    while True:
        cmd = await loop.run_in_executor(None, pipe.recv)
        op = cmd.get("op")
        if op == "exit":
            await cmd_close(gen, {"timeout_s": 2})
            pipe.send({"ok": True})
            return
        try:
            result = await COMMANDS[op](gen, cmd)
        except Exception as exc:  # report, keep serving: the harness decides
            result = {"exception": f"{type(exc).__name__}: {exc}"}
        pipe.send(result)


def worker_main(pipe: Any, index: int) -> None:
    """Entry point of one generator process (multiprocessing target)."""
    import resource
    import sys

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    random.seed(index)
    import uvloop

    uvloop.run(serve(pipe))


class GenPool:
    """The harness side: N generator processes, one pipe each."""

    def __init__(self, n: int) -> None:
        import multiprocessing as mp

        ctx = mp.get_context("spawn")
        self.pipes = []
        self.procs = []
        for i in range(n):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=worker_main, args=(child, i), daemon=True, name=f"loadgen-{i}")
            proc.start()
            self.pipes.append(parent)
            self.procs.append(proc)

    def __len__(self) -> int:
        return len(self.pipes)

    def call(self, cmds: list[dict[str, Any]], timeout_s: float = 600) -> list[dict[str, Any]]:
        """Send one command per process (same order as the processes), wait for all answers."""
        for pipe, cmd in zip(self.pipes, cmds, strict=True):
            pipe.send(cmd)
        out = []
        deadline = time.monotonic() + timeout_s
        for pipe in self.pipes:
            if not pipe.poll(max(0.0, deadline - time.monotonic())):
                raise TimeoutError(f"generator did not answer within {timeout_s}s")
            result = pipe.recv()
            if "exception" in result:
                raise RuntimeError(f"generator failed: {result['exception']}")
            out.append(result)
        return out

    def all(self, cmd: dict[str, Any], timeout_s: float = 600) -> list[dict[str, Any]]:
        return self.call([cmd] * len(self.pipes), timeout_s)

    def cpu_seconds(self) -> float:
        from fixtures import proc_cpu_seconds

        return sum(proc_cpu_seconds(p.pid) for p in self.procs if p.pid)

    def stop(self) -> None:
        for pipe in self.pipes:
            try:
                pipe.send({"op": "exit"})
            except OSError:
                pass
        for pipe in self.pipes:
            try:
                if pipe.poll(5):
                    pipe.recv()
            except (OSError, EOFError):
                pass
        for proc in self.procs:
            proc.join(5)
            if proc.is_alive():
                proc.terminate()
                proc.join(2)
