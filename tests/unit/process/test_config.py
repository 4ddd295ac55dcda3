from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from chatd.cli import main
from chatd.core.errors import ConfigError
from chatd.process import config, config_load

SECRET = "s" * 40
ROOT = Path(__file__).resolve().parents[3]


def load(env: dict[str, str] | None = None, file: Path | None = None) -> config.Settings:
    return config_load.load(file, env={"JWT_SECRET": SECRET, **(env or {})})


def test_defaults_file_matches_dataclass_defaults() -> None:
    # config/chatd.toml documents the defaults; it must not silently change them.
    loaded = load()
    expected = config.replace(config.Settings(), "auth", jwt_secret=SECRET)
    assert loaded == expected


def test_env_overrides_file_overrides_defaults(tmp_path: Path) -> None:
    f = tmp_path / "c.toml"
    f.write_text("[server]\nport = 9000\nworkers = 3\n[ws]\nmax_frame_bytes = 1024\n")
    s = load({"CHATD_SERVER_PORT": "9100", "CHATD_SERVER_ALLOWED_ORIGINS": "https://a.example, https://b.example"}, f)
    assert s.server.port == 9100  # env beats file
    assert s.server.workers == 3  # file beats defaults
    assert s.ws.max_frame_bytes == 1024
    assert s.server.allowed_origins == ["https://a.example", "https://b.example"]


def test_conventional_env_names() -> None:
    s = load({"DATABASE_URL": "postgresql://u:p@h/db", "REDIS_URL": "redis://h:6379/0", "ANTHROPIC_API_KEY": "k"})
    assert s.storage.database_url == "postgresql://u:p@h/db"
    assert s.storage.redis_url == "redis://h:6379/0"
    assert s.assistant.anthropic_api_key == "k"


@pytest.mark.parametrize(
    ("env", "key"),
    [
        ({"CHATD_SERVER_PORT": "http"}, "server.port"),
        ({"CHATD_SERVER_PORT": "70000"}, "server.port"),
        ({"CHATD_SERVER_REUSE_PORT": "maybe"}, "server.reuse_port"),
        ({"CHATD_WS_MAX_FRAME_BYTES": "10"}, "ws.max_frame_bytes"),
        ({"CHATD_LOG_LEVEL": "loud"}, "log.level"),
        ({"CHATD_SERVER_NOPE": "1"}, "CHATD_SERVER_NOPE"),
        ({"CHATD_STORAGE_PG_POOL_MIN": "25"}, "storage.pg_pool_min"),  # above pg_pool_max (20)
        ({"CHATD_SERVER_ALLOWED_ORIGINS": "chat.example.com"}, "server.allowed_origins"),
        ({"JWT_SECRET": "short"}, "auth.jwt_secret"),
    ],
)
def test_invalid_values_name_the_key(env: dict[str, str], key: str) -> None:
    with pytest.raises(ConfigError) as exc:
        load(env)
    assert exc.value.key == key


@pytest.mark.parametrize(
    ("toml", "key"),
    [
        ('[server]\nport = "80"\n', "server.port"),
        ("[server]\nbogus = 1\n", "server.bogus"),
        ("[nosuch]\nx = 1\n", "nosuch"),
        ("[server\n", None),
    ],
)
def test_invalid_files_name_the_key(tmp_path: Path, toml: str, key: str | None) -> None:
    f = tmp_path / "bad.toml"
    f.write_text(toml)
    with pytest.raises(ConfigError) as exc:
        load(file=f)
    assert exc.value.key == (key or str(f))


def test_make_run_streams_the_offline_assistant_at_a_models_pace() -> None:
    # Issue 22: at the default 50 words/s an offline answer was over in under a second, before Stop could be
    # tried. config/dev.toml (make run) slows it to a model's pace; servers without it (tests) keep 50.
    dev = load(file=ROOT / "config" / "dev.toml")
    assert 20 <= dev.assistant.offline_tokens_per_s <= 30
    assert load().assistant.offline_tokens_per_s == 50


def test_short_secret_allowed_in_dev_mode() -> None:
    s = config_load.load(None, env={"CHATD_SERVER_DEV_MODE": "true"})
    assert s.server.dev_mode and s.auth.jwt_secret == ""


def test_secrets_are_masked() -> None:
    s = load({"DATABASE_URL": "postgresql://chatd:hunter2@db.internal:5432/chatd", "ANTHROPIC_API_KEY": "sk-ant-x"})
    shown = config_load.as_dict(s)
    assert shown["auth"]["jwt_secret"] == "***"
    assert shown["assistant"]["anthropic_api_key"] == "***"
    assert shown["storage"]["database_url"] == "postgresql://chatd:***@db.internal:5432/chatd"
    assert "hunter2" not in repr(shown)


def test_check_config_cli(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("JWT_SECRET", SECRET)
    monkeypatch.setenv("CHATD_WS_IDLE_TIMEOUT_S", "-5")
    assert main(["check-config"]) == 2
    assert "ws.idle_timeout_s" in capsys.readouterr().err
    monkeypatch.delenv("CHATD_WS_IDLE_TIMEOUT_S")
    assert main(["check-config"]) == 0
    out = capsys.readouterr().out
    assert '"jwt_secret": "***"' in out and SECRET not in out


def test_config_doc_is_current() -> None:
    # docs/CONFIG.md is generated: `make docs` rewrites it.
    assert (ROOT / "docs" / "CONFIG.md").read_text() == config_load.reference_markdown()


def test_every_setting_is_documented() -> None:
    for section_cls in config.SECTIONS.values():
        for f in dataclasses.fields(section_cls):
            assert f.metadata.get("doc"), f"{section_cls.__name__}.{f.name} has no doc"


@pytest.mark.parametrize(
    ("env", "key"),
    [
        ({"CHATD_ASSISTANT_PROVIDER": "anthropic"}, "assistant.provider"),
        ({"CHATD_ASSISTANT_PROVIDER": "openai"}, "assistant.provider"),
    ],
)
def test_provider_without_its_endpoint_fails_at_start(env: dict[str, str], key: str) -> None:
    with pytest.raises(ConfigError) as exc:
        load(env)
    assert exc.value.key == key


def test_env_example_loads() -> None:
    """config/chatd.env.example is what operators copy: every line in it must be a valid setting."""
    env = {}
    for line in (ROOT / "config" / "chatd.env.example").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            key, _, value = line.partition("=")
            env[key] = value
    settings = config_load.load(env=env)
    assert settings.server.trusted_proxies == ["127.0.0.1"]


def test_removed_trust_proxy_headers_points_to_its_replacement(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="trusted_proxies"):
        load({"CHATD_SERVER_TRUST_PROXY_HEADERS": "true"})
    file = tmp_path / "c.toml"
    file.write_text("[server]\ntrust_proxy_headers = true\n")
    with pytest.raises(ConfigError, match="trusted_proxies"):
        load(file=file)


@pytest.mark.parametrize("bad", ["nginx", "10.0.0.0/33", "1.2.3"])
def test_trusted_proxies_must_be_addresses(bad: str) -> None:
    with pytest.raises(ConfigError, match=r"server\.trusted_proxies"):
        load({"CHATD_SERVER_TRUSTED_PROXIES": f"127.0.0.1,{bad}"})


@pytest.mark.parametrize(
    ("env", "key"),
    [
        ({"DATABASE_URL": "garbage"}, "storage.database_url"),
        ({"DATABASE_URL": "mysql://u@h/db"}, "storage.database_url"),
        ({"REDIS_URL": "garbage"}, "storage.redis_url"),
        ({"REDIS_URL": "http://h:6379"}, "storage.redis_url"),
        ({"REDIS_URL": "redis://h:port/0"}, "storage.redis_url"),
    ],
)
def test_urls_are_checked(env: dict[str, str], key: str) -> None:
    with pytest.raises(ConfigError, match=key):
        load(env)


def test_good_urls_pass() -> None:
    settings = load({"DATABASE_URL": "postgresql://u:p@db:5432/chatd", "REDIS_URL": "rediss://:pw@cache:6380/1"})
    assert settings.storage.redis_url.startswith("rediss://")
    assert load({"DATABASE_URL": "host=/run/postgresql dbname=chatd", "REDIS_URL": "unix:///run/r.sock"})


def test_one_shot_commands_need_no_secret() -> None:
    with pytest.raises(ConfigError, match="jwt_secret"):
        config_load.load(env={})
    assert config_load.load(env={}, need_jwt_secret=False).auth.jwt_secret == ""


@pytest.mark.parametrize(
    ("name", "raw", "expected"),
    [
        ("CHATD_SERVER_ALLOWED_ORIGINS", '["https://a.example"]', ["https://a.example"]),
        ("CHATD_SERVER_ALLOWED_ORIGINS", ' ["https://a.example", "http://b.example:8080"] ', None),
        ("CHATD_SERVER_ALLOWED_ORIGINS", "https://a.example,http://b.example:8080", None),
        ("CHATD_SERVER_ALLOWED_ORIGINS", "[]", []),
        ("CHATD_SERVER_TRUSTED_PROXIES", '["127.0.0.1", "10.0.0.0/8"]', ["127.0.0.1", "10.0.0.0/8"]),
        ("CHATD_FILES_INLINE_TYPES", '["image/png"]', ["image/png"]),
        ("CHATD_FILES_INLINE_TYPES", "image/png, image/gif", ["image/png", "image/gif"]),
    ],
)
def test_env_lists_are_json_or_commas(name: str, raw: str, expected: list[str] | None) -> None:
    """The pydantic-settings convention (a JSON list) and plain commas give the same list, for every list setting."""
    section, _, key = name.removeprefix("CHATD_").lower().partition("_")
    value = getattr(getattr(load({name: raw}), section), key)
    assert value == (expected if expected is not None else ["https://a.example", "http://b.example:8080"])


@pytest.mark.parametrize("raw", ['["https://a.example"', "[1, 2]", "['https://a.example']", '["a", ["b"]]'])
def test_env_list_that_is_not_a_json_list_of_strings_names_the_key(raw: str) -> None:
    with pytest.raises(ConfigError, match="JSON list") as exc:
        load({"CHATD_SERVER_ALLOWED_ORIGINS": raw})
    assert exc.value.key == "server.allowed_origins"


@pytest.mark.parametrize(
    "bad",
    [
        '["https://a.example"]',  # what a JSON list becomes when split on commas
        "chat.example.com",
        "https://",
        "https://a.example/app",
        "https://a.example/?x=1",
        "https://user@a.example",
        "https://a.example:99999",
        "https://a.example:http",
        "https://A.example",  # browsers send lower case: it would never match
        "https:/a.example",
        "https://a example",
    ],
)
def test_origins_must_be_scheme_host_port(bad: str) -> None:
    with pytest.raises(ConfigError, match="scheme://host") as exc:
        load({"CHATD_SERVER_ALLOWED_ORIGINS": f"https://ok.example,{bad}"})
    assert exc.value.key == "server.allowed_origins"
    assert repr(bad) in str(exc.value)


@pytest.mark.parametrize(
    "good", ["*", "https://a.example", "http://127.0.0.1:8080", "https://a.example/", "http://[::1]:8080", "app://x"]
)
def test_good_origins_pass(good: str) -> None:
    assert load({"CHATD_SERVER_ALLOWED_ORIGINS": good}).server.allowed_origins == [good]


def test_origins_in_the_file_are_checked_too(tmp_path: Path) -> None:
    f = tmp_path / "c.toml"
    f.write_text('[server]\nallowed_origins = ["https://a.example/app"]\n')
    with pytest.raises(ConfigError, match="scheme://host"):
        load(file=f)


def test_short_secret_in_dev_mode_is_warned_about(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    dev = {"CHATD_SERVER_DEV_MODE": "true"}
    assert config_load.warnings(config_load.load(env={**dev, "JWT_SECRET": SECRET})) == []
    assert config_load.warnings(config_load.load(env=dev)) == []  # none: a long one is generated at start
    (warning,) = config_load.warnings(config_load.load(env={**dev, "JWT_SECRET": "dev"}))
    assert warning.startswith("auth.jwt_secret: ") and "3 bytes" in warning and "dev_mode" in warning
    for name, value in {**dev, "JWT_SECRET": "dev"}.items():
        monkeypatch.setenv(name, value)
    assert main(["check-config"]) == 0
    assert "warning: auth.jwt_secret: " in capsys.readouterr().err


def test_serve_warns_about_a_short_dev_secret_from_env_or_file(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from chatd.process.server import _with_secret

    dev = config_load.load(env={"CHATD_SERVER_DEV_MODE": "true", "JWT_SECRET": "dev"})
    with caplog.at_level("WARNING", logger="chatd.server"):
        assert _with_secret(dev).auth.jwt_secret == "dev"
    assert [r.getMessage() for r in caplog.records] == ["jwt_secret_short"]
    caplog.clear()
    short = tmp_path / "secret"
    short.write_text("tiny\n")
    from_file = config_load.load(env={"CHATD_SERVER_DEV_MODE": "true", "CHATD_AUTH_JWT_SECRET_FILE": str(short)})
    with caplog.at_level("WARNING", logger="chatd.server"):
        assert _with_secret(from_file).auth.jwt_secret == "tiny"
    assert [r.getMessage() for r in caplog.records] == ["jwt_secret_short"]
    caplog.clear()
    with caplog.at_level("WARNING", logger="chatd.server"):
        _with_secret(config_load.load(env={"CHATD_SERVER_DEV_MODE": "true", "JWT_SECRET": SECRET}))
    assert caplog.records == []


def test_a_json_list_reaches_check_config(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("JWT_SECRET", SECRET)
    monkeypatch.setenv("CHATD_SERVER_ALLOWED_ORIGINS", '["https://a.example", "https://b.example"]')
    assert main(["check-config"]) == 0
    assert '"https://a.example",\n      "https://b.example"' in capsys.readouterr().out
    monkeypatch.setenv("CHATD_SERVER_ALLOWED_ORIGINS", '["https://a.example/"], https://b.example')
    assert main(["check-config"]) == 2
    assert "server.allowed_origins" in capsys.readouterr().err
