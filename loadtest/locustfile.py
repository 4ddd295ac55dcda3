"""Locust load test of chatd: WebSocket chat users (websocket-client under gevent) and REST users.

    locust -f loadtest/locustfile.py --headless -u 1000 -r 200 -t 60s --host http://127.0.0.1:8080
        (against `make run`: no plan yet, so the users come from POST /api/v1/admin/load-test-users,
        which a dev-mode server answers without a token; -u is the total)

    locust -f loadtest/locustfile.py --headless -u 1000 -r 200 -t 60s --host https://staging.example \
        --lt-admin-token "$ADMIN_TOKEN"          (a server not in dev mode: an admin's access token)

    locust -f loadtest/locustfile.py --headless -u 1000 -r 200 -t 60s --host http://127.0.0.1:8080 \
        --lt-prepare sql --lt-database-url "$DATABASE_URL" --lt-jwt-secret "$JWT_SECRET"

or everything in one command (embedded chatd, 1,000 users, stops by itself):

    python loadtest/run_locust.py --users 1000 --duration 60

See loadtest/README.md for the metrics and distributed runs.

How a ``ChatUser`` works:

1. Takes the next user index of the plan (``plan.py``: consecutive indexes
   share a room of ``--lt-room-size``; every 1/``--lt-assistant-share``-th user
   also owns an assistant room).  In distributed mode worker ``w`` of ``W``
   (``--expect-workers``) takes indexes w, w+W, w+2W, ...
2. Authenticates: the plan's minted token, or ``POST /api/v1/auth/login``.
3. Opens ``/ws`` ("ws connect" = until ``hello``), joins its rooms.
4. One receive greenlet reads every frame and resolves the waiters; the
   task greenlet sends a message every ``--lt-send-interval`` s (content =
   ``t=<unix time> ...``) to its group room, and a prompt to its assistant
   room every ``--lt-assistant-interval`` s.
5. Every ``message`` frame goes through a per-room seq check: from the join
   point on each seq must arrive exactly once, in order.  A duplicate, or a
   gap not filled within ``--lt-loss-grace`` s, is a failure ("seq check"),
   so a run with loss is red (exit code 1).
"""

from __future__ import annotations

import itertools
import json
import random
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import gevent
import websocket
from gevent.event import AsyncResult, Event
from locust import FastHttpUser, events, task
from locust.event import EventHook
from locust.runners import MasterRunner, WorkerRunner

sys.path.insert(0, str(Path(__file__).resolve().parent))

DEFAULT_PLAN = str(Path(__file__).resolve().parent / "results" / "plan.json")

_Listener = TypeVar("_Listener", bound=Callable[..., None])


def listener(hook: EventHook) -> Callable[[_Listener], _Listener]:
    """``@hook.add_listener`` with a type: locust's EventHook has no annotations (it returns the handler)."""
    add: Callable[[_Listener], _Listener] = hook.add_listener
    return add

# -- options -----------------------------------------------------------------------------------


@listener(events.init_command_line_parser)
def _options(parser: Any) -> None:
    g = parser  # locust's own parser: its extra keywords (is_secret) do not work on argument groups
    g.add_argument("--lt-plan", default=DEFAULT_PLAN, help="plan JSON (users, tokens, rooms; see loadtest/plan.py)")
    g.add_argument("--lt-prepare", choices=("auto", "none", "bulk", "sql", "rest"), default="auto",
                   help="create the plan at test start: bulk (POST /api/v1/admin/load-test-users: a dev-mode"
                        " server such as make run, or --lt-admin-token), sql (needs --lt-database-url,"
                        " --lt-jwt-secret), rest (register through the API), none (use --lt-plan as it is), auto"
                        " (--lt-plan if it was made for this --host, is large enough and its tokens are accepted,"
                        " else bulk, else rest)")
    g.add_argument("--lt-admin-token", default="", is_secret=True,
                   help="an admin's access token, for bulk on a server not in dev mode")
    g.add_argument("--lt-plan-users", type=int, default=0, help="users in a prepared plan (default: -u)")
    g.add_argument("--lt-room-size", type=int, default=10, help="members per group room (prepared plans)")
    g.add_argument("--lt-assistant-share", type=float, default=0.1, help="share of users with an assistant room")
    g.add_argument("--lt-database-url", default="", help="for --lt-prepare sql", is_secret=True)
    g.add_argument("--lt-jwt-secret", default="", help="for --lt-prepare sql (mints the tokens)", is_secret=True)
    g.add_argument("--lt-send-interval", type=float, default=5.0, help="seconds between a user's messages")
    g.add_argument("--lt-assistant-interval", type=float, default=30.0, help="seconds between assistant prompts")
    g.add_argument("--lt-auth", choices=("auto", "token", "login"), default="auto",
                   help="auto: the plan's token if any, else REST login")
    g.add_argument("--lt-rest-users", type=int, default=0, help="number of RestUser (history paging, room list)")
    g.add_argument("--lt-pad", type=int, default=40, help="padding characters in each message")
    g.add_argument("--lt-loss-grace", type=float, default=2.0, help="a seq gap older than this is loss")
    g.add_argument("--lt-track-delivery", action="store_true",
                   help="also report 'message delivery' (sender time -> receipt) for every received message")


# -- the plan ------------------------------------------------------------------------------------

_plan = AsyncResult()


def _set_plan(plan: dict[str, Any]) -> None:
    plan["user_rooms"] = {}
    for room in plan["rooms"]:
        for i in room["members"]:
            plan["user_rooms"].setdefault(i, []).append((room["id"], room["kind"]))
    if not _plan.ready():
        _plan.set(plan)


class NoPlan(Exception):
    """The run cannot have users: reported once, in one line, with a non-zero exit."""


def fail_run(environment: Any, reason: str) -> None:
    """One line naming the problem and the fix, exit code 2, and the run stops."""
    if environment.process_exit_code is None:
        print(f"loadtest: {reason}", file=sys.stderr)
        environment.process_exit_code = 2
        if environment.runner is not None:
            gevent.spawn_later(0, environment.runner.quit)  # not from inside the event being handled
    if not _plan.ready():
        _plan.set_exception(NoPlan(reason))


def get_plan(user: Any, timeout_s: float = 120) -> dict[str, Any] | None:
    """The run's plan; None when it has none (the run is being stopped, the reason already printed)."""
    opts = user.environment.parsed_options
    if not _plan.ready() and opts.lt_prepare == "none":
        path = Path(opts.lt_plan)
        if not path.exists():
            fail_run(user.environment, f"no plan at {path}: make one with loadtest/plan.py, or drop"
                                       " --lt-prepare none to have the users registered through the API")
        else:
            _set_plan(json.loads(path.read_text()))
    try:
        plan = _plan.get(timeout=timeout_s)
    except NoPlan:
        return None
    assert isinstance(plan, dict)
    return plan


def _token_expiry(token: str) -> float:
    """The ``exp`` claim of a JWT (not verified: only to know whether a stored token is still worth using)."""
    import base64

    try:
        payload = token.split(".")[1]
        return float(json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))["exp"])
    except (IndexError, ValueError, KeyError, TypeError):
        return 0.0


def _reusable_plan(path: Path, host: str, n: int, run_time_s: float) -> dict[str, Any] | None:
    """A plan file made earlier for this host, with at least ``n`` users whose tokens outlast the run (auto mode)."""
    try:
        plan = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(plan, dict) or plan.get("host", "").rstrip("/") != host.rstrip("/"):
        return None
    users = plan.get("users", [])
    if len(users) < n:
        return None
    token = users[0].get("token") if users else None
    if token and _token_expiry(token) < time.time() + run_time_s + 60:
        return None  # REST plans hold access tokens of minutes: register anew
    if token and not _token_accepted(host, token):
        return None  # another server on that address now (a new data_dir, another JWT secret): make a new plan
    return plan


def _token_accepted(host: str, token: str) -> bool:
    """GET /api/v1/me with a plan's token answers 200."""
    import urllib.error
    import urllib.request

    req = urllib.request.Request(host.rstrip("/") + "/api/v1/me", headers={"Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return bool(resp.status == 200)
    except (OSError, ValueError):  # urllib.error.HTTPError is an OSError
        return False


@listener(events.init)
def _on_init(environment: Any, **_: Any) -> None:
    runner = environment.runner
    if isinstance(runner, WorkerRunner):
        runner.register_message("lt_plan", lambda msg, **kw: _set_plan(msg.data))
    if environment.parsed_options is not None:
        for cls in environment.user_classes:
            if cls.__name__ == "RestUser":
                cls.fixed_count = environment.parsed_options.lt_rest_users
                if not cls.fixed_count:
                    cls.weight = 0


def _run_time_s(opts: Any) -> float:
    run_time = opts.run_time
    if isinstance(run_time, str):
        from locust.util.timespan import parse_timespan

        run_time = parse_timespan(run_time)
    return float(run_time or 0)


def _token_ttl(opts: Any) -> int:
    """Lifetime of bulk users' tokens: the run and a margin, at least 4 hours (so the plan can be reused), at most
    the endpoint's 24 hours."""
    return int(min(86_400, max(4 * 3600, _run_time_s(opts) + 600)))


@listener(events.test_start)
def _on_test_start(environment: Any, **_: Any) -> None:
    runner = environment.runner
    opts = environment.parsed_options
    if isinstance(runner, WorkerRunner) or opts is None or opts.lt_prepare == "none":
        return
    import plan as plan_mod

    n = opts.lt_plan_users or opts.num_users or 100
    host = environment.host or ""
    via = opts.lt_prepare
    if via == "auto":
        reused = _reusable_plan(Path(opts.lt_plan), host, n, _run_time_s(opts) or 600)
        if reused is not None:
            print(f"plan: reusing {opts.lt_plan} ({len(reused['users'])} users made for {host})", file=sys.stderr)
            if isinstance(runner, MasterRunner):
                runner.send_message("lt_plan", reused)
            _set_plan(reused)
            return
        via = "bulk"
    t0 = time.perf_counter()
    try:
        if via == "bulk":
            try:
                plan = plan_mod.create_bulk(n, opts.lt_room_size, opts.lt_assistant_share, host,
                                            opts.lt_admin_token, _token_ttl(opts))
            except plan_mod.BulkRefused as exc:
                if opts.lt_prepare == "bulk":
                    raise RuntimeError(f"{exc}: the server is not in dev mode; pass --lt-admin-token") from None
                print(f"plan: {exc} (not a dev-mode server, no --lt-admin-token): registering the users through"
                      " the API", file=sys.stderr)
                via = "rest"
        if via == "sql":
            if not (opts.lt_database_url and opts.lt_jwt_secret):
                raise RuntimeError("--lt-prepare sql needs --lt-database-url and --lt-jwt-secret")
            plan = plan_mod.create_sql(n, opts.lt_room_size, opts.lt_assistant_share, opts.lt_database_url,
                                       opts.lt_jwt_secret, host)
        elif via == "rest":
            plan = plan_mod.create_rest(n, opts.lt_room_size, opts.lt_assistant_share, host)
    except Exception as exc:
        hint = ("; chatd limits registrations per client IP: run it in dev mode (make run), pass an admin's"
                " --lt-admin-token, start it with CHATD_AUTH_AUTH_ATTEMPTS_PER_MIN above the user count, or use"
                " --lt-prepare sql" if via == "rest" and "429" in str(exc) else "")
        fail_run(environment, f"cannot create {n} users via {via} on {host}: {exc}{hint}")
        return
    Path(opts.lt_plan).parent.mkdir(parents=True, exist_ok=True)
    Path(opts.lt_plan).write_text(json.dumps(plan))
    print(f"plan: {n} users, {len(plan['rooms'])} rooms via {via} in {time.perf_counter() - t0:.1f}s",
          file=sys.stderr)
    if isinstance(runner, MasterRunner):
        runner.send_message("lt_plan", plan)
    _set_plan(plan)


@listener(events.quitting)
def _on_quitting(environment: Any, **_: Any) -> None:
    # A run in which nothing was even tried measured nothing: that is a failure, not a green 0.
    if environment.process_exit_code is None and environment.stats.total.num_requests == 0 \
            and not isinstance(environment.runner, WorkerRunner):
        print("loadtest: no request was made (no user got started); see the log above", file=sys.stderr)
        environment.process_exit_code = 1


# -- helpers -----------------------------------------------------------------------------------------


class SeqError(Exception):
    pass


def fire(environment: Any, name: str, ms: float, exc: BaseException | None = None, length: int = 0) -> None:
    environment.events.request.fire(
        request_type="WS", name=name, response_time=ms, response_length=length, exception=exc, context={}
    )


_counters: dict[str, itertools.count[int]] = {}


def next_index(user: Any, kind: str) -> int:
    """Plan index of a new user: unique across the workers of a distributed run."""
    runner = user.environment.runner
    k = next(_counters.setdefault(kind, itertools.count()))
    if isinstance(runner, WorkerRunner):
        stride = max(1, getattr(user.environment.parsed_options, "expect_workers", 1) or 1)
        return max(0, runner.worker_index) + k * stride
    return k


class RoomTrack:
    """Seq check of one room on one socket (see docs/PROTOCOL.md section 7)."""

    __slots__ = ("gaps", "next")

    def __init__(self, last_seq: int) -> None:
        self.next = last_seq + 1
        self.gaps: dict[int, float] = {}  # missing seq -> when noticed


# -- the WebSocket user ------------------------------------------------------------------------------


class ChatUser(FastHttpUser):
    """Chat over /ws; REST only to log in."""

    weight = 10

    def wait_time(self) -> float:
        return self.send_interval * random.uniform(0.8, 1.2)

    def on_start(self) -> None:
        opts = self.environment.parsed_options
        self.opts = opts
        self.send_interval: float = opts.lt_send_interval
        self.ws: websocket.WebSocket | None = None
        self.reader: gevent.Greenlet | None = None
        self.tracks: dict[int, RoomTrack] = {}
        plan = get_plan(self)
        if plan is None:
            return
        users = plan["users"]
        self.index = next_index(self, "chat") % len(users)
        self.plan_user = users[self.index]
        rooms = plan["user_rooms"].get(self.index, [])
        self.group_rooms = [rid for rid, kind in rooms if kind == "group"]
        self.assistant_rooms = [rid for rid, kind in rooms if kind == "assistant"]
        self.pad = "x" * opts.lt_pad
        self.waiters: dict[int, AsyncResult] = {}
        self.sent: dict[str, list[Any]] = {}  # client_msg_id -> [perf time, kind, acked, echoed]
        self.req_ids = itertools.count(1)
        self.send_ids: set[int] = set()
        self.answers: dict[int, dict[str, Any]] = {}  # prompt message id -> timings
        self.prompt_by_answer: dict[int, int] = {}
        self.next_prompt = time.monotonic() + random.uniform(0, opts.lt_assistant_interval)
        self.hello = Event()
        token = self.authenticate()
        if token:
            self.connect(token)

    # -- auth and connection ---------------------------------------------------------------

    def authenticate(self) -> str | None:
        mode = self.opts.lt_auth
        if mode == "token" or (mode == "auto" and self.plan_user.get("token")):
            return str(self.plan_user["token"])
        with self.client.post("/api/v1/auth/login", json={"email": self.plan_user["email"],
                                                          "password": self.plan_user["password"]},
                              name="POST /api/v1/auth/login", catch_response=True) as resp:
            if resp.status_code != 200:
                resp.failure(f"HTTP {resp.status_code}: {(resp.text or '')[:200]}")
                return None
            return str(resp.json()["access_token"])

    def connect(self, token: str) -> None:
        assert self.host is not None  # FastHttpUser does not start without one
        url = self.host.replace("http://", "ws://").replace("https://", "wss://").rstrip("/") + "/ws"
        t0 = time.perf_counter()
        try:
            ws = websocket.create_connection(url, header=[f"Authorization: Bearer {token}"], timeout=30,
                                             enable_multithread=True)
        except Exception as exc:
            fire(self.environment, "ws connect", (time.perf_counter() - t0) * 1000, exc)
            return
        ws.settimeout(None)  # the connect timeout must not end a quiet socket: the server pings it
        self.ws = ws
        self.reader = gevent.spawn(self.read_loop)
        if not self.hello.wait(timeout=30):
            fire(self.environment, "ws connect", (time.perf_counter() - t0) * 1000, TimeoutError("no hello"))
            return
        fire(self.environment, "ws connect", (time.perf_counter() - t0) * 1000)
        for room in self.group_rooms + self.assistant_rooms:
            reply = self.request({"type": "join", "room_id": room}, timeout_s=30)
            if reply is None or reply.get("type") != "joined":
                fire(self.environment, "ws join", 0, RuntimeError(f"join {room}: {reply}"))

    def request(self, frame: dict[str, Any], timeout_s: float) -> dict[str, Any] | None:
        rid = next(self.req_ids)
        frame["id"] = rid
        waiter = AsyncResult()
        self.waiters[rid] = waiter
        self.send_frame(frame)
        try:
            result = waiter.get(timeout=timeout_s)
            return result if isinstance(result, dict) else None
        except gevent.Timeout:
            return None
        finally:
            self.waiters.pop(rid, None)

    def send_frame(self, frame: dict[str, Any]) -> None:
        if self.ws is not None:
            self.ws.send(json.dumps(frame, separators=(",", ":")))

    # -- receiving (the one greenlet that reads) -------------------------------------------------

    def read_loop(self) -> None:
        ws = self.ws
        assert ws is not None
        while True:
            try:
                raw = ws.recv()
            except Exception as exc:
                if self.ws is not None:  # not closed by on_stop
                    fire(self.environment, "ws closed", 0, ConnectionError(f"{type(exc).__name__}: {exc}"))
                return
            if not raw:
                if self.ws is not None:
                    fire(self.environment, "ws closed", 0,
                         ConnectionError(f"closed by server ({getattr(ws, 'status', '?')})"))
                return
            try:
                self.on_frame(json.loads(raw))
            except Exception as exc:  # a bug here must not kill the reader silently
                fire(self.environment, "ws frame", 0, exc)

    def on_frame(self, f: dict[str, Any]) -> None:
        kind = f.get("type")
        now = time.perf_counter()
        if kind == "message":
            self.on_message(f, now)
        elif kind == "ack":
            self.on_ack(f, now)
        elif kind in ("queued", "stream_start", "stream_chunk", "stream_end"):
            self.on_assistant(kind, f, now)
        elif kind == "hello":
            self.hello.set()
        elif kind == "error":
            rid = f.get("reply_to")
            waiter = self.waiters.get(rid) if rid is not None else None
            if waiter is not None:
                waiter.set(f)
            else:  # e.g. a refused send (rate_limited, unavailable): a failure of that request
                name = "send->ack" if rid in self.send_ids else "ws error"
                self.send_ids.discard(rid)
                fire(self.environment, name, 0, RuntimeError(f"{f.get('code')}: {f.get('message')}"))
        elif kind == "joined":
            # The track starts here, in the reading greenlet: live frames right behind `joined` must find it.
            self.tracks.setdefault(int(f["room_id"]), RoomTrack(int(f.get("last_seq", 0))))
            rid = f.get("reply_to")
            waiter = self.waiters.get(rid) if rid is not None else None
            if waiter is not None:
                waiter.set(f)

    def on_message(self, f: dict[str, Any], now: float) -> None:
        self.check_seq(int(f["room_id"]), int(f["seq"]))
        cmid: str = f.get("client_msg_id") or ""
        mine = self.sent.get(cmid) if cmid else None
        if mine is not None and not mine[3]:
            mine[3] = True
            if mine[2]:
                self.sent.pop(cmid, None)
            fire(self.environment, "send->echo", (now - mine[0]) * 1000, length=len(f.get("content", "")))
        elif self.opts.lt_track_delivery:
            content = f.get("content", "")
            if content.startswith("t="):
                try:
                    sent_at = float(content[2:content.index(" ")])
                    fire(self.environment, "message delivery", (time.time() - sent_at) * 1000)
                except ValueError:
                    pass

    def check_seq(self, room: int, seq: int) -> None:
        tr = self.tracks.get(room)
        if tr is None:
            return
        now = time.monotonic()
        if seq == tr.next:
            tr.next += 1
            while tr.next in tr.gaps:  # cannot happen with chatd (it never skips); kept for robustness
                tr.gaps.pop(tr.next)
                tr.next += 1
        elif seq > tr.next:
            for missing in range(tr.next, seq):
                tr.gaps.setdefault(missing, now)
            tr.next = seq + 1
        elif seq in tr.gaps:
            tr.gaps.pop(seq)  # late, out of order, but not lost
            fire(self.environment, "seq check", 0, SeqError(f"room {room}: seq {seq} out of order"))
        else:
            fire(self.environment, "seq check", 0, SeqError(f"room {room}: duplicate seq {seq}"))
        self.report_gaps(room, tr, now)

    def report_gaps(self, room: int, tr: RoomTrack, now: float, final: bool = False) -> None:
        grace = self.opts.lt_loss_grace
        lost = sorted(s for s, since in tr.gaps.items() if final or now - since > grace)
        if lost:
            for s in lost:
                tr.gaps.pop(s)
            fire(self.environment, "seq check", 0,
                 SeqError(f"room {room}: {len(lost)} seq(s) lost ({lost[0]}..{lost[-1]})"))

    def on_ack(self, f: dict[str, Any], now: float) -> None:
        rid = f.get("reply_to")
        waiter = self.waiters.get(rid) if rid is not None else None
        if waiter is not None:
            waiter.set(f)
        cmid: str = f.get("client_msg_id") or ""
        entry = self.sent.get(cmid) if cmid else None
        if entry is None or entry[2]:
            return
        entry[2] = True
        if entry[3]:
            self.sent.pop(cmid, None)
        fire(self.environment, "send->ack", (now - entry[0]) * 1000)
        if entry[1] == "prompt" and f.get("message_id") is not None:
            self.answers[int(f["message_id"])] = {"t0": entry[0]}

    def on_assistant(self, kind: str, f: dict[str, Any], now: float) -> None:
        if kind == "stream_start":
            prompt = f.get("reply_to_message_id")
            if prompt in self.answers:
                self.prompt_by_answer[int(f["message_id"])] = int(prompt)
            return
        prompt = self.prompt_by_answer.get(f.get("message_id", -1))
        if prompt is None:
            return
        timing = self.answers[prompt]
        if kind == "stream_chunk" and "first" not in timing:
            timing["first"] = now
            fire(self.environment, "assistant first token", (now - timing["t0"]) * 1000)
        elif kind == "stream_end":
            self.answers.pop(prompt, None)
            self.prompt_by_answer.pop(int(f["message_id"]), None)
            stop = f.get("stop_reason")
            exc = None if stop in ("end_turn", "max_tokens") else RuntimeError(f"stop_reason {stop}")
            fire(self.environment, "assistant full answer", (now - timing["t0"]) * 1000, exc)

    # -- sending (the task greenlet) ----------------------------------------------------------------

    @task
    def chat(self) -> None:
        if self.ws is None:
            return
        if self.assistant_rooms and time.monotonic() >= self.next_prompt:
            self.next_prompt = time.monotonic() + self.opts.lt_assistant_interval
            self.send_message(random.choice(self.assistant_rooms), "prompt",
                              "what did we decide about the load test")
            return
        if self.group_rooms:
            self.send_message(random.choice(self.group_rooms), "send", self.pad)

    def send_message(self, room: int, kind: str, text: str) -> None:
        rid = next(self.req_ids)
        self.send_ids.add(rid)
        if len(self.send_ids) > 1000:
            self.send_ids.clear()  # only recent ids matter: errors come back within a round trip
        cmid = f"lt{self.index}-{rid}-{random.getrandbits(24):06x}"
        self.sent[cmid] = [time.perf_counter(), kind, False, False]
        try:
            self.send_frame({"type": "send", "id": rid, "room_id": room, "client_msg_id": cmid,
                             "content": f"t={time.time():.6f} u={self.index} {text}"})
        except Exception as exc:
            self.sent.pop(cmid, None)
            fire(self.environment, "send->ack", 0, exc)

    def on_stop(self) -> None:
        now = time.monotonic()
        for room, tr in self.tracks.items():
            # gaps younger than the grace may still be in flight at the stop: only older ones are loss
            self.report_gaps(room, tr, now)
        ws, self.ws = self.ws, None
        if ws is not None:
            try:
                ws.close(timeout=1)
            except Exception:
                pass
        if self.reader is not None:
            self.reader.kill(block=False)


# -- the REST user ---------------------------------------------------------------------------------------


class RestUser(FastHttpUser):
    """Room list and history paging (GET /rooms, GET /rooms/{id}/messages with before_seq)."""

    weight = 1

    def wait_time(self) -> float:
        return random.uniform(1.0, 3.0)

    def on_start(self) -> None:
        opts = self.environment.parsed_options
        self.token = None
        plan = get_plan(self)
        if plan is None:
            return
        users = plan["users"]
        self.index = (len(users) - 1 - next_index(self, "rest")) % len(users)
        u = users[self.index]
        self.rooms = [rid for rid, _ in plan["user_rooms"].get(self.index, [])]
        self.token = u.get("token") if opts.lt_auth != "login" else None
        if not self.token:
            with self.client.post("/api/v1/auth/login", json={"email": u["email"], "password": u["password"]},
                                  name="POST /api/v1/auth/login", catch_response=True) as resp:
                if resp.status_code != 200:
                    resp.failure(f"HTTP {resp.status_code}")
                    return
                self.token = resp.json()["access_token"]
        self.headers = {"Authorization": f"Bearer {self.token}"}

    @task(1)
    def room_list(self) -> None:
        if self.token:
            self.client.get("/api/v1/rooms?limit=50", headers=self.headers, name="GET /api/v1/rooms")

    @task(3)
    def history(self) -> None:
        if not self.token or not self.rooms:
            return
        room = random.choice(self.rooms)
        url = f"/api/v1/rooms/{room}/messages?limit=50"
        for _ in range(3):  # newest page, then two older ones
            with self.client.get(url, headers=self.headers, name="GET /api/v1/rooms/[id]/messages",
                                 catch_response=True) as resp:
                if resp.status_code != 200:
                    resp.failure(f"HTTP {resp.status_code}")
                    return
                body = resp.json()
                if not body.get("has_more") or not body.get("messages"):
                    return
                url = f"/api/v1/rooms/{room}/messages?limit=50&before_seq={body['messages'][0]['seq']}"
