"""The command line as a newcomer meets it: README lines, bad input, taken port, bad URLs, no orphans.

Every failure must be one line on stderr naming the problem and the fix, a
non-zero exit, no traceback, and no process left behind.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from pathlib import Path

import pytest
from psycopg.conninfo import conninfo_to_dict

from chatd.storage import redisurl
from tests.conftest import Services
from tests.support import JWT_SECRET, ROOT, Chatd, create_database, free_port, http_get


def chatd_cli(
    *args: str, env: Mapping[str, str] | None = None, timeout_s: float = 90, merged: bool = False
) -> subprocess.CompletedProcess[str]:
    """``chatd ARGS``; ``merged``: stdout and stderr into one pipe (``2>&1 | less``), in ``stdout``."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("CHATD_")}
    for name in ("DATABASE_URL", "REDIS_URL", "JWT_SECRET"):
        base.pop(name, None)
    base.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "chatd", *args],
        cwd=ROOT,
        env=base,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT if merged else subprocess.PIPE,
        text=True,
        timeout=timeout_s,
        check=False,
    )


def one_line_error(result: subprocess.CompletedProcess[str]) -> str:
    """The failure's message: exactly one ``chatd:`` line and no traceback (log lines may precede it)."""
    assert result.returncode != 0, result
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("chatd: ")]
    assert len(lines) == 1, result.stderr
    return lines[0]


def processes_using(path: Path) -> list[str]:
    """Command lines of live processes that mention ``path`` (embedded databases of a data dir)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = (proc / "stat").read_text().split(") ", 1)[1][0]
        except OSError:
            continue
        if str(path) in cmdline and state != "Z":
            found.append(f"{proc.name}: {cmdline}")
    return found


def wait_gone(path: Path, timeout_s: float = 15) -> list[str]:
    deadline = time.monotonic() + timeout_s
    while (left := processes_using(path)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return left


def readme_commands() -> list[str]:
    """The lines of the README's "While `make run` is running" block."""
    text = (ROOT / "README.md").read_text()
    block = text.split("While `make run` is running", 1)[1].split("```sh\n", 1)[1].split("```", 1)[0]
    return [line for line in block.splitlines() if line.strip()]


def make_run_args() -> list[str]:
    """What `make run` runs, after installing: the arguments of its `$(BIN)/chatd` line in the Makefile."""
    recipe = (ROOT / "Makefile").read_text().split("\nrun:", 1)[1].splitlines()[1].strip()
    assert recipe.startswith("$(BIN)/chatd "), recipe
    return shlex.split(recipe)[1:]


class OnTerminal:
    """A command in a pseudo-terminal, as a person runs it; its output read all along (a full pty would block it)."""

    def __init__(self, args: list[str], env: Mapping[str, str]) -> None:
        import pexpect

        self.child = pexpect.spawn(sys.executable, ["-m", "chatd", *args], cwd=str(ROOT), env=dict(env))
        self._out = bytearray()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        import pexpect

        while True:
            try:
                self._out += self.child.read_nonblocking(65536, timeout=0.2)
            except pexpect.TIMEOUT:
                continue
            except (pexpect.EOF, OSError):
                return

    def text(self) -> str:
        return self._out.decode(errors="replace").replace("\r\n", "\n")

    def wait_for(self, pattern: str, timeout_s: float = 90) -> re.Match[str]:
        deadline = time.monotonic() + timeout_s
        while (found := re.search(pattern, self.text(), re.M)) is None:
            assert self.child.isalive() and time.monotonic() < deadline, f"no {pattern!r} in:\n{self.text()[-4000:]}"
            time.sleep(0.05)
        return found

    def wait_exit(self, timeout_s: float = 40) -> int | None:
        self._reader.join(timeout_s)
        self.child.close()
        status: int | None = self.child.exitstatus  # pexpect has no annotations
        return status


def test_make_run_says_where_to_open_it_then_the_readme_commands_then_ctrl_c(tmp_path: Path) -> None:
    data_dir = tmp_path / "var"
    port = free_port()
    env = {"CHATD_STORAGE_DATA_DIR": str(data_dir), "CHATD_SERVER_PORT": str(port)}
    base = {k: v for k, v in os.environ.items() if not k.startswith("CHATD_")}
    for name in ("DATABASE_URL", "REDIS_URL", "JWT_SECRET"):
        base.pop(name, None)
    # `make run` in a terminal (config/dev.toml, embedded databases), in a private data dir and port.
    server = OnTerminal(make_run_args(), {**base, **env, "TERM": "xterm"})
    try:
        banner = server.wait_for(r"^chatd is running: open (\S+) in your browser\.\nStop it with Ctrl-C\.$")
        assert banner[1] == f"http://127.0.0.1:{port}/"
        assert http_get(banner[1] + "health/ready")[0] == 200  # said once it serves, not before
        shown = server.text()
        assert "chatd_listening" in shown and not re.search(r"^\{", shown, re.M), shown  # text logs, not JSON

        commands = readme_commands()
        assert len(commands) == 3 and all(c.startswith(".venv/bin/chatd ") for c in commands)
        for line in commands:
            args = shlex.split(line)[1:]
            result = chatd_cli(*args, env=env)
            assert result.returncode == 0, f"{line}\n{result.stderr}"
            assert "Traceback" not in result.stderr
            assert not re.search(r"^\{", result.stderr, re.M), result.stderr  # no JSON log line before the answer
            if args[0] == "check-config":  # the embedded servers of the running `make run`
                assert "postgres: ok, connected to the embedded PostgreSQL in " in result.stderr, result.stderr
                assert "redis: ok, connected to the embedded Valkey at unix://" in result.stderr, result.stderr
            else:
                assert result.stderr == "", result.stderr
        created = chatd_cli(*shlex.split(commands[2])[1:], env=env)
        assert '"role": "admin"' in created.stdout and created.stderr == ""
        assert http_get(banner[1] + "health/ready")[0] == 200  # the live server kept its databases

        server.child.sendcontrol("c")
        assert server.wait_exit() == 0
        assert "chatd_stopped" in server.text()
    finally:
        if server.child.isalive():
            server.child.terminate(force=True)
    assert not wait_gone(data_dir)


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["--email", "a@example.com", "--password", "..."], "password must be at least 8 characters"),
        (["--email", "not-an-email", "--password", "long-enough-1"], "email"),
    ],
)
def test_create_user_bad_input_is_one_line(tmp_path: Path, args: list[str], named: str) -> None:
    started = time.monotonic()
    result = chatd_cli("create-user", *args, env={"CHATD_STORAGE_DATA_DIR": str(tmp_path / "var")})
    line = one_line_error(result)
    assert result.returncode == 2
    assert named in line and "--password" in line
    assert time.monotonic() - started < 20  # refused before any database started
    assert not (tmp_path / "var" / "postgres").exists()


def test_migrate_needs_no_jwt_secret_and_says_what_it_did(services: Services) -> None:
    url = create_database(services.admin_url, "cli")
    first = chatd_cli("migrate", env={"DATABASE_URL": url})
    assert first.returncode == 0, first.stderr
    assert re.match(r"applied \d+ migration\(s\): 0001_init\.sql, ", first.stdout), first.stdout
    assert first.stderr == ""  # the answer only: no log line before it
    again = chatd_cli("migrate", env={"DATABASE_URL": url})
    assert again.returncode == 0, again.stderr
    assert "up to date" in again.stdout and again.stderr == ""


def test_port_in_use_is_one_line_and_starts_nothing(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = {"JWT_SECRET": JWT_SECRET, "CHATD_STORAGE_DATA_DIR": str(tmp_path / "var")}
        started = time.monotonic()
        result = chatd_cli("serve", "--port", str(port), "--workers", "2", env=env)
        line = one_line_error(result)
        assert f"127.0.0.1:{port}" in line and "already in use" in line and "--port" in line
        assert time.monotonic() - started < 15
    assert not processes_using(tmp_path / "var")


@pytest.mark.parametrize(
    ("env", "key"),
    [({"DATABASE_URL": "garbage"}, "storage.database_url"), ({"REDIS_URL": "garbage"}, "storage.redis_url")],
)
def test_garbage_urls_are_refused_by_check_config_and_serve(tmp_path: Path, env: dict[str, str], key: str) -> None:
    env = {**env, "JWT_SECRET": JWT_SECRET, "CHATD_STORAGE_DATA_DIR": str(tmp_path / "var")}
    check = chatd_cli("check-config", env=env)
    assert check.returncode == 2 and key in one_line_error(check)
    started = time.monotonic()
    serve = chatd_cli("serve", "--port", str(free_port()), "--workers", "2", env=env, timeout_s=30)
    line = one_line_error(serve)
    assert serve.returncode == 2 and key in line and ("DATABASE_URL" in line or "REDIS_URL" in line)
    assert time.monotonic() - started < 15  # no hang
    assert not processes_using(tmp_path / "var")


def test_unreachable_services_fail_fast_without_orphans(tmp_path: Path, services: Services) -> None:
    dead_port = free_port()  # nothing listens there
    data_dir = tmp_path / "var"
    base = {"JWT_SECRET": JWT_SECRET, "CHATD_STORAGE_DATA_DIR": str(data_dir)}

    pg = {**base, "DATABASE_URL": f"postgresql://chatd@127.0.0.1:{dead_port}/chatd", "REDIS_URL": services.redis_url}
    check = chatd_cli("check-config", "--connect", env=pg)
    assert check.returncode == 1 and "DATABASE_URL" in one_line_error(check)
    # In one pipe (`2>&1 | tail`): the config, then what answered, the error last.
    seen = chatd_cli("check-config", "--connect", env=pg, merged=True)
    lines = seen.stdout.strip().splitlines()
    assert lines[0] == "{" and lines[-1].startswith("chatd: cannot connect to PostgreSQL at "), seen.stdout
    assert "DATABASE_URL" in lines[-1]
    assert [line for line in lines if line.startswith("chatd: ")] == lines[-1:], seen.stdout
    assert f"redis: ok, connected to {redisurl.where(services.redis_url)}\n" in seen.stdout
    serve = chatd_cli("serve", "--port", str(free_port()), env=pg)
    line = one_line_error(serve)
    assert serve.returncode == 1 and f"127.0.0.1:{dead_port}" in line and "DATABASE_URL" in line

    # Redis down, embedded Postgres: the Postgres this start began must not outlive it.
    redis_down = {**base, "REDIS_URL": f"redis://127.0.0.1:{dead_port}/0"}
    check = chatd_cli("check-config", "--connect", env=redis_down)
    assert check.returncode == 1 and "REDIS_URL" in one_line_error(check)
    serve = chatd_cli("serve", "--port", str(free_port()), env=redis_down)
    assert serve.returncode == 1 and "REDIS_URL" in one_line_error(serve)
    assert not wait_gone(data_dir)

    ok = chatd_cli(
        "check-config",
        "--connect",
        env={**base, "DATABASE_URL": services.database_url, "REDIS_URL": services.redis_url},
    )
    assert ok.returncode == 0, ok.stderr
    where = re.search(r"^postgres: ok, connected to (postgresql://\S+) \(PostgreSQL \d+", ok.stderr, re.M)
    assert where is not None, ok.stderr
    params = conninfo_to_dict(services.database_url)
    assert f"//{params.get('user', '')}@" in where[1] and f"/{params['dbname']}" in where[1], where[1]
    assert not params.get("password") or str(params["password"]) not in ok.stderr
    assert f"redis: ok, connected to {redisurl.where(services.redis_url)}\n" in ok.stderr


@pytest.mark.parametrize("workers", [2, 1])
def test_sigkill_of_the_master_leaves_nothing_behind(tmp_path: Path, workers: int) -> None:
    data_dir = tmp_path / "var"
    server = Chatd("", "", tmp_path / "serve.log", workers=workers, data_dir=data_dir)
    server.env = {"DATABASE_URL": "", "REDIS_URL": ""}
    server.start()
    assert server.proc is not None
    tree = processes_using(data_dir)  # postgres and valkey are started with paths under data_dir
    assert any("postgres" in p for p in tree) and any("valkey" in p for p in tree), tree
    workers_before = server.worker_pids()
    server.proc.send_signal(signal.SIGKILL)  # the master only: no finally, no atexit
    server.proc.wait()
    assert not wait_gone(data_dir)
    deadline = time.monotonic() + 15
    while any(Path(f"/proc/{pid}").exists() for pid in workers_before) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(Path(f"/proc/{pid}").exists() for pid in workers_before)
    server.stop()


def test_install_has_no_setuptools_deprecation(tmp_path: Path) -> None:
    """Building chatd (what `make install` does) prints no deprecation, and the wheel carries its data files."""
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(ROOT)],
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
        env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"},
    )
    assert result.returncode == 0, result.stderr
    output = result.stdout + result.stderr
    assert "deprecat" not in output.lower(), output
    import zipfile

    (wheel,) = tmp_path.glob("chatd-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        metadata = zf.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    assert "License-Expression: MIT" in metadata
    assert any(n.endswith("share/chatd/sql/0001_init.sql") for n in names)
    assert any(n.endswith("share/chatd/config/chatd.toml") for n in names)


def test_signals_are_handled_while_workers_start(services: Services, tmp_path: Path) -> None:
    """A worker stuck in its start must not make the master deaf: SIGINT stops the tree in seconds."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHATD_")}
    env.update(
        {
            "DATABASE_URL": services.database_url,
            "REDIS_URL": services.redis_url,
            "JWT_SECRET": JWT_SECRET,
            "CHATD_SERVER_SHUTDOWN_GRACE_S": "2",
            "CHATD_STORAGE_REDIS_KEY_PREFIX": "sig:",
        }
    )
    log = (tmp_path / "serve.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "chatd", "serve", "--port", str(free_port()), "--workers", "2"],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=log,
        start_new_session=True,
    )
    stopped: set[int] = set()
    try:
        deadline = time.monotonic() + 30
        while len(stopped) < 2 and time.monotonic() < deadline:  # freeze each worker as soon as it exists
            try:
                children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
            except OSError:
                children = []
            for pid in map(int, children):
                if pid not in stopped:
                    os.kill(pid, signal.SIGSTOP)
                    stopped.add(pid)
            time.sleep(0.005)
        assert len(stopped) == 2
        started = time.monotonic()
        proc.send_signal(signal.SIGINT)
        assert proc.wait(20) == 0
        assert time.monotonic() - started < 10  # the grace (2 s) and a SIGKILL, not 30 s per worker start
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        for pid in stopped:
            if Path(f"/proc/{pid}").exists():
                os.kill(pid, signal.SIGKILL)
        log.close()
    assert not [pid for pid in stopped if alive(pid)]


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1][0] != "Z"
    except OSError:
        return False


def test_sigterm_during_the_start_leaves_nothing(tmp_path: Path) -> None:
    """SIGTERM while the embedded Postgres is being created (initdb, start, migrations): a prompt exit, no leftovers."""
    data_dir = tmp_path / "var"
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHATD_")}
    for name in ("DATABASE_URL", "REDIS_URL"):
        env.pop(name, None)
    env.update({"JWT_SECRET": JWT_SECRET, "CHATD_STORAGE_DATA_DIR": str(data_dir)})
    proc = subprocess.Popen(
        [sys.executable, "-m", "chatd", "serve", "--port", str(free_port()), "--workers", "2"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    deadline = time.monotonic() + 30
    while not (data_dir / "postgres").exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(0.3)
    proc.send_signal(signal.SIGTERM)
    try:
        _, stderr = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode != 0 and "Traceback" not in stderr, stderr[-2000:]
    assert not wait_gone(data_dir)
