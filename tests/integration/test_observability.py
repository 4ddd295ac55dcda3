"""Metrics, dashboard and alert rules, checked against a running chatd.

* Every metric the Grafana dashboard (config/grafana/chatd.json) and the alert
  rules (config/prometheus/alerts.yml) use is exported by ``chatd serve``
  after a little traffic, and the new per-worker series are real (two workers).
* The rules parse and fire as intended: ``promtool check rules`` and ``promtool
  test rules`` (tests/prometheus/alerts_test.yml), with promtool from Debian's
  ``prometheus`` package (installed on first use, see tests/system_packages.py).
  The dashboard's queries are parsed by promtool too, as recording rules.
* docs/OPERATIONS.md documents every metric chatd defines.
"""

from __future__ import annotations

import asyncio
import json
import re
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.chat import connect, join, make_room, send
from tests.conftest import Services
from tests.support import ROOT, Chatd, request
from tests.system_packages import ensure_binary
from tests.users import make_users

ALERTS = ROOT / "config" / "prometheus" / "alerts.yml"
ALERTS_TEST = ROOT / "tests" / "prometheus" / "alerts_test.yml"
DASHBOARD = ROOT / "config" / "grafana" / "chatd.json"
OPERATIONS = ROOT / "docs" / "OPERATIONS.md"
_NAME = re.compile(r"\bchatd_[a-z0-9_]+\b")


def dashboard_queries() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    queries = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    queries += [v["definition"] for v in dashboard["templating"]["list"] if v.get("definition")]
    assert len(queries) > 30
    return queries


def alert_queries() -> list[str]:
    rules = yaml.safe_load(ALERTS.read_text())
    return [r["expr"] for g in rules["groups"] for r in g["rules"]]


def promtool() -> str:
    return ensure_binary("promtool", "prometheus")


def run(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=60, check=False)


def test_alert_rules_parse_and_fire_as_intended() -> None:
    check = run(promtool(), "check", "rules", str(ALERTS))
    assert check.returncode == 0, check.stdout + check.stderr
    assert "SUCCESS: 20 rules found" in check.stdout, check.stdout
    tested = run(promtool(), "test", "rules", str(ALERTS_TEST))
    assert tested.returncode == 0 and "SUCCESS" in tested.stdout, tested.stdout + tested.stderr


def test_dashboard_queries_parse(tmp_path: Path) -> None:
    """Each panel's PromQL, with Grafana's variables filled in, as a recording rule: promtool parses it."""
    rules = []
    for n, query in enumerate(dashboard_queries()):
        if query.startswith("label_values("):
            continue  # a Grafana function, not PromQL (its metric is checked against the scrape below)
        expr = query.replace("$__rate_interval", "1m").replace("$instance", ".*")
        assert "$" not in expr, f"a Grafana variable promtool cannot fill in: {query}"
        rules.append({"record": f"chatd:dashboard_query_{n}", "expr": expr})
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    check = run(promtool(), "check", "rules", str(path))
    assert check.returncode == 0, check.stdout + check.stderr


def test_operations_md_documents_every_metric() -> None:
    from prometheus_client import REGISTRY

    import chatd.process.metrics  # noqa: F401  (registers them)

    defined = {f.name for f in REGISTRY.collect() if f.name.startswith("chatd_")}
    counters = {f.name for f in REGISTRY.collect() if f.type == "counter"}
    table = OPERATIONS.read_text()
    documented = set(re.findall(r"^\| `(chatd_[a-z0-9_]+)`", table, flags=re.MULTILINE))
    expected = {name + "_total" if name in counters else name for name in defined}
    assert expected - documented == set(), "metrics missing from docs/OPERATIONS.md"
    assert documented - expected == set(), "docs/OPERATIONS.md lists metrics chatd does not define"


def _samples(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        out.setdefault(family.name, [])
        for sample in family.samples:
            out.setdefault(sample.name, []).append((sample.labels, sample.value))
    return out


def _total(samples: dict[str, list[tuple[dict[str, str], float]]], name: str, **labels: str) -> float:
    return sum(v for lab, v in samples.get(name, []) if all(lab.get(k) == want for k, want in labels.items()))


async def test_dashboard_and_alerts_use_only_exported_metrics(chatd_factory: Any, services: Services) -> None:
    server: Chatd = chatd_factory(
        workers=2,
        CHATD_SERVER_REUSE_PORT="true",
        CHATD_WS_HEARTBEAT_INTERVAL_S="1",  # pings every second, 1 s to answer (Tornado's client does)
        CHATD_WS_IDLE_TIMEOUT_S="2",
        CHATD_ASSISTANT_OFFLINE_TOKENS_PER_S="500",
        CHATD_ASSISTANT_EMBEDDER="none",  # no model to load: the answer comes at once
    )
    alice, bob, carol, dave = make_users(services.database_url, 4)
    room = await make_room(server, alice, [bob], kind="assistant")
    a, b = await connect(server, alice), await connect(server, bob)
    await join(a, room)
    await join(b, room)
    ack = await send(a, room, "hello @assistant, what is chatd?")
    assert ack["type"] == "ack"
    # Both sockets are read while the answer streams, and `a` is closed as soon as it ends: Tornado's client
    # stops reading the wire (pongs included) at its second unread frame, and with 1 s pings a socket left
    # unread through a slow answer was closed "ping timed out", counted as a second ping timeout.
    # (not `_, end`: mypy cannot type `end` then, with a `_` in scrape_ok's comprehension below)
    _a_end, end = await asyncio.gather(a.expect("stream_end", timeout_s=30), b.expect("stream_end", timeout_s=30))
    assert end["usage"]["output_tokens"] > 0
    a.conn.close(1000, "bye")  # the client closes
    assert (await request("GET", server.http + "/api/v1/nope")).status == 404
    await b.send(b"\x00binary")  # chatd closes with 1003
    assert (await b.closed())[0] == 1003
    # Closes Tornado starts itself are counted too: a frame over ws.max_frame_bytes (1009), a missed pong.
    c = await connect(server, carol)
    await c.send("x" * 70_000)
    assert (await c.closed())[0] == 1009
    mute = socket.create_connection(("127.0.0.1", server.port))  # upgrades, then never answers a ping
    mute.sendall(
        (
            "GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
            f"Authorization: Bearer {dave.token}\r\n\r\n"
        ).encode()
    )

    def scrape_ok(s: dict[str, list[tuple[dict[str, str], float]]]) -> bool:
        return (
            _total(s, "chatd_ws_closed_by_client_total", code="1000") >= 1
            and _total(s, "chatd_assistant_tokens_total", kind="output") > 0
            and {lab.get("worker") for lab, _ in s.get("chatd_event_loop_lag_seconds_count", [])} == {"w0", "w1"}
            and _total(s, "chatd_pubsub_messages_received_total") > 0
            and _total(s, "chatd_pg_pool_requests_total") > 0  # sampled every 5 s
            and _total(s, "chatd_ws_ping_timeouts_total") == 1
        )

    samples: dict[str, list[tuple[dict[str, str], float]]] = {}
    deadline = time.monotonic() + 40  # hot counters flush once a second, the samplers run every 5 s
    while time.monotonic() < deadline:
        text = (await request("GET", server.http + "/metrics")).body.decode()
        samples = _samples(text)
        if scrape_ok(samples):
            break
        await asyncio.sleep(0.25)

    referenced = {name for q in [*dashboard_queries(), *alert_queries()] for name in _NAME.findall(q)}
    assert len(referenced) > 40
    missing = sorted(referenced - set(samples))
    assert not missing, f"used by the dashboard or the alerts but not exported: {missing}"

    # The new series are real, per worker, in multiprocess mode.
    assert _total(samples, "chatd_ready") == 2  # both workers would answer ready
    for worker in ("w0", "w1"):
        assert _total(samples, "chatd_event_loop_lag_seconds_count", worker=worker) > 0
        rss = [v for lab, v in samples["chatd_process_resident_memory_bytes"] if lab["worker"] == worker]
        assert len(rss) == 1 and 20e6 < rss[0] < 4e9, rss  # one live process per worker (pid label)
        assert _total(samples, "chatd_process_open_fds", worker=worker) >= 10
        assert _total(samples, "chatd_process_max_fds", worker=worker) >= 1024
        assert _total(samples, "chatd_pg_pool_connections", worker=worker, state="max") == 20  # storage.pg_pool_max
    assert _total(samples, "chatd_pg_pool_requests_total") > 0
    assert _total(samples, "chatd_process_cpu_seconds_total") > 0
    assert _total(samples, "chatd_redis_command_seconds_count", op="publish") > 0
    assert _total(samples, "chatd_pubsub_connected") == 2
    assert _total(samples, "chatd_ws_closed_by_server_total", code="1003") == 1
    assert _total(samples, "chatd_ws_closed_by_client_total", code="1000") == 1
    assert _total(samples, "chatd_ws_closed_by_server_total", code="1009") == 1
    assert _total(samples, "chatd_ws_ping_timeouts_total") == 1
    assert _total(samples, "chatd_ws_closed_by_server_total", code="1000") == 1  # the ping timeout's close
    mute.close()
    assert _total(samples, "chatd_ws_closed_by_server_total", code="1013") == 0  # exported at 0 for the alert
    assert _total(samples, "chatd_assistant_tokens_total", model="offline", kind="input") > 0
    assert _total(samples, "chatd_http_requests_total", status="404") >= 1
    assert _total(samples, "chatd_task_restarts_total", task="fanout-reader") == 0

    lint = await asyncio.to_thread(
        subprocess.run,
        [promtool(), "check", "metrics"],
        input=text,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert lint.returncode == 0, lint.stdout + lint.stderr  # Prometheus' naming conventions
