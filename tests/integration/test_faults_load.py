"""Faults under a chat load: two instances x two workers, 200 sockets in rooms of 10, one message a second each.

Each scenario injects one fault (tests/faults.py) into the running load
(tests/loadharness.py), lets clients resume, and checks the accounting:
nothing acked is lost, every stored message reaches every member exactly once
per socket (a socket that stayed connected gets everything live, by the repair
loop if pub/sub failed), in order, nothing newer than a join's ``last_seq``
before its ``joined``, every send is answered and eventually acked.  Each report line is printed
(``pytest -s``) and, with ``RELIABILITY_REPORT=<file>``, appended as JSON for
docs/RELIABILITY.md.  Besides the faults proper: revocations while PUBLISH is
refused, a rejoin storm and edit/delete races, each under the same load and
accounting, with checks and figures of their own.

The instances run on a Postgres and a Valkey of this module alone, so pausing
or killing them disturbs no other test.  ``long``: variants CI does not run.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import signal
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import psutil
import pytest

from chatd.process.embedded import EmbeddedPostgres, EmbeddedValkey
from chatd.storage import migrations
from tests.chat import API, make_room
from tests.faults import kill_valkey, paused, publish_refused, stopped, valkey_pid
from tests.loadharness import SAME_WORKER, ChatLoad, Member, Report
from tests.support import Chatd, request
from tests.users import PASSWORD, make_users

pytestmark = [pytest.mark.reliability, pytest.mark.slow, pytest.mark.serial]

SOCKETS = int(os.environ.get("RELIABILITY_SOCKETS", "200"))
ROOM_SIZE = 10
PRESENCE = {"CHATD_WS_PRESENCE_TTL_S": "3", "CHATD_WS_PRESENCE_GRACE_S": "0.5"}


@dataclass
class Cluster:
    pg: EmbeddedPostgres
    database_url: str
    valkey: EmbeddedValkey
    redis_url: str
    servers: list[Chatd]

    def ensure_running(self) -> None:
        """A scenario that killed or stopped an instance leaves it for the next one to restart."""
        for server in self.servers:
            assert server.proc is not None
            if server.proc.poll() is not None:
                server._log.close()
                server.start()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    root = tmp_path_factory.mktemp("faults")
    pg = EmbeddedPostgres(root / "pg")
    database_url = pg.start()
    migrations.apply(database_url)
    valkey = EmbeddedValkey(root / "valkey")
    redis_url = valkey.start()
    env = {
        "CHATD_STORAGE_REDIS_KEY_PREFIX": "faults:",
        "CHATD_STORAGE_PG_QUERY_TIMEOUT_S": "2",
        "CHATD_WS_PROBE_INTERVAL_S": "0.5",
        "CHATD_ASSISTANT_EMBEDDER": "none",
        "CHATD_WS_SEND_RATE_COUNT": "100",  # 10/s: room for a client's backlog of retries after a fault
        **PRESENCE,
    }
    servers = [Chatd(database_url, redis_url, root / f"chatd-{i}.log", workers=2, env=env) for i in range(2)]
    try:
        for server in servers:
            server.start()
        yield Cluster(pg, database_url, valkey, redis_url, servers)
    finally:
        for server in servers:
            server.stop()
        valkey.stop()
        pg.stop()


Fault = Callable[[Cluster, ChatLoad], Awaitable[None]]
Setup = Callable[[Cluster, ChatLoad], Awaitable[None]]


async def run_scenario(
    cluster: Cluster,
    name: str,
    fault: Fault,
    bystanders: int = 0,
    setup: Setup | None = None,
    record: bool = True,
    rounds: int = 1,
    watch: Callable[[ChatLoad], bool] | None = None,
    watch_s: float = 0.0,
) -> tuple[Report, ChatLoad]:
    """The load, ``fault`` in the middle of it, the report.

    ``setup``: runs once the members are added, before they connect (add sockets, swap a member's token).
    ``record``: print (and append) the report line here; a scenario with figures of its own adds them to
    ``report.notes`` and calls ``_record`` itself.
    Before the fault the load runs until each sender has ``rounds`` sends acked and delivered (10 s at most);
    after it, until it has recovered (``ChatLoad.recovered``: what was unanswered acked, a fresh round acked
    and delivered), 5 s at most, and ``watch`` holds, if given (``watch_s`` after the fault's end at most).
    The members are ``load.members[:SOCKETS]`` in room order: member ``i`` is in room ``i // ROOM_SIZE`` (member
    ``i % ROOM_SIZE == 0`` created it) on instance ``i % 2``.
    """
    cluster.ensure_running()
    log_from = [s.log_path.stat().st_size for s in cluster.servers]
    users = make_users(cluster.database_url, SOCKETS + bystanders)
    chatters, extra = users[:SOCKETS], users[SOCKETS:]
    rooms = [
        await make_room(cluster.servers[0], chatters[i], chatters[i + 1 : i + ROOM_SIZE] + (extra if i == 0 else []))
        for i in range(0, SOCKETS, ROOM_SIZE)
    ]
    load = ChatLoad([s.ws for s in cluster.servers], cluster.database_url, tag=uuid.uuid4().hex[:8])
    for i, user in enumerate(chatters):
        load.add(user, rooms[i // ROOM_SIZE], home=i % 2)
    for user in extra:  # on instance 0, never reconnecting: for the presence check
        load.add(user, rooms[0], home=0, follow=False)
    if setup is not None:
        await setup(cluster, load)
    await load.start()
    load.locate_workers({s.port: s.worker_pids() for s in cluster.servers})
    await load.warmed_up(rounds)  # not asserted: as a fixed 3 s was not; the scenario checks what it needs
    started = time.monotonic()
    await fault(cluster, load)
    fault_end = time.monotonic()
    await load.recovered(RECOVER_BOUND_S)  # not asserted here: the report's recover_s is
    if watch is not None:
        await until(lambda: watch(load), fault_end + watch_s - time.monotonic())
    await load.finish()
    report = await load.report(name, fault_end, fault_end - started)
    report.server_errors = _error_events(cluster.servers, log_from)
    if record:
        _record(report)
    return report, load


async def until(check: Callable[[], bool], timeout_s: float) -> bool:
    """Poll ``check`` until it holds or ``timeout_s`` passed; whether it held."""
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.05)
    return True


def _error_events(servers: list[Chatd], log_from: list[int]) -> dict[str, int]:
    """``event`` of each error line the servers logged since ``log_from`` (their logs' sizes then)."""
    counts: dict[str, int] = {}
    for server, offset in zip(servers, log_from, strict=True):
        with server.log_path.open("rb") as log:
            log.seek(offset)
            for line in log.read().decode(errors="replace").splitlines():
                if line.startswith("{") and ('"level": "error"' in line or '"level": "critical"' in line):
                    with contextlib.suppress(ValueError):
                        event = str(json.loads(line).get("event"))
                        counts[event] = counts.get(event, 0) + 1
    return counts


def _record(report: Report) -> None:
    print(f"\nFAULT-REPORT {report.line()}")
    if os.environ.get("RELIABILITY_REPORT"):
        with Path(os.environ["RELIABILITY_REPORT"]).open("a") as out:
            out.write(report.json() + "\n")


RECOVER_BOUND_S = 5.0  # RELIABILITY.md: every late delivery, error and reconnect ends within this after the fault


def assert_clean(report: Report) -> None:
    assert report.acked > 0 and report.acked == report.sent == report.stored, report.line()
    assert (report.lost, report.never_delivered, report.duplicated) == (0, 0, 0), report.line()
    assert report.missed_while_connected == 0, report.line()
    assert (report.early, report.out_of_order) == (0, 0), report.line()
    assert report.recover_s <= RECOVER_BOUND_S, report.line()


# -- Valkey ---------------------------------------------------------------------------------------


async def test_valkey_killed_and_restarted(cluster: Cluster) -> None:
    async def fault(c: Cluster, load: ChatLoad) -> None:
        kill_valkey(c.valkey)
        await asyncio.sleep(2)
        c.valkey.start()  # same socket path: the instances reconnect

    report, _ = await run_scenario(cluster, "Valkey killed, restarted after 2 s", fault)
    assert_clean(report)


async def test_valkey_paused_10s(cluster: Cluster) -> None:
    async def fault(c: Cluster, load: ChatLoad) -> None:
        with stopped([valkey_pid(c.valkey)]):
            await asyncio.sleep(10)

    report, _ = await run_scenario(cluster, "Valkey paused 10 s", fault)
    assert_clean(report)
    # Commits and acks do not wait for Redis (the publish queue, chatd/realtime/outbox.py). Bound: 100 ms
    # (issue 17); 2.5x that for a loaded CI machine. Measured by this process, its own lag included.
    assert report.acks_in_fault > 1000, report.line()
    assert report.ack_p99_ms < 250, report.line()
    # Same-worker delivery is reported, not bounded: in these rooms every worker's messages interleave with
    # the other workers', and a worker releases a room's messages in seq order only, so a local message
    # waits behind the previous seq of another worker, which Redis does not bring: it is read from Postgres
    # after ws.gap_timeout_ms (250 ms). test_slow_broker.py bounds it for a room whose traffic is local.
    assert report.deliveries_in_fault.get(SAME_WORKER, 0) > 500, report.line()


async def test_publish_refused(cluster: Cluster) -> None:
    async def fault(c: Cluster, load: ChatLoad) -> None:
        with publish_refused(c.redis_url):
            await asyncio.sleep(3)

    report, _ = await run_scenario(cluster, "PUBLISH refused 3 s (ACL)", fault)
    assert_clean(report)


# -- Postgres -------------------------------------------------------------------------------------


async def _pg_paused(cluster: Cluster, seconds: float) -> Report:
    async def fault(c: Cluster, load: ChatLoad) -> None:
        with paused(c.pg):
            await asyncio.sleep(seconds)

    report, _ = await run_scenario(cluster, f"Postgres paused {seconds:g} s", fault)
    return report


async def test_postgres_paused_10s(cluster: Cluster) -> None:
    report = await _pg_paused(cluster, 10)
    assert_clean(report)
    assert report.errors.get("unavailable", 0) > 0, report.line()  # the sends during the pause were refused...


async def test_postgres_paused_30s(cluster: Cluster) -> None:
    report = await _pg_paused(cluster, 30)
    assert_clean(report)


@pytest.mark.long
@pytest.mark.parametrize("seconds", [60, 120])
async def test_postgres_paused_long(cluster: Cluster, seconds: float) -> None:
    report = await _pg_paused(cluster, seconds)
    assert_clean(report)


@pytest.mark.long
async def test_valkey_paused_60s(cluster: Cluster) -> None:
    async def fault(c: Cluster, load: ChatLoad) -> None:
        with stopped([valkey_pid(c.valkey)]):
            await asyncio.sleep(60)

    report, _ = await run_scenario(cluster, "Valkey paused 60 s", fault)
    assert_clean(report)


# -- processes ------------------------------------------------------------------------------------


async def test_worker_sigkilled(cluster: Cluster) -> None:
    async def fault(c: Cluster, load: ChatLoad) -> None:
        pids = c.servers[0].worker_pids()
        assert len(pids) == 2, pids
        # The workers share one listening socket, and a busy machine may hand most (even all) of the instance's
        # sockets to one of them: the victim is the one holding more, so `reconnects > 0` below tests recovery,
        # not which worker the kernel happened to favour.
        held = {pid: _sockets_on(pid, c.servers[0].port) for pid in pids}
        print(f"\nsockets per worker before the kill: {held}")
        os.kill(max(pids, key=held.__getitem__), signal.SIGKILL)

    report, _ = await run_scenario(cluster, "a worker SIGKILLed", fault)
    assert_clean(report)
    assert report.reconnects > 0, report.line()
    deadline = time.monotonic() + 30
    while len(cluster.servers[0].worker_pids()) < 2 and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
    assert len(cluster.servers[0].worker_pids()) == 2  # the master replaced it


def _sockets_on(pid: int, port: int) -> int:
    """Established TCP connections of process ``pid`` on local ``port``."""
    return sum(
        1
        for c in psutil.Process(pid).net_connections(kind="tcp")
        if c.status == psutil.CONN_ESTABLISHED and c.laddr and c.laddr.port == port
    )


async def test_instance_sigkilled(cluster: Cluster) -> None:
    killed_at: list[float] = []

    async def fault(c: Cluster, load: ChatLoad) -> None:
        assert c.servers[0].proc is not None
        os.killpg(c.servers[0].proc.pid, signal.SIGKILL)  # master and workers, without a goodbye
        killed_at.append(time.monotonic())

    def watchers(load: ChatLoad) -> list[Member]:
        return [m for m in load.members if m.follow and m.room == load.members[-1].room and m.home == 1]

    def offline(load: ChatLoad) -> dict[int, float | None]:
        return {
            uid: min(
                (at for w in watchers(load) for at, u, status in w.presence if u == uid and status == "offline"),
                default=None,
            )
            for uid in (m.user.id for m in load.members if not m.follow)
        }

    ttl_s, grace_s = float(PRESENCE["CHATD_WS_PRESENCE_TTL_S"]), float(PRESENCE["CHATD_WS_PRESENCE_GRACE_S"])
    report, load = await run_scenario(
        cluster,
        "an instance SIGKILLed",
        fault,
        bystanders=2,
        watch=lambda load: None not in offline(load).values(),  # the load runs on until both are seen offline
        watch_s=ttl_s + grace_s + 3.5,
    )
    assert_clean(report)
    offline_at = offline(load)
    late = {u: at for u, at in offline_at.items() if at is None or at - killed_at[0] > ttl_s + grace_s + 3}
    shown = {u: None if at is None else round(at - killed_at[0], 1) for u, at in offline_at.items()}
    print(f"offline after the kill (s): {shown}")
    assert not late, f"users of the killed instance not offline within presence_ttl_s + grace: {offline_at}"


async def test_sigterm_under_load(cluster: Cluster) -> None:
    codes: list[int | None] = []

    async def fault(c: Cluster, load: ChatLoad) -> None:
        server = c.servers[0]
        assert server.proc is not None
        server.signal(signal.SIGTERM)
        codes.append(await asyncio.to_thread(server.proc.wait, 40))

    report, _ = await run_scenario(cluster, "SIGTERM of an instance under load", fault)
    assert codes == [0]
    assert_clean(report)


# -- revocations while PUBLISH is refused -----------------------------------------------------------

PROMISE_S = 2.0  # a removed member reads nothing of the room later than this after the 204 (PROTOCOL.md §3 leave)
CLOSE_WITHIN_S = 2.5  # a banned or logged-out socket is closed within this (the 2 s promise + slack)


async def test_removal_ban_and_logout_while_publish_is_refused(cluster: Cluster) -> None:
    """Two members removed from their room, two users banned, two sessions logged out, all on instance 0
    while the victims' sockets are on instance 1 and every PUBLISH is refused (ACL): the kicks and the
    closes come from the revocation log alone (sql/0013, chatd/services/revocations.py).

    The victims stop sending and have every send acked before the action; they are accounted up to the
    room's last seq just before the refusal (they had all of it: waited for), and what they receive later
    is checked here instead: nothing of the room later than 2 s after the 204 for a removed member, a close
    within 2.5 s for the others.  The other 194 sockets keep the full accounting.
    """
    if SOCKETS < 7 * ROOM_SIZE:
        pytest.skip("needs 7 rooms")
    victims: dict[str, list[Member]] = {}
    answered_at: dict[int, float] = {}  # victim's user id -> when the action was answered

    async def setup(c: Cluster, load: ChatLoad) -> None:
        # Members 1 of rooms 1..6: on instance 1 (odd index); the actors act on instance 0.
        pick = [load.members[r * ROOM_SIZE + 1] for r in range(1, 7)]
        victims.update({"removed": pick[0:2], "banned": pick[2:4], "logged out": pick[4:6]})
        for m in victims["logged out"]:  # a real session (a refresh family), ended by its own logout
            r = await request(
                "POST", f"{c.servers[0].http}{API}/auth/login", {"email": m.user.email, "password": PASSWORD}
            )
            assert r.status == 200, r.body
            m.user = replace(m.user, token=r.body["access_token"])

    async def act(c: Cluster, load: ChatLoad, admin_token: str, kind: str, m: Member) -> None:
        base = f"{c.servers[0].http}{API}"
        if kind == "removed":
            owner = load.members[load.members.index(m) // ROOM_SIZE * ROOM_SIZE]
            r = await request("DELETE", f"{base}/rooms/{m.room}/members/{m.user.id}", None, owner.user.token)
            assert r.status == 204, r.body
        elif kind == "banned":
            r = await request("POST", f"{base}/admin/users/{m.user.id}/ban", {}, admin_token)
            assert r.status == 200, r.body
        else:
            r = await request("POST", f"{base}/auth/logout", None, m.user.token)
            assert r.status == 204, r.body
        answered_at[m.user.id] = time.monotonic()

    async def fault(c: Cluster, load: ChatLoad) -> None:
        (admin,) = make_users(c.database_url, 1, role="admin")
        everyone = [m for ms in victims.values() for m in ms]
        for m in everyone:
            m.sending = False
        assert await until(lambda: not any(m.pending for m in everyone), 10), "the victims' sends not all acked"
        cuts = {m.user.id: load.last_seq(m.room) for m in everyone}
        assert await until(lambda: all(m.contiguous >= cuts[m.user.id] for m in everyone), 5), [
            (m.contiguous, cuts[m.user.id]) for m in everyone
        ]
        assert all(m.conn is not None and m.instance == 1 for m in everyone), "a victim is not on instance 1"
        for m in everyone:
            load.retire(m, cuts[m.user.id])
        with publish_refused(c.redis_url):
            await asyncio.gather(*(act(c, load, admin.token, kind, m) for kind, ms in victims.items() for m in ms))
            last = max(answered_at.values())
            closing = victims["banned"] + victims["logged out"]
            await until(lambda: all(m.closes for m in closing), CLOSE_WITHIN_S + 1)
            await asyncio.sleep(max(0.0, last + PROMISE_S + 0.5 - time.monotonic()))  # still refused past 2 s
        # Publishing works again; the load runs on until it has recovered (every sender's fresh message acked and
        # delivered to its room, 5 s at most), the removed members must still read nothing.

    report, _ = await run_scenario(
        cluster, "removal, ban and logout while PUBLISH is refused", fault, setup=setup, record=False
    )
    figures: dict[str, list[str]] = {}
    failures: list[Any] = []
    for kind, ms in victims.items():
        for m in ms:
            acted = answered_at[m.user.id]
            if kind == "removed":
                left = [round(at - acted, 2) for at in m.left_at]
                late = [(round(at - acted, 2), seq) for at, seq in m.after_retirement if at > acted + PROMISE_S]
                last_msg = max((at - acted for at, _ in m.after_retirement), default=None)
                figures.setdefault(kind, []).append(
                    f"left +{left[0] if left else None} s, last message"
                    f" {'none' if last_msg is None else f'{last_msg:+.2f} s'}"
                )
                if not left or late or m.closes:
                    failures.append((kind, m.user.id, left, late, m.closes))
            else:
                closes = [(round(at - acted, 2), code, reason) for at, code, reason in m.closes]
                figures.setdefault(kind, []).append(
                    f"{closes[0][1]} '{closes[0][2]}' +{closes[0][0]} s" if closes else "not closed"
                )
                want = 1008 if kind == "banned" else 4001
                if not closes or closes[0][1] != want or closes[0][0] > CLOSE_WITHIN_S:
                    failures.append((kind, m.user.id, closes))
    report.notes = {kind: ", ".join(f) for kind, f in figures.items()}
    report.notes["excluded"] = "the victims' receipts after their cut"
    _record(report)
    assert not failures, failures
    assert_clean(report)
    assert report.system == 2, report.line()  # the two member_left messages


# -- rejoin storm ---------------------------------------------------------------------------------

REJOIN_WAVES = 3
REJOINS_PER_WAVE = 3


async def test_rejoin_storm_under_load(cluster: Cluster) -> None:
    """Every socket sends ``join`` of its room three times back to back (``since_seq`` = its last seq),
    in three waves a second apart, while the load runs.  Each socket's stream is checked by the harness:
    after each ``joined`` the replay it asked for, in order, then live messages, each once; nothing above a
    join's ``last_seq`` before its ``joined`` (a frame below it may have been on its way before the server
    read the join: not attributable from outside; ``test_rejoin.py`` checks that case with a lock)."""
    sent: list[int] = []
    answered: list[int] = []
    took: list[float] = []

    async def fault(c: Cluster, load: ChatLoad) -> None:
        for wave in range(REJOIN_WAVES):
            if wave:
                await asyncio.sleep(1)
            before = sum(m.joins_answered for m in load.members)
            started = time.monotonic()
            sent.append(await load.rejoin_storm(REJOINS_PER_WAVE))
            took.append(time.monotonic() - started)
            answered.append(sum(m.joins_answered for m in load.members) - before)

    report, load = await run_scenario(cluster, "rejoin storm", fault, record=False)
    errors = [code for m in load.members for code in m.join_errors]
    report.notes = {
        "rejoins": f"{sum(sent)} sent, {sum(answered)} joined, {len(errors)} refused",
        "waves answered within": "/".join(f"{t:.2f}" for t in took) + " s",
    }
    _record(report)
    assert_clean(report)
    assert report.reconnects == 0, report.line()
    assert not errors, errors
    assert sum(answered) == sum(sent) == SOCKETS * REJOIN_WAVES * REJOINS_PER_WAVE, (answered, sent)
    assert report.replayed_again > 0, report.line()  # the storm did overlap live traffic


# -- edit/delete races ----------------------------------------------------------------------------


async def test_edit_and_delete_races_under_load(cluster: Cluster) -> None:
    """Two authors per room get a second socket (on the other instance); each author's two sockets then
    race, at once, ``delete`` against ``edit`` of one of its messages and ``delete`` against ``delete`` of
    another (80 messages).  Every raced message ends a tombstone (REST), the delete of a delete/edit pair
    is never refused, exactly one of two deletes is refused ``conflict``, and every socket of the room gets
    one ``message_deleted`` per message and no ``message_updated`` after it (one before it iff the edit
    was applied)."""
    twins: dict[int, tuple[Member, Member]] = {}  # author id -> (its load socket, its second socket)
    races: list[dict[str, Any]] = []

    async def setup(c: Cluster, load: ChatLoad) -> None:
        for r in range(SOCKETS // ROOM_SIZE):
            for k in (2, 3):
                author = load.members[r * ROOM_SIZE + k]
                twins[author.user.id] = (author, load.add(author.user, author.room, 1 - author.home, sending=False))

    async def fault(c: Cluster, load: ChatLoad) -> None:
        writes = []
        for n, (author, twin) in enumerate(twins.values()):
            assert len(author.message_ids) >= 2, "an author without two acked messages"
            (cmid_e, mid_e), (cmid_d, mid_d) = list(author.message_ids.items())[-2:]
            deleter, editor = (author, twin) if n % 2 == 0 else (twin, author)
            race_e = {"room": author.room, "seq": author.acked[cmid_e], "message_id": mid_e, "kind": "delete/edit"}
            race_e["ids"] = {"delete": f"d-{mid_e}", "edit": f"e-{mid_e}"}
            race_e["by"] = {"delete": _where(deleter), "edit": _where(editor)}
            race_d = {"room": author.room, "seq": author.acked[cmid_d], "message_id": mid_d, "kind": "delete/delete"}
            race_d["ids"] = {"first": f"d1-{mid_d}", "second": f"d2-{mid_d}"}
            races.extend((race_e, race_d))
            writes += [
                (deleter, {"type": "delete", "id": f"d-{mid_e}", "message_id": mid_e}),
                (editor, {"type": "edit", "id": f"e-{mid_e}", "message_id": mid_e, "content": f"edited {cmid_e}"}),
                (author, {"type": "delete", "id": f"d1-{mid_d}", "message_id": mid_d}),
                (twin, {"type": "delete", "id": f"d2-{mid_d}", "message_id": mid_d}),
            ]
        random.shuffle(writes)
        await asyncio.gather(*(m.write(frame) for m, frame in writes))
        sockets = {id(m): m for m, _ in writes}.values()
        for m in sockets:  # frames are handled in order: no error before the pong means the change was applied
            await m.write({"type": "ping", "id": "after-races"})
        assert await until(lambda: all("after-races" in m.pongs for m in sockets), 10), "changes not answered"
        mine = {(race["room"], race["message_id"]) for race in races}

        def told(m: Member) -> int:
            return sum(1 for _, kind, mid in m.changes if kind == "message_deleted" and (m.room, mid) in mine)

        per_room = {race["room"]: sum(1 for r in races if r["room"] == race["room"]) for race in races}
        room_sockets = [m for m in load.members if m.room in per_room]
        await until(lambda: all(told(m) >= per_room[m.room] for m in room_sockets), 10)
        await asyncio.sleep(1)  # anything announced twice would come now
        member_token = {m.room: m.user.token for m in load.members}
        rows = await asyncio.gather(
            *(
                request(
                    "GET",
                    f"{c.servers[i % 2].http}{API}/rooms/{race['room']}/messages?after_seq={race['seq'] - 1}&limit=1",
                    None,
                    member_token[race["room"]],
                )
                for i, race in enumerate(races)
            )
        )
        for race, row in zip(races, rows, strict=True):
            assert row.status == 200, row.body
            race["row"] = row.body["messages"][0]

    report, load = await run_scenario(cluster, "edit/delete races", fault, setup=setup, record=False, rounds=2)
    refused = {rid: code for m in load.members for rid, code in m.refused.items()}
    failures: list[Any] = []
    edits_applied = edits_refused = deletes_refused = 0
    for race in races:
        row = race["row"]
        if row["message_id"] != race["message_id"] or row["deleted"] is not True or row["content"] != "":
            failures.append(("not a tombstone", row))
        ids = race["ids"]
        outcome = {what: refused.get(rid) for what, rid in ids.items()}
        if race["kind"] == "delete/edit":
            race["edit_applied"] = outcome["edit"] is None
            edits_applied += outcome["edit"] is None
            edits_refused += outcome["edit"] == "conflict"
            if outcome["delete"] is not None or outcome["edit"] not in (None, "conflict"):
                failures.append(("delete/edit answers", race["message_id"], outcome))
        elif [outcome["first"], outcome["second"]] in (["conflict", None], [None, "conflict"]):
            deletes_refused += 1
        else:
            failures.append(("two deletes: not exactly one refused", race["message_id"], outcome))
    updated_after: list[Any] = []  # (message, socket, deleted by, edited by): a deleted message shown edited again
    for m in load.members:
        for race in (r for r in races if r["room"] == m.room):
            kinds = [kind for _, kind, mid in m.changes if mid == race["message_id"]]
            want_updates = 1 if race.get("edit_applied") else 0
            if "message_updated" in kinds[kinds.index("message_deleted") + 1 :] if "message_deleted" in kinds else []:
                updated_after.append((race["message_id"], _where(m), race["by"]["delete"], race["by"]["edit"]))
            elif kinds.count("message_deleted") > 1 or kinds.count("message_updated") > want_updates:
                failures.append(("announced twice", m.user.id, race["message_id"], kinds))
            elif not m.dropped and kinds not in (
                ["message_updated"] * want_updates + ["message_deleted"],
                ["message_deleted"],
            ):
                # An applied edit that reached this worker after the delete is not announced: the delete is newer.
                failures.append(("not announced", m.user.id, race["message_id"], kinds))
    pairs = len(races) // 2
    report.notes = {
        "raced": f"{pairs} delete/edit + {pairs} delete/delete",
        "edits": f"{edits_applied} applied before the delete, {edits_refused} refused conflict",
        "double deletes": f"{deletes_refused} with exactly one refused conflict",
        "message_updated after message_deleted": f"{len(updated_after)} (socket, message) pairs",
    }
    _record(report)
    print("updated after deleted (message, socket, deleted by, edited by):", sorted(updated_after))
    assert not failures, failures[:10]
    assert_clean(report)
    # Found by this test on the first version of it (9 of 12 runs): an edit committed just before a delete
    # reached a worker after it and was delivered after it. Each worker now drops a change older than one it
    # delivered for the same message (core/sequencing.py `LatestChange`).
    assert not updated_after, f"message_updated after message_deleted: {updated_after[:5]}"


def _where(m: Member) -> str:
    """``instance/worker pid`` of a member's socket (as located at the start)."""
    return f"{m.instance}/{m.worker}"
