"""The Locust file as Locust users run it: a plain headless run, no plan prepared beforehand."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

from tests.support import ROOT, Chatd, free_port
from tests.users import make_users


def locust(*args: str, cwd: Path, timeout_s: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "locust", "-f", str(ROOT / "loadtest" / "locustfile.py"), "--headless", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


def test_plain_run_creates_its_users_through_the_api(chatd_factory: Any, tmp_path: Path) -> None:
    server: Chatd = chatd_factory()
    result = locust(
        "-u",
        "5",
        "-r",
        "5",
        "-t",
        "5s",
        "--host",
        server.http,
        "--only-summary",
        "--csv",
        str(tmp_path / "stats"),
        "--lt-plan",
        str(tmp_path / "plan.json"),
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    # -u 5 means 5 users in all: 5 registered through the API, 5 sockets.
    registered = [e for e in server.events("http_request") if e.get("route") == "RegisterHandler"]
    assert [e["status"] for e in registered] == [201] * 5
    handshakes = [e for e in server.events("http_request") if e.get("route") == "ChatSocket"]
    assert len(handshakes) == 5
    stats = (tmp_path / "stats_stats.csv").read_text().splitlines()
    connects = next(line for line in stats if ",ws connect," in line).split(",")
    assert connects[2] == "5" and connects[3] == "0"  # requests, failures
    aggregated = next(line for line in stats if ",Aggregated," in line).split(",")
    assert int(aggregated[2]) > 5 and aggregated[3] == "0"

    # The same command again: the plan it wrote is for this host and its tokens outlast the run.
    again = locust(
        "-u",
        "5",
        "-r",
        "5",
        "-t",
        "3s",
        "--host",
        server.http,
        "--only-summary",
        "--lt-plan",
        str(tmp_path / "plan.json"),
        cwd=tmp_path,
    )
    assert again.returncode == 0 and "plan: reusing" in again.stderr, again.stderr[-3000:]
    assert len([e for e in server.events("http_request") if e.get("route") == "RegisterHandler"]) == 5


def stats_row(stats_csv: Path, name: str) -> list[str]:
    """One row of Locust's ``--csv`` stats: type, name, requests, failures, ..."""
    return next(line for line in stats_csv.read_text().splitlines() if f",{name}," in line).split(",")


def readme_locust_args() -> list[str]:
    """The Locust command line of the README's "Load test (Locust)" section, without ``.venv/bin/locust``."""
    text = (ROOT / "README.md").read_text()
    block = text.split("## Load test (Locust)", 1)[1].split("```sh\n", 1)[1].split("```", 1)[0]
    [line] = [line for line in block.splitlines() if line.startswith(".venv/bin/locust ")]
    return shlex.split(line)[1:]


def test_readme_run_against_make_run_has_more_users_than_registrations_allowed(
    chatd_factory: Any, tmp_path: Path
) -> None:
    """`make run` (config/dev.toml: dev mode, every limit at its default), then the README's Locust line in a
    second shell, smaller and shorter: 50 users, more than the 10 registrations per minute per IP that
    ``auth.auth_attempts_per_min`` allows, and no other option or environment."""
    server: Chatd = chatd_factory(CHATD_CONFIG="config/dev.toml")
    args = readme_locust_args()
    assert args == ["-f", "loadtest/locustfile.py", "--headless", "-u", "1000", "-r", "200", "-t", "60s",
                    "--host", "http://127.0.0.1:8080"]  # the line, as a new user types it
    scaled = {"-f": str(ROOT / "loadtest" / "locustfile.py"), "-u": "50", "-r": "50", "-t": "5s", "--host": server.http}
    args = [scaled.get(option, arg) for option, arg in zip(["", *args], args, strict=False)]
    result = subprocess.run(
        [sys.executable, "-m", "locust", *args, "--only-summary", "--csv", str(tmp_path / "stats"),
         "--lt-plan", str(tmp_path / "plan.json")],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    stats = tmp_path / "stats_stats.csv"
    assert stats_row(stats, "ws connect")[2:4] == ["50", "0"]  # requests, failures
    acks = stats_row(stats, "send->ack")
    assert int(acks[2]) >= 50 and acks[3] == "0"
    assert stats_row(stats, "Aggregated")[3] == "0"
    # The users came from the dev-mode bulk endpoint, not from 50 registrations.
    assert "plan: 50 users, 10 rooms via bulk" in result.stderr, result.stderr[-3000:]
    assert not [e for e in server.events("http_request") if e.get("route") == "RegisterHandler"]

    # A plan for this address whose tokens the server no longer accepts (a new data_dir, another JWT secret
    # after `make clean`) is not reused: the run makes new users instead of failing every connect.
    from chatd.process.config import AuthSettings
    from chatd.services.tokens import TokenService

    plan = json.loads((tmp_path / "plan.json").read_text())
    stranger = TokenService(AuthSettings(jwt_secret="another-secret-0123456789-0123456789", access_ttl_s=86_400))
    for user in plan["users"]:
        user["token"] = stranger.mint(user["id"], "user", "access")[0]
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    again = locust(
        *("-u", "5", "-r", "5", "-t", "2s", "--host", server.http, "--only-summary"),
        *("--lt-plan", str(tmp_path / "plan.json")),
        cwd=tmp_path,
    )
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "plan: reusing" not in again.stderr, again.stderr[-3000:]
    assert "plan: 5 users, 2 rooms via bulk" in again.stderr, again.stderr[-3000:]


def test_server_not_in_dev_mode_makes_load_test_users_for_an_admin_token(
    chatd_factory: Any, services: Any, tmp_path: Path
) -> None:
    """Outside dev mode the bulk route wants an admin: with --lt-admin-token, more users than registrations allow."""
    server: Chatd = chatd_factory()
    [admin] = make_users(services.database_url, 1, role="admin")
    result = locust(
        *("-u", "12", "-r", "12", "-t", "2s", "--host", server.http, "--only-summary"),
        *("--lt-plan", str(tmp_path / "plan.json"), "--lt-prepare", "bulk", "--lt-admin-token", admin.token),
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "plan: 12 users, 4 rooms via bulk" in result.stderr, result.stderr[-3000:]
    refused = locust(
        *("-u", "12", "-t", "2s", "--host", server.http, "--lt-plan", str(tmp_path / "other.json")),
        *("--lt-prepare", "bulk"),
        cwd=tmp_path,
    )
    reasons = [line for line in refused.stderr.splitlines() if line.startswith("loadtest: ")]
    assert refused.returncode == 2 and len(reasons) == 1, refused.stderr[-3000:]
    assert "HTTP 401" in reasons[0] and "--lt-admin-token" in reasons[0]


def test_plan_with_tokens_expiring_during_the_run_is_not_reused(chatd_factory: Any, tmp_path: Path) -> None:
    server: Chatd = chatd_factory(CHATD_AUTH_ACCESS_TTL_S="30")  # tokens end before run + margin
    for _ in range(2):
        result = locust(
            "-u",
            "2",
            "-r",
            "2",
            "-t",
            "2s",
            "--host",
            server.http,
            "--only-summary",
            "--lt-plan",
            str(tmp_path / "plan.json"),
            cwd=tmp_path,
        )
        assert result.returncode == 0 and "plan: reusing" not in result.stderr, result.stderr[-3000:]
    assert len([e for e in server.events("http_request") if e.get("route") == "RegisterHandler"]) == 4


def test_run_that_cannot_make_users_fails_in_one_line(tmp_path: Path) -> None:
    nowhere = f"http://127.0.0.1:{free_port()}"
    result = locust(
        "-u", "3", "-t", "5s", "--host", nowhere, "--lt-plan", str(tmp_path / "plan.json"), cwd=tmp_path, timeout_s=60
    )
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    reasons = [line for line in result.stderr.splitlines() if line.startswith("loadtest: ")]
    assert len(reasons) == 1 and nowhere in reasons[0], result.stderr[-3000:]


def test_run_locust_users_means_users_in_total(tmp_path: Path) -> None:
    """loadtest/run_locust.py --users 300 starts 300 Locust users, its REST users among them."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("run_locust", ROOT / "loadtest" / "run_locust.py")
    assert spec is not None and spec.loader is not None
    run_locust = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(run_locust)
    args = run_locust.parse_args(["--users", "300", "--rest-users", "10"])
    cmd = run_locust.locust_command(args, 8080, tmp_path / "plan.json", tmp_path / "report")
    assert cmd[cmd.index("-u") + 1] == "300" and cmd[cmd.index("--lt-rest-users") + 1] == "10"
    too_many = subprocess.run(
        [sys.executable, str(ROOT / "loadtest" / "run_locust.py"), "--users", "5", "--rest-users", "5"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert too_many.returncode == 2 and "--users is the total" in too_many.stderr
