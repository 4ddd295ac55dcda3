"""Dockerfile and compose.yaml: linted (no Docker engine here) and kept in step with pyproject and chatd."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import yaml
from packaging.specifiers import SpecifierSet

from chatd.process import config, config_load
from tests.support import ROOT
from tests.system_packages import ensure_binary

BIN = Path(sys.executable).parent
DOCKERFILE = ROOT / "Dockerfile"
COMPOSE = ROOT / "compose.yaml"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n\s*", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def run(*cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False, cwd=ROOT)


def test_hadolint() -> None:
    result = run(str(BIN / "hadolint"), "--failure-threshold", "info", "--no-color", str(DOCKERFILE))
    assert result.returncode == 0 and not result.stdout.strip(), result.stdout + result.stderr


def test_compose_file_follows_the_compose_specification() -> None:
    result = run(str(BIN / "check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(COMPOSE))
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_in_step_with_pyproject() -> None:
    steps = instructions()
    args = {rest.split("=")[0]: rest.split("=", 1)[1] for word, rest in steps if word == "ARG" and "=" in rest}
    python = args["PYTHON_VERSION"]
    assert python in SpecifierSet(PYPROJECT["project"]["requires-python"])
    assert python == PYPROJECT["tool"]["mypy"]["python_version"]  # the version CI types and tests with
    froms = [rest for word, rest in steps if word == "FROM"]
    assert len(froms) == 2 and froms[0].endswith(" AS builder")  # multi-stage: wheels built apart
    assert all(f.startswith("python:${PYTHON_VERSION}-slim") for f in froms)

    # The builder copies what the package build needs: the package, its readme and its data files.
    copied = {src for word, rest in steps if word == "COPY" and "--from" not in rest for src in rest.split()[:-1]}
    needed = {PYPROJECT["project"]["readme"], "pyproject.toml", "chatd"}
    for patterns in PYPROJECT["tool"]["setuptools"]["data-files"].values():
        needed |= {p.split("/*")[0] for p in patterns}
    missing = {n for n in needed if not any(n == c or n.startswith(c.rstrip("/") + "/") for c in copied)}
    assert not missing, missing

    # The runtime installs chatd (with extras that exist, if any) from the builder's wheels only.
    installs = [rest for word, rest in steps if word == "RUN" and "pip install" in rest]
    assert len(installs) == 1 and "--no-index" in installs[0]
    target = re.search(r"\b(chatd(?:\[([^\]]*)\])?)\s*$", installs[0])
    assert target, installs[0]
    extras = set(filter(None, (target.group(2) or "").split(",")))
    assert extras <= set(PYPROJECT["project"]["optional-dependencies"]) - {"dev", "loadtest", "bench"}
    assert PYPROJECT["project"]["scripts"]["chatd"] == "chatd.cli:main"
    assert ("ENTRYPOINT", '["chatd"]') in steps


def test_dockerfile_runtime_contract() -> None:
    steps = instructions()
    defaults = config_load.load(env={}, need_jwt_secret=False)
    env_line = " ".join(rest for word, rest in steps if word == "ENV")
    env = dict(re.findall(r"(\w+)=(\S+)", env_line))
    chatd_env = {k: v for k, v in env.items() if k.startswith("CHATD_")}
    settings = config_load.load(env=chatd_env)  # every CHATD_ variable is a setting; no JWT_SECRET needed
    assert settings.server.host == "0.0.0.0"  # reachable through -p 8080:8080
    assert settings.auth.jwt_secret_file.startswith(settings.storage.data_dir)  # generated into the volume
    assert ("EXPOSE", str(defaults.server.port)) in steps
    assert ("VOLUME", f'["{settings.storage.data_dir}"]') in steps
    assert ("STOPSIGNAL", "SIGTERM") in steps
    users = [rest for word, rest in steps if word == "USER"]
    assert users and not users[-1].startswith(("root", "0"))
    (health,) = [rest for word, rest in steps if word == "HEALTHCHECK"]
    assert "/health/live" in health and "/health/live" in (ROOT / "chatd" / "process" / "app.py").read_text()
    stop_timeout = int(re.search(r"--stop-timeout (\d+)", DOCKERFILE.read_text()).group(1))  # type: ignore[union-attr]
    assert stop_timeout > defaults.server.shutdown_grace_s


def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return data


def interpolate(value: str) -> str:
    """Compose's ${VAR:-default} / ${VAR:?error}, as if the operator set each required one to a long secret."""

    def one(match: re.Match[str]) -> str:
        default = re.match(r"[A-Z_]+:-(.*)", match.group(1))
        return default.group(1) if default else "x" * 40

    return re.sub(r"\$\{([^}]*)\}", one, value)


def test_compose_in_step_with_chatd() -> None:
    doc = compose()
    services = doc["services"]
    assert {"chatd1", "chatd2", "nginx", "postgres", "valkey"} <= set(services)
    grace = config.ServerSettings().shutdown_grace_s
    for name in ("chatd1", "chatd2"):
        svc = services[name]
        assert int(svc["stop_grace_period"].rstrip("s")) > grace
        env = {k: interpolate(str(v)) for k, v in svc["environment"].items()}
        settings = config_load.load(env=env)  # every variable is a valid setting
        nginx_ip = services["nginx"]["networks"]["chatd"]["ipv4_address"]
        assert settings.server.trusted_proxies == [nginx_ip]
        assert settings.storage.database_url.startswith("postgresql://") and "@postgres:5432/" in env["DATABASE_URL"]
        assert "valkey:6379" in settings.storage.redis_url
        assert set(svc["depends_on"]) == {"postgres", "valkey"}
    assert "pgvector" in services["postgres"]["image"]
    (mount,) = services["nginx"]["volumes"]
    assert (ROOT / mount.split(":")[0].removeprefix("./")).is_file()


def locations(conf: str) -> list[str]:
    """The location blocks of an nginx file, in order (their directives included)."""
    blocks: list[str] = []
    current: list[str] = []
    lines, depth = conf.splitlines(), 0
    for line in lines:
        if not current and line.strip().startswith("location"):
            current, depth = [line], 0
        elif current:
            current.append(line)
        if current:
            depth += line.count("{") - line.count("}")
            if depth == 0:
                blocks.append("\n".join(current))
                current = []
    return blocks


def test_compose_nginx_has_the_tested_locations(tmp_path: Path) -> None:
    """compose.conf serves exactly the locations of chatd.conf (the file test_nginx.py runs), and nginx -t passes."""
    tested = (ROOT / "config" / "nginx" / "chatd.conf").read_text()
    composed = (ROOT / "config" / "nginx" / "compose.conf").read_text()
    assert locations(tested) and locations(composed) == locations(tested)
    nginx = ensure_binary("nginx", "nginx")
    local = composed.replace("chatd1:8080", "127.0.0.1:1").replace("chatd2:8080", "127.0.0.1:2")
    local = local.replace("listen 80;", "listen 127.0.0.1:1;").replace("/dev/stdout", str(tmp_path / "access.log"))
    (tmp_path / "chatd.conf").write_text(local)
    (tmp_path / "nginx.conf").write_text(
        f"pid {tmp_path}/nginx.pid;\nevents {{}}\nhttp {{\n    include {tmp_path}/chatd.conf;\n}}\n"
    )
    result = run(nginx, "-e", "stderr", "-t", "-p", str(tmp_path), "-c", str(tmp_path / "nginx.conf"))
    assert result.returncode == 0, result.stderr


def test_image_environment_starts_with_nothing_set(tmp_path: Path) -> None:
    """What `docker run -p 8080:8080 chatd` runs, minus Docker: the image's ENV, no JWT_SECRET, embedded databases.

    Only the paths move into tmp_path, and the host stays on loopback.
    """
    from tests.support import Chatd, http_get

    env_line = " ".join(rest for word, rest in instructions() if word == "ENV")
    env = dict(re.findall(r"(\w+)=(\S+)", env_line))
    image_dir = env["CHATD_STORAGE_DATA_DIR"]
    env = {k: v.replace(image_dir, str(tmp_path / "volume")) for k, v in env.items()}
    env.update({"CHATD_SERVER_HOST": "127.0.0.1", "DATABASE_URL": "", "REDIS_URL": "", "JWT_SECRET": ""})
    server = Chatd("", "", tmp_path / "serve.log", workers=2, data_dir=tmp_path / "volume", env=env)
    server.start()
    try:
        assert http_get(server.http + "/health/live")[0] == 200
        secret = tmp_path / "volume" / "jwt_secret"
        assert secret.stat().st_mode & 0o777 == 0o600 and len(secret.read_text()) >= 32
        assert server.events("jwt_secret_generated")
    finally:
        assert server.stop() == 0
    # A second start reads the same secret (tokens survive a container restart).
    again = Chatd("", "", tmp_path / "again.log", workers=1, data_dir=tmp_path / "volume", env=env)
    again.start()
    try:
        assert not again.events("jwt_secret_generated")
    finally:
        assert again.stop() == 0


def test_short_secret_file_is_refused(tmp_path: Path) -> None:
    short = tmp_path / "secret"
    short.write_text("too-short")
    result = subprocess.run(
        [sys.executable, "-m", "chatd", "serve", "--port", "0"],
        env={
            "PATH": "/usr/bin:/bin",
            "CHATD_AUTH_JWT_SECRET_FILE": str(short),
            "CHATD_STORAGE_DATA_DIR": str(tmp_path / "var"),
        },
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
        cwd=ROOT,
    )
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert f"auth.jwt_secret_file {short} holds fewer than 32 bytes" in result.stderr.splitlines()[-1]
