"""A chat load for fault tests: many real sockets chatting, one fault, then the accounting.

``ChatLoad`` connects one socket per user (rooms of ``room_size``, spread over
the instances), each sending a message every ``interval_s`` with a unique
``client_msg_id`` and recording every ``(room, seq)`` it receives, live or
replayed by a resume.  A socket that is dropped reconnects (its home instance
first, then any other) and resumes with ``since_seq`` = the last seq it has
contiguously; sends without an answer are sent again with the same
``client_msg_id``, as PROTOCOL.md §10 tells clients to.  After the fault the
load stops, every send is answered, and ``report()`` compares what clients saw
with what Postgres stored.

Each socket's stream of a room is checked frame by frame against PROTOCOL.md §3 (join) and §7: after a
``joined`` (``last_seq`` L, asked ``since_seq`` S) come the replay S+1..L in order, then live messages in
increasing seq, each once.  A seq the socket already had comes again only in a replay it asked for
(``replayed again``, allowed); any other repeat is ``duplicated``, a live seq not above the previous one
``out of order``, and a message of a seq above L arriving between a ``join`` and its ``joined`` ``early``
(written while the join was being read: the rejoin promise).

Latencies: every send's last write, its ack and each live delivery are timed (monotonic clock of this
process, so they include its own event loop's lag); ``locate_workers`` finds which worker process holds
each socket (the server side of its TCP connection), so deliveries are classed as same worker, other
worker of the same instance, or other instance.  The report gives the acks and deliveries of the sends
written during the fault.

A member can be *retired* (``retire``): removed, banned or logged out by the scenario.  It stops sending
first and every send of it is acked before the action (so its sends count in full), it never reconnects,
and it is accounted only up to ``cut``, the room's last seq when it was retired; what it receives later is
left out of the accounting (``excluded receipts``) and checked by the scenario itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import random
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import psutil
import psycopg
from tornado.httpclient import HTTPRequest
from tornado.websocket import WebSocketClientConnection, websocket_connect

from tests.users import User

LATE_S = 1.0  # a message reaching a member later than this after its ack counts against recovery
SETTLE_MIN_S = 1.0  # the report waits at least this (two probe intervals) once every send is acked, 3 s at most

SAME_WORKER, SAME_INSTANCE, OTHER_INSTANCE = "same worker", "same instance", "other instance"


def percentile(values: list[float], q: float) -> float:
    """Nearest rank: the smallest value with at least ``q`` % of the values at or below it (0 when empty)."""
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


@dataclass
class Report:
    scenario: str
    sockets: int
    sent: int = 0  # distinct client_msg_ids sent
    acked: int = 0  # distinct client_msg_ids acknowledged
    stored: int = 0  # rows with a client_msg_id in Postgres for the load's rooms
    system: int = 0  # rows without one (system messages: member_left...), delivered and accounted like the rest
    delivered_live: int = 0  # (member, seq) received on a socket as it happened
    recovered_by_resume: int = 0  # (member, seq) first received in a join replay (a reconnect, a rejoin)
    lost: int = 0  # acked but not stored
    never_delivered: int = 0  # stored (acked) but missing at a member after the final resume
    missed_while_connected: int = 0  # missing at a member whose socket never dropped (before the final resume)
    duplicated: int = 0  # a seq twice on one socket (not in a replay asked for), a cmid stored twice, two seqs
    early: int = 0  # a message above a join's last_seq received before that join's `joined`
    out_of_order: int = 0  # a live seq not above the socket's previous one, or a replay not in order
    replayed_again: int = 0  # seqs a socket had already, sent again by a replay it asked for (allowed)
    excluded_receipts: int = 0  # seqs above a retired member's cut that it received (left out)
    errors: dict[str, int] = field(default_factory=dict)  # error codes answered to sends (retried)
    reconnects: int = 0
    closes: dict[str, int] = field(default_factory=dict)  # "code reason" of the sockets dropped under the load
    recover_s: float = 0.0  # from the fault's end to the last late delivery / error / reconnect
    max_late_s: float = 0.0  # the longest a message took from its ack to a member (live)
    fault_s: float = 0.0
    # Sends written during the fault: ack latency, and live delivery latency by where the receiver is.
    acks_in_fault: int = 0
    ack_p50_ms: float = 0.0
    ack_p99_ms: float = 0.0
    ack_max_ms: float = 0.0
    deliveries_in_fault: dict[str, int] = field(default_factory=dict)
    delivery_p50_ms: dict[str, float] = field(default_factory=dict)
    delivery_p99_ms: dict[str, float] = field(default_factory=dict)
    located: int = 0  # sockets whose worker process is known
    calm_ack_p99_ms: float = 0.0  # the same, for the sends written in the 2.5 s before the fault
    calm_delivery_p99_ms: dict[str, float] = field(default_factory=dict)
    server_errors: dict[str, int] = field(default_factory=dict)  # error lines of the servers' logs meanwhile
    notes: dict[str, Any] = field(default_factory=dict)  # the scenario's own figures

    def line(self) -> str:
        text = (
            f"{self.scenario}: {self.sockets} sockets, {self.sent} sent, {self.acked} acked, {self.stored} stored"
            f" (+{self.system} system);"
            f" delivered live {self.delivered_live}, recovered by resume {self.recovered_by_resume};"
            f" lost {self.lost}, never delivered {self.never_delivered}, missed while connected"
            f" {self.missed_while_connected}, duplicated {self.duplicated}, early {self.early}, out of order"
            f" {self.out_of_order}; errors {self.errors}, reconnects {self.reconnects}"
            f"{f' (closed: {self.closes})' if self.closes else ''};"
            f" slowest live delivery {self.max_late_s:.1f} s after its ack;"
            f" recovered {self.recover_s:.1f} s after the fault ({self.fault_s:.1f} s)"
        )
        if self.acks_in_fault:
            text += (
                f"; during the fault: {self.acks_in_fault} acks p50 {self.ack_p50_ms:.1f} / p99 {self.ack_p99_ms:.1f}"
                f" / max {self.ack_max_ms:.0f} ms"
            )
            for where, n in self.deliveries_in_fault.items():
                text += (
                    f", delivery to {where} ({n}) p50 {self.delivery_p50_ms[where]:.1f}"
                    f" / p99 {self.delivery_p99_ms[where]:.1f} ms"
                )
            text += f" ({self.located} of {self.sockets} sockets located); before the fault: acks p99"
            text += f" {self.calm_ack_p99_ms:.1f} ms" + "".join(
                f", delivery to {where} p99 {ms:.1f} ms" for where, ms in self.calm_delivery_p99_ms.items()
            )
        if self.replayed_again or self.excluded_receipts:
            text += f"; replayed again {self.replayed_again}, excluded receipts {self.excluded_receipts}"
        if self.server_errors:
            text += f"; server errors {self.server_errors}"
        for key, value in self.notes.items():
            text += f"; {key} {value}"
        return text

    def json(self) -> str:
        return json.dumps(asdict(self))


class Member:
    def __init__(
        self, load: ChatLoad, user: User, room: int, home: int, follow: bool = True, sending: bool = True
    ) -> None:
        self.load = load
        self.user = user
        self.room = room
        self.home = home
        self.follow = follow  # reconnect when dropped (a bystander does not)
        self.sending = sending  # sends a message every interval (False: only reads, or stopped for a retirement)
        self.conn: WebSocketClientConnection | None = None
        self.instance: int | None = None  # index in load.urls of the current connection
        self.worker: int | None = None  # pid of the worker holding the current connection (locate_workers)
        self.ready = asyncio.Event()
        self.sent = 0
        self.pending: dict[str, float] = {}  # cmid -> first sent
        self.inflight: set[str] = set()  # sent on the current connection, not answered yet
        self.retry_at = 0.0  # no send before (retry_after_ms of the last refusal)
        self.acked: dict[str, int] = {}  # cmid -> seq
        self.message_ids: dict[str, int] = {}  # cmid -> message_id
        self.got: dict[int, tuple[float, bool]] = {}  # seq -> (first received at, live)
        self.contiguous = 0
        self.dups = 0
        self.early = 0
        self.disorder = 0
        self.replayed_again = 0
        self.reconnects = 0
        self.dropped = False  # its socket was dropped at least once
        self.presence: list[tuple[float, int, str]] = []  # (at, user, online|offline)
        self.bad_at: list[float] = []  # errors and reconnects (recovery)
        self.joined_upto = 0  # seqs up to this one on the current socket came from the join replay
        self.joins_answered = 0  # `joined` replies over all connections
        self.join_errors: list[str] = []  # codes of joins answered with an error
        # Retirement (removed, banned, logged out by the scenario): accounted up to `cut`.
        self.cut: int | None = None
        self.retired_at: float | None = None
        self.after_retirement: list[tuple[float, int]] = []  # (at, seq) of the room's messages received since
        self.left_at: list[float] = []  # unsolicited `left` of its room (removed)
        self.closes: list[tuple[float, int | None, str | None]] = []  # (at, code, reason) of its dropped sockets
        # Edits and deletes seen, and answers to frames that are not sends (edit, delete, ping).
        self.changes: list[tuple[float, str, int]] = []  # (at, message_updated|message_deleted, message_id)
        self.refused: dict[str, str] = {}  # request id -> error code
        self.pongs: set[str] = set()
        # The current connection's stream of the room (PROTOCOL.md §3 join, §7 order).
        self._conn_seen: set[int] = set()
        self._joins: dict[str, int | None] = {}  # join id -> since_seq, sent and not answered yet
        self._before_joined: dict[str, list[int]] = {}  # join id -> seqs received while it was pending
        self._replay_next = 0  # the replay due after the last `joined`: _replay_next.._replay_end
        self._replay_end = -1
        self._last = 0  # the stream's position: the last replayed or live seq (the joined's last_seq at first)

    # -- connection ---------------------------------------------------------------------

    async def connect(self, since_seq: int | None) -> bool:
        order = list(range(self.home, len(self.load.urls))) + list(range(self.home))
        for index in order:
            try:
                conn = await websocket_connect(
                    HTTPRequest(
                        self.load.urls[index],
                        headers={"Authorization": f"Bearer {self.user.token}"},
                        request_timeout=5,
                    )
                )
            except Exception:
                continue
            self.conn = conn
            self.instance = index
            self.worker = None  # until located again
            self._conn_seen = set()
            self._joins.clear()
            self._before_joined.clear()
            self._replay_next, self._replay_end, self._last = 0, -1, 0
            self.joined_upto = 1 << 62  # until `joined` says where the replay ends
            await self.join(since_seq, f"j{random.getrandbits(32)}", reset=True)
            return True
        return False

    async def join(self, since_seq: int | None, join_id: str, reset: bool = False) -> None:
        """Send ``join`` of the room on the current socket (again: a rejoin) and expect its ``joined``."""
        assert self.conn is not None
        frame: dict[str, Any] = {"type": "join", "room_id": self.room, "id": join_id}
        if since_seq is not None:
            frame["since_seq"] = since_seq
        self._joins[join_id] = since_seq
        self._before_joined[join_id] = []
        if reset:
            self.ready.clear()
        try:
            await self.conn.write_message(json.dumps(frame))
        except Exception:
            self._joins.pop(join_id, None)  # never sent: no answer to wait for
            self._before_joined.pop(join_id, None)
            raise

    async def run(self) -> None:
        """Read frames; when dropped, reconnect and resume (until the load ends)."""
        first = True
        while True:  # cancelled by ChatLoad.report
            if self.conn is None:
                if (not first and not self.follow) or self.load.finished:
                    return
                if not await self.connect(None if first else self.contiguous):
                    await asyncio.sleep(0.3)
                    continue
                if not first:
                    self.reconnects += 1
                    self.bad_at.append(time.monotonic())
                first = False
            assert self.conn is not None
            msg = await self.conn.read_message()
            if msg is None:
                self.closes.append((time.monotonic(), self.conn.close_code, self.conn.close_reason))
                self.conn = None
                self.ready.clear()
                self.inflight.clear()  # unanswered: sent again after the resume
                if not self.load.finished:
                    self.dropped = True
                await asyncio.sleep(random.uniform(0.05, 0.3))
                continue
            self.on_frame(json.loads(msg))

    def on_frame(self, f: dict[str, Any]) -> None:
        now = time.monotonic()
        kind = f.get("type")
        if kind == "message" and f.get("room_id") == self.room:
            self.on_message(f, now)
        elif kind == "joined" and f.get("reply_to") in self._joins:
            self.on_joined(f)
        elif kind == "ack" and f.get("client_msg_id") in self.pending:
            cmid = f["client_msg_id"]
            seq = int(f["seq"])
            if self.acked.get(cmid, seq) != seq:
                self.load.conflicts += 1
            self.acked[cmid] = seq
            self.message_ids[cmid] = int(f["message_id"])
            self.load.ack_at.setdefault((self.room, seq), now)
            written = self.load.writes.get(cmid)
            if written is not None:
                self.load.ack_samples.append((written[0], now - written[0]))
            del self.pending[cmid]
            self.inflight.discard(cmid)
        elif kind == "error" and f.get("reply_to") in self.pending:
            self.inflight.discard(f["reply_to"])
            code = f.get("code", "?")
            self.load.errors[code] += 1
            # Retried after retry_after_ms (rate_limited, busy) or the next tick, as a client should.
            self.retry_at = max(self.retry_at, now + f.get("retry_after_ms", 0) / 1000)
            if code != "rate_limited":  # the client's own burst of retries, not the server's state
                self.bad_at.append(now)
        elif kind == "error" and f.get("reply_to") in self._joins:
            del self._joins[f["reply_to"]]
            self._before_joined.pop(f["reply_to"], None)
            self.join_errors.append(str(f.get("code")))
        elif kind == "error" and "reply_to" in f:
            self.refused[str(f["reply_to"])] = str(f.get("code"))
        elif kind in ("message_updated", "message_deleted") and f.get("room_id") == self.room:
            self.changes.append((now, kind, int(f["message_id"])))
        elif kind == "left" and f.get("room_id") == self.room and "reply_to" not in f:
            self.left_at.append(now)
        elif kind == "pong" and "reply_to" in f:
            self.pongs.add(str(f["reply_to"]))
        elif kind == "presence":
            for status in ("online", "offline"):
                for uid in f.get(status, []):
                    self.presence.append((now, uid, status))

    def on_joined(self, f: dict[str, Any]) -> None:
        join_id = f["reply_to"]
        since = self._joins.pop(join_id)
        last_seq = int(f["last_seq"])
        # A message above last_seq was committed after the join read the room: it must come after `joined`.
        self.early += sum(1 for seq in self._before_joined.pop(join_id, []) if seq > last_seq)
        if since is not None and since < last_seq:
            self._replay_next, self._replay_end = since + 1, last_seq
        else:
            self._replay_next, self._replay_end = 0, -1
        self._last = last_seq if since is None or since >= last_seq else since
        # The first join ever delivers live from last_seq on; after any later join (a reconnect's, a rejoin,
        # the final resume) what it replays up to last_seq came from the replay.
        self.joined_upto = last_seq if self.joins_answered else 0
        self.joins_answered += 1
        self.ready.set()

    def on_message(self, f: dict[str, Any], now: float) -> None:
        seq = int(f["seq"])
        for seqs in self._before_joined.values():
            seqs.append(seq)
        if self.retired_at is not None:
            self.after_retirement.append((now, seq))
        if self._replay_next <= self._replay_end:  # the replay of the last `joined` is due
            if seq != self._replay_next:
                self.disorder += 1
            else:
                self._replay_next += 1
            if seq in self._conn_seen:
                self.replayed_again += 1  # the client asked for it (since_seq): not a duplicate
                self._last = max(self._last, seq)
                return
        elif seq in self._conn_seen:
            self.dups += 1
            return
        elif seq <= self._last:
            self.disorder += 1
        self._last = max(self._last, seq)
        self._conn_seen.add(seq)
        if seq not in self.got:
            live = seq > self.joined_upto
            self.got[seq] = (now, live)
            while self.contiguous + 1 in self.got:
                self.contiguous += 1
            if live:
                self.load.delivered(self, f, now)

    # -- sending --------------------------------------------------------------------------

    async def send_loop(self) -> None:
        if not self.follow:
            # A bystander never reconnects, so a send in flight when its instance dies would stay
            # unanswered and count as sent but not acked. It is there to be seen going offline.
            return
        await asyncio.sleep(random.uniform(0, self.load.interval_s))
        while not self.load.finished:
            new = self.sending and not self.load.stop_sending
            if not new and not self.pending:
                if self.load.stop_sending:
                    return
                await asyncio.sleep(self.load.interval_s)  # a reader, or stopped until retired
                continue
            if self.conn is not None and self.ready.is_set() and time.monotonic() >= self.retry_at:
                if new:
                    self.sent += 1
                    self.pending[f"{self.load.tag}-{self.user.id}-{self.sent}"] = time.monotonic()
                conn = self.conn
                for cmid in [c for c in self.pending if c not in self.inflight][: self.load.sends_per_tick]:
                    # Each write yields to the loop (Tornado wraps it in a task), and `run` may see the socket
                    # drop meanwhile and clear `inflight`: a cmid marked in flight after that clear was never
                    # on a live socket, would never be sent again, and `finish` would wait for it in vain.
                    if self.conn is not conn or not self.ready.is_set():
                        break  # the rest go after the resume
                    self.inflight.add(cmid)
                    frame = {"type": "send", "room_id": self.room, "content": cmid, "client_msg_id": cmid, "id": cmid}
                    self.load.writes[cmid] = (time.monotonic(), self.worker, self.instance)
                    try:
                        await conn.write_message(json.dumps(frame))
                    except Exception:  # dropped: sent again after the resume
                        if self.conn is not conn:  # `run` already cleared `inflight` for the dropped socket
                            self.inflight.discard(cmid)
            await asyncio.sleep(self.load.interval_s)

    async def write(self, frame: dict[str, Any]) -> None:
        """A frame of the scenario's own (edit, delete, ping, join) on the current socket."""
        assert self.conn is not None, "not connected"
        await self.conn.write_message(json.dumps(frame))


class ChatLoad:
    def __init__(self, urls: list[str], database_url: str, tag: str, interval_s: float = 1.0) -> None:
        self.urls = urls
        self.database_url = database_url
        self.tag = tag
        self.interval_s = interval_s
        self.sends_per_tick = 5  # the new message and the oldest unanswered ones: a backlog drains in steps
        self.members: list[Member] = []
        self.stop_sending = False
        self.finished = False
        self.errors: Counter[str] = Counter()
        self.conflicts = 0
        self.ack_at: dict[tuple[int, int], float] = {}
        # Latencies: cmid -> (last written at, sender's worker, sender's instance); (written at, latency) of
        # acks and of live deliveries (where: SAME_WORKER, SAME_INSTANCE, OTHER_INSTANCE, or "unknown").
        self.writes: dict[str, tuple[float, int | None, int | None]] = {}
        self.ack_samples: list[tuple[float, float]] = []
        self.delivery_samples: list[tuple[float, float, str]] = []
        self._tasks: list[asyncio.Task[None]] = []

    def add(self, user: User, room: int, home: int, follow: bool = True, sending: bool = True) -> Member:
        member = Member(self, user, room, home, follow, sending)
        self.members.append(member)
        return member

    async def start(self, timeout_s: float = 60) -> None:
        """Connect and join every member (in batches), then start sending."""
        for i in range(0, len(self.members), 25):
            batch = self.members[i : i + 25]
            self._tasks += [asyncio.ensure_future(m.run()) for m in batch]
            await asyncio.wait_for(asyncio.gather(*(m.ready.wait() for m in batch)), timeout_s)
        self._tasks += [asyncio.ensure_future(m.send_loop()) for m in self.members]

    def locate_workers(self, workers: dict[int, list[int]]) -> int:
        """Which worker holds each socket: ``workers`` maps a server port to its worker pids.

        The server side of each established connection on that port names the client's port; the
        members' sockets are matched by their own local port.  A socket that reconnects later is unknown
        again.  Returns how many sockets were located.
        """
        by_client_port: dict[int, int] = {}
        for port, pids in workers.items():
            for pid in pids:
                with contextlib.suppress(psutil.Error):
                    for c in psutil.Process(pid).net_connections(kind="tcp"):
                        if c.status == psutil.CONN_ESTABLISHED and c.laddr and c.laddr.port == port and c.raddr:
                            by_client_port[c.raddr.port] = pid
        located = 0
        for m in self.members:
            stream = m.conn.stream if m.conn is not None else None
            sock = getattr(stream, "socket", None)
            if sock is None:
                continue
            m.worker = by_client_port.get(sock.getsockname()[1])
            located += m.worker is not None
        return located

    def delivered(self, receiver: Member, f: dict[str, Any], now: float) -> None:
        """A live delivery of another member's message: its latency from the send's last write."""
        if f.get("sender_id") == receiver.user.id:
            return  # the sender's own echo
        written = self.writes.get(str(f.get("client_msg_id")))
        if written is None:
            return
        at, worker, instance = written
        if receiver.worker is not None and worker is not None:
            where = SAME_WORKER if receiver.worker == worker else SAME_INSTANCE
        else:
            where = "unknown"
        if instance is not None and receiver.instance is not None and receiver.instance != instance:
            where = OTHER_INSTANCE
        self.delivery_samples.append((at, now - at, where))

    def retire(self, member: Member, cut: int) -> None:
        """From now on the scenario acts on ``member`` (see the module docstring); accounted up to ``cut``."""
        assert not member.pending, "a retired member's sends must all be acked first"
        member.sending = False
        member.follow = False
        member.cut = cut
        member.retired_at = time.monotonic()

    async def rejoin_storm(self, repeats: int, timeout_s: float = 20) -> int:
        """Every connected socket sends ``join`` of its room ``repeats`` times back to back (``since_seq`` =
        its last contiguous seq); returns how many joins were sent.  Waits (bounded) for every answer."""
        sent = 0
        for m in self.members:
            if m.conn is None or not m.ready.is_set() or m.retired_at is not None:
                continue
            since = m.contiguous
            for k in range(repeats):
                with contextlib.suppress(Exception):  # a dropped socket: its reconnect joins anyway
                    await m.join(since, f"r{random.getrandbits(32)}-{k}")
                    sent += 1
        deadline = time.monotonic() + timeout_s
        while any(m._joins for m in self.members if m.conn is not None) and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        return sent

    def _until_delivered(self, upto: dict[int, int]) -> bool:
        """Every member still in the load (not a bystander, not retired) has its room's seqs up to ``upto``."""
        return all(m.contiguous >= upto.get(m.room, 0) for m in self.members if m.follow)

    def _acked_upto(self) -> dict[int, int]:
        """Each room's highest acked seq so far."""
        upto: dict[int, int] = {}
        for room, seq in list(self.ack_at):
            upto[room] = max(upto.get(room, 0), seq)
        return upto

    async def _until(self, check: Callable[[], bool], deadline: float) -> bool:
        while not check():
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(0.05)
        return True

    async def warmed_up(self, rounds: int = 1, timeout_s: float = 10) -> bool:
        """Wait (bounded) until the load runs: each sending member has ``rounds`` sends acked, and every member
        has received each room's messages acked by then.  Whether it did."""
        deadline = time.monotonic() + timeout_s
        senders = [m for m in self.members if m.follow and m.sending]
        if not await self._until(lambda: all(len(m.acked) >= rounds for m in senders), deadline):
            return False
        upto = self._acked_upto()
        return await self._until(lambda: self._until_delivered(upto), deadline)

    async def recovered(self, timeout_s: float = 5) -> bool:
        """Wait (bounded) until the load is back to normal after a fault: every send unanswered now is acked,
        then a fresh send of each sending member, written after those, is acked as well, and every member has
        received each room's messages acked by then (reconnected and resumed if it was dropped).  Whether it
        was; the report's ``recover_s`` still measures the last late delivery, error or reconnect."""
        deadline = time.monotonic() + timeout_s
        members = [m for m in self.members if m.follow]
        unanswered = {id(m): list(m.pending) for m in members}
        if not await self._until(lambda: all(c in m.acked for m in members for c in unanswered[id(m)]), deadline):
            return False
        senders = [m for m in members if m.sending]
        fresh = {id(m): f"{self.tag}-{m.user.id}-{m.sent + 1}" for m in senders}
        if not await self._until(lambda: all(fresh[id(m)] in m.acked for m in senders), deadline):
            return False
        upto = self._acked_upto()
        return await self._until(lambda: self._until_delivered(upto), deadline)

    async def finish(self, timeout_s: float = 90) -> None:
        """Stop new sends; wait until every send is answered with an ack (bounded)."""
        self.stop_sending = True
        deadline = time.monotonic() + timeout_s
        while any(m.pending for m in self.members if m.follow) and time.monotonic() < deadline:
            await asyncio.sleep(0.2)

    def stored(self) -> list[tuple[int, int, str | None]]:
        rooms = sorted({m.room for m in self.members})
        with psycopg.connect(self.database_url) as conn:
            rows = conn.execute(
                "SELECT room_id, seq, client_msg_id FROM messages WHERE room_id = ANY(%s)", (rooms,)
            ).fetchall()
        return [(int(r), int(s), None if c is None else str(c)) for r, s, c in rows]

    def last_seq(self, room: int) -> int:
        with psycopg.connect(self.database_url) as conn:
            row = conn.execute("SELECT last_seq FROM rooms WHERE id = %s", (room,)).fetchone()
        return int(row[0]) if row else 0

    async def report(self, scenario: str, fault_end: float, fault_s: float) -> Report:
        """Settle, resume every socket that misses something, then compare with Postgres."""
        # Live deliveries and the repair loop catch up: until every member still in the load, or retired, has
        # every stored seq of its room (up to its cut), 3 s at most; at least SETTLE_MIN_S for a late repeat.
        start = time.monotonic()
        rows = self.stored()
        seqs_by_room: dict[int, set[int]] = {}
        for room, seq, _ in rows:
            seqs_by_room.setdefault(room, set()).add(seq)

        tops = {room: max(seqs) for room, seqs in seqs_by_room.items()}

        def has_all(m: Member) -> bool:
            top = tops.get(m.room, 0) if m.cut is None else m.cut
            return m.contiguous >= top or all(s in m.got for s in seqs_by_room.get(m.room, ()) if s <= top)

        def caught_up() -> bool:
            return all(has_all(m) for m in self.members if m.follow or m.cut is not None)

        await self._until(caught_up, start + 3)
        await asyncio.sleep(max(0.0, start + SETTLE_MIN_S - time.monotonic()))
        rows = self.stored()
        by_room: dict[int, set[int]] = {}
        for room, seq, _ in rows:
            by_room.setdefault(room, set()).add(seq)

        def expected(m: Member) -> set[int]:
            seqs = by_room.get(m.room, set())
            return seqs if m.cut is None else {s for s in seqs if s <= m.cut}

        live_members = [m for m in self.members if m.follow]
        retired = [m for m in self.members if m.cut is not None]
        accounted = live_members + retired  # not the bystanders (see send_loop)
        missed_connected = sum(
            len(expected(m) - set(m.got))
            for m in accounted
            if m.cut is not None or (not m.dropped and m.conn is not None)
        )
        self.finished = True  # no more reconnects: the final resume is done on the sockets as they are
        resumed = []
        for m in live_members:
            if expected(m) - set(m.got) and m.conn is not None:
                m.joined_upto = 1 << 62
                await m.join(m.contiguous, f"final{m.user.id}", reset=True)
                resumed.append(m)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.gather(*(m.ready.wait() for m in resumed)), 10)
        await asyncio.sleep(1 if resumed else 0)
        acked = {cmid: seq for m in self.members for cmid, seq in m.acked.items()}
        stored_cmids = Counter(c for _, _, c in rows if c is not None)
        report = Report(scenario, len(self.members))
        report.sent = sum(m.sent for m in self.members)
        report.acked = len(acked)
        report.stored = sum(stored_cmids.values())
        report.system = len(rows) - report.stored
        report.lost = sum(1 for cmid in acked if cmid not in stored_cmids)
        report.duplicated = (
            sum(m.dups for m in self.members) + sum(n - 1 for n in stored_cmids.values() if n > 1) + self.conflicts
        )
        report.early = sum(m.early for m in self.members)
        report.out_of_order = sum(m.disorder for m in self.members)
        report.replayed_again = sum(m.replayed_again for m in self.members)
        report.missed_while_connected = missed_connected
        bad: list[float] = []
        for m in accounted:
            report.never_delivered += len(expected(m) - set(m.got))
            for seq, (at, live) in m.got.items():
                if m.cut is not None and seq > m.cut:
                    report.excluded_receipts += 1
                    continue
                if live:
                    report.delivered_live += 1
                else:
                    report.recovered_by_resume += 1
                acked_at = self.ack_at.get((m.room, seq))
                if live and acked_at is not None:
                    report.max_late_s = max(report.max_late_s, at - acked_at)
                if not live or (acked_at is not None and at - acked_at > LATE_S):
                    bad.append(at)
            bad += [b for b in m.bad_at if m.retired_at is None or b < m.retired_at]
            report.reconnects += m.reconnects
            for at, code, reason in m.closes:
                if m.retired_at is None or at < m.retired_at:
                    report.closes[f"{code} {reason}"] = report.closes.get(f"{code} {reason}", 0) + 1
        report.errors = dict(self.errors)
        report.fault_s = fault_s
        report.recover_s = max([0.0, *(b - fault_end for b in bad)])
        self._latencies(report, fault_end - fault_s, fault_end)
        calm = Report(scenario, 0)
        self._latencies(calm, fault_end - fault_s - 2.5, fault_end - fault_s)
        report.calm_ack_p99_ms, report.calm_delivery_p99_ms = calm.ack_p99_ms, calm.delivery_p99_ms
        for task in self._tasks:
            task.cancel()
        for m in self.members:
            if m.conn is not None:
                m.conn.close()
        return report

    def _latencies(self, report: Report, start: float, end: float) -> None:
        """Acks and live deliveries of the sends last written between ``start`` and ``end``."""
        acks = [lat * 1000 for at, lat in self.ack_samples if start <= at <= end]
        report.acks_in_fault = len(acks)
        report.ack_p50_ms, report.ack_p99_ms = percentile(acks, 50), percentile(acks, 99)
        report.ack_max_ms = max(acks, default=0.0)
        by_where: dict[str, list[float]] = {}
        for at, lat, where in self.delivery_samples:
            if start <= at <= end:
                by_where.setdefault(where, []).append(lat * 1000)
        for where in (SAME_WORKER, SAME_INSTANCE, OTHER_INSTANCE, "unknown"):
            if where in by_where:
                report.deliveries_in_fault[where] = len(by_where[where])
                report.delivery_p50_ms[where] = percentile(by_where[where], 50)
                report.delivery_p99_ms[where] = percentile(by_where[where], 99)
        report.located = sum(1 for m in self.members if m.worker is not None)
