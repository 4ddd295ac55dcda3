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
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

import psycopg
from tornado.httpclient import HTTPRequest
from tornado.websocket import WebSocketClientConnection, websocket_connect

from tests.users import User

LATE_S = 1.0  # a message reaching a member later than this after its ack counts against recovery


@dataclass
class Report:
    scenario: str
    sockets: int
    sent: int = 0  # distinct client_msg_ids sent
    acked: int = 0  # distinct client_msg_ids acknowledged
    stored: int = 0  # rows in Postgres for the load's rooms
    delivered_live: int = 0  # (member, seq) received on a socket as it happened
    recovered_by_resume: int = 0  # (member, seq) received in a join replay after a reconnect
    lost: int = 0  # acked but not stored
    never_delivered: int = 0  # stored (acked) but missing at a member after the final resume
    missed_while_connected: int = 0  # missing at a member whose socket never dropped (before the final resume)
    duplicated: int = 0  # a seq twice on one socket, a client_msg_id stored twice, or acked with two seqs
    errors: dict[str, int] = field(default_factory=dict)  # error codes answered to sends (retried)
    reconnects: int = 0
    recover_s: float = 0.0  # from the fault's end to the last late delivery / error / reconnect
    max_late_s: float = 0.0  # the longest a message took from its ack to a member (live)
    fault_s: float = 0.0

    def line(self) -> str:
        return (
            f"{self.scenario}: {self.sockets} sockets, {self.sent} sent, {self.acked} acked, {self.stored} stored;"
            f" delivered live {self.delivered_live}, recovered by resume {self.recovered_by_resume};"
            f" lost {self.lost}, never delivered {self.never_delivered}, missed while connected"
            f" {self.missed_while_connected}, duplicated {self.duplicated}; errors {self.errors},"
            f" reconnects {self.reconnects}; slowest live delivery {self.max_late_s:.1f} s after its ack;"
            f" recovered {self.recover_s:.1f} s after the fault ({self.fault_s:.1f} s)"
        )

    def json(self) -> str:
        return json.dumps(asdict(self))


class Member:
    def __init__(self, load: ChatLoad, user: User, room: int, home: int, follow: bool = True) -> None:
        self.load = load
        self.user = user
        self.room = room
        self.home = home
        self.follow = follow  # reconnect when dropped (a bystander does not)
        self.conn: WebSocketClientConnection | None = None
        self.ready = asyncio.Event()
        self.sent = 0
        self.pending: dict[str, float] = {}  # cmid -> first sent
        self.inflight: set[str] = set()  # sent on the current connection, not answered yet
        self.retry_at = 0.0  # no send before (retry_after_ms of the last refusal)
        self.acked: dict[str, int] = {}  # cmid -> seq
        self.got: dict[int, tuple[float, bool]] = {}  # seq -> (first received at, live)
        self.contiguous = 0
        self.dups = 0
        self.reconnects = 0
        self.dropped = False  # its socket was dropped at least once
        self.presence: list[tuple[float, int, str]] = []  # (at, user, online|offline)
        self.bad_at: list[float] = []  # errors and reconnects (recovery)
        self.joined_upto = 0  # seqs up to this one on the current socket came from the join replay
        self._conn_seen: set[int] = set()
        self._join_id = ""

    # -- connection ---------------------------------------------------------------------

    async def connect(self, since_seq: int | None) -> bool:
        urls = self.load.urls[self.home :] + self.load.urls[: self.home]
        for url in urls:
            try:
                conn = await websocket_connect(
                    HTTPRequest(url, headers={"Authorization": f"Bearer {self.user.token}"}, request_timeout=5)
                )
            except Exception:
                continue
            self.conn = conn
            self._conn_seen = set()
            self._join_id = f"j{random.getrandbits(32)}"
            frame: dict[str, Any] = {"type": "join", "room_id": self.room, "id": self._join_id}
            if since_seq is not None:
                frame["since_seq"] = since_seq
            self.joined_upto = 1 << 62  # until `joined` says where the replay ends
            await conn.write_message(json.dumps(frame))
            return True
        return False

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
            seq = int(f["seq"])
            if seq in self._conn_seen:
                self.dups += 1
                return
            self._conn_seen.add(seq)
            if seq not in self.got:
                self.got[seq] = (now, seq > self.joined_upto)
                while self.contiguous + 1 in self.got:
                    self.contiguous += 1
        elif kind == "joined" and f.get("reply_to") == self._join_id:
            self.joined_upto = int(f["last_seq"]) if self.reconnects or self.load.finished else 0
            self.ready.set()
        elif kind == "ack" and f.get("client_msg_id") in self.pending:
            cmid = f["client_msg_id"]
            seq = int(f["seq"])
            if self.acked.get(cmid, seq) != seq:
                self.load.conflicts += 1
            self.acked[cmid] = seq
            self.load.ack_at.setdefault((self.room, seq), now)
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
        elif kind == "presence":
            for status in ("online", "offline"):
                for uid in f.get(status, []):
                    self.presence.append((now, uid, status))

    # -- sending --------------------------------------------------------------------------

    async def send_loop(self) -> None:
        if not self.follow:
            # A bystander never reconnects, so a send in flight when its instance dies would stay
            # unanswered and count as sent but not acked. It is there to be seen going offline.
            return
        await asyncio.sleep(random.uniform(0, self.load.interval_s))
        while not self.load.finished and (not self.load.stop_sending or self.pending):
            if self.conn is not None and self.ready.is_set() and time.monotonic() >= self.retry_at:
                if not self.load.stop_sending:
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
                    try:
                        await conn.write_message(json.dumps(frame))
                    except Exception:  # dropped: sent again after the resume
                        if self.conn is not conn:  # `run` already cleared `inflight` for the dropped socket
                            self.inflight.discard(cmid)
            await asyncio.sleep(self.load.interval_s)


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
        self._tasks: list[asyncio.Task[None]] = []

    def add(self, user: User, room: int, home: int, follow: bool = True) -> Member:
        member = Member(self, user, room, home, follow)
        self.members.append(member)
        return member

    async def start(self, timeout_s: float = 60) -> None:
        """Connect and join every member (in batches), then start sending."""
        for i in range(0, len(self.members), 25):
            batch = self.members[i : i + 25]
            self._tasks += [asyncio.ensure_future(m.run()) for m in batch]
            await asyncio.wait_for(asyncio.gather(*(m.ready.wait() for m in batch)), timeout_s)
        self._tasks += [asyncio.ensure_future(m.send_loop()) for m in self.members]

    async def finish(self, timeout_s: float = 90) -> None:
        """Stop new sends; wait until every send is answered with an ack (bounded)."""
        self.stop_sending = True
        deadline = time.monotonic() + timeout_s
        while any(m.pending for m in self.members if m.follow) and time.monotonic() < deadline:
            await asyncio.sleep(0.2)

    def stored(self) -> list[tuple[int, int, str]]:
        rooms = sorted({m.room for m in self.members})
        with psycopg.connect(self.database_url) as conn:
            rows = conn.execute(
                "SELECT room_id, seq, client_msg_id FROM messages WHERE room_id = ANY(%s)", (rooms,)
            ).fetchall()
        return [(int(r), int(s), str(c)) for r, s, c in rows]

    async def report(self, scenario: str, fault_end: float, fault_s: float) -> Report:
        """Settle, resume every socket that misses something, then compare with Postgres."""
        await asyncio.sleep(3)  # live deliveries and the repair loop catch up
        rows = self.stored()
        by_room: dict[int, set[int]] = {}
        for room, seq, _ in rows:
            by_room.setdefault(room, set()).add(seq)
        live_members = [m for m in self.members if m.follow]
        missed_connected = sum(
            len(by_room.get(m.room, set()) - set(m.got)) for m in live_members if not m.dropped and m.conn is not None
        )
        self.finished = True  # no more reconnects: the final resume is done on the sockets as they are
        resumed = []
        for m in live_members:
            if by_room.get(m.room, set()) - set(m.got) and m.conn is not None:
                m.joined_upto = 1 << 62
                m._join_id = f"final{m.user.id}"
                m.ready.clear()
                await m.conn.write_message(
                    json.dumps({"type": "join", "room_id": m.room, "since_seq": m.contiguous, "id": m._join_id})
                )
                resumed.append(m)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.gather(*(m.ready.wait() for m in resumed)), 10)
        await asyncio.sleep(1 if resumed else 0)
        acked = {cmid: seq for m in self.members for cmid, seq in m.acked.items()}
        stored_cmids = Counter(c for _, _, c in rows)
        report = Report(scenario, len(self.members))
        report.sent = sum(m.sent for m in self.members)
        report.acked = len(acked)
        report.stored = len(rows)
        report.lost = sum(1 for cmid in acked if cmid not in stored_cmids)
        report.duplicated = (
            sum(m.dups for m in self.members) + sum(n - 1 for n in stored_cmids.values() if n > 1) + self.conflicts
        )
        report.missed_while_connected = missed_connected
        bad: list[float] = []
        for m in live_members:
            expected = by_room.get(m.room, set())
            report.never_delivered += len(expected - set(m.got))
            for seq, (at, live) in m.got.items():
                if live:
                    report.delivered_live += 1
                else:
                    report.recovered_by_resume += 1
                acked_at = self.ack_at.get((m.room, seq))
                if live and acked_at is not None:
                    report.max_late_s = max(report.max_late_s, at - acked_at)
                if not live or (acked_at is not None and at - acked_at > LATE_S):
                    bad.append(at)
            bad += m.bad_at
            report.reconnects += m.reconnects
        report.errors = dict(self.errors)
        report.fault_s = fault_s
        report.recover_s = max([0.0, *(b - fault_end for b in bad)])
        for task in self._tasks:
            task.cancel()
        for m in self.members:
            if m.conn is not None:
                m.conn.close()
        return report
