"""Settings, loaded: defaults, then the file, then the environment; checked, and documented.

Sources, later ones win:
  1. ``config/chatd.toml`` shipped with chatd (the documented defaults),
  2. the optional ``--config FILE`` (TOML, same sections),
  3. environment: ``CHATD_<SECTION>_<KEY>`` for every setting, plus the
     conventional ``DATABASE_URL``, ``REDIS_URL``, ``ANTHROPIC_API_KEY``,
     ``ANTHROPIC_BASE_URL`` and ``JWT_SECRET``.

Every value is converted to its declared type (``chatd.process.config``) and checked against the
constraints in its field metadata, so a bad value stops the process at start with a message naming
the key, never deep inside a handler.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import os
import re
import tomllib
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from chatd.core.errors import ConfigError
from chatd.process.config import DEFAULTS_FILE, MIN_SECRET_BYTES, SECTIONS, Settings
from chatd.storage import redisurl

# Conventional names operators already use elsewhere.
_ALIASES: dict[str, tuple[str, str]] = {
    "DATABASE_URL": ("storage", "database_url"),
    "REDIS_URL": ("storage", "redis_url"),
    "ANTHROPIC_API_KEY": ("assistant", "anthropic_api_key"),
    "ANTHROPIC_BASE_URL": ("assistant", "anthropic_base_url"),
    "JWT_SECRET": ("auth", "jwt_secret"),
}
# CHATD_* variables that are not settings.
_NOT_SETTINGS = {"CHATD_CONFIG", "CHATD_EMAIL", "CHATD_PASSWORD", "CHATD_NAME"}  # the last three: `chatd chat`
# Settings that were removed: what replaces them.
_REMOVED = {
    "server.trust_proxy_headers": "replaced by server.trusted_proxies, a list of the proxies' addresses or CIDRs"
    ' (e.g. CHATD_SERVER_TRUSTED_PROXIES=127.0.0.1, or trusted_proxies = ["10.0.0.0/8"] under [server])',
}


def env_name(section: str, key: str) -> str:
    return f"CHATD_{section}_{key}".upper()


def _coerce(key: str, raw: Any, typ: Any, from_env: bool) -> Any:
    """Convert ``raw`` to ``typ`` or raise ConfigError naming ``key``."""
    origin = typing.get_origin(typ)
    if typ is bool:
        if isinstance(raw, bool):
            return raw
        if from_env and isinstance(raw, str):
            low = raw.strip().lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
        raise ConfigError(key, f"expected a boolean, got {raw!r}")
    if typ is int:
        if isinstance(raw, int) and not isinstance(raw, bool):
            return raw
        if from_env and isinstance(raw, str):
            try:
                return int(raw.strip())
            except ValueError:
                pass
        raise ConfigError(key, f"expected an integer, got {raw!r}")
    if typ is float:
        if isinstance(raw, (int, float)) and not isinstance(raw, bool):
            return float(raw)
        if from_env and isinstance(raw, str):
            try:
                return float(raw.strip())
            except ValueError:
                pass
        raise ConfigError(key, f"expected a number, got {raw!r}")
    if typ is str:
        if isinstance(raw, str):
            return raw
        raise ConfigError(key, f"expected a string, got {raw!r}")
    if origin is list:
        if from_env and isinstance(raw, str):
            raw = _env_list(key, raw)
        if isinstance(raw, list) and all(isinstance(x, str) for x in raw):
            return list(raw)
        raise ConfigError(key, f"expected a list of strings, got {raw!r}")
    raise ConfigError(key, f"unsupported type {typ!r}")  # pragma: no cover - programming error


def _env_list(key: str, raw: str) -> list[str]:
    """A list from one environment variable: a JSON list (the pydantic-settings convention) or commas."""
    text = raw.strip()
    if not text.startswith("["):
        return [part.strip() for part in text.split(",") if part.strip()]
    hint = 'write a JSON list of strings like ["a", "b"], or a,b'
    try:
        value = json.loads(text)
    except ValueError as exc:
        problem = getattr(exc, "msg", str(exc))
        raise ConfigError(key, f"starts with [ but is not a JSON list ({problem}): {raw!r}; {hint}") from None
    if not isinstance(value, list) or not all(isinstance(x, str) for x in value):
        raise ConfigError(key, f"expected a JSON list of strings, got {raw!r}; {hint}")
    return [x.strip() for x in value if x.strip()]


def _check(key: str, value: Any, meta: Mapping[str, Any]) -> None:
    if "min" in meta and value < meta["min"]:
        raise ConfigError(key, f"must be >= {meta['min']}, got {value!r}")
    if "max" in meta and value > meta["max"]:
        raise ConfigError(key, f"must be <= {meta['max']}, got {value!r}")
    if "choices" in meta and value not in meta["choices"]:
        raise ConfigError(key, f"must be one of {', '.join(meta['choices'])}; got {value!r}")


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(str(path), "config file not found") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(str(path), f"invalid TOML: {exc}") from None


def _merge_file(values: dict[str, dict[str, Any]], data: Mapping[str, Any], origin: str) -> None:
    for section, body in data.items():
        if section not in SECTIONS:
            raise ConfigError(section, f"unknown section in {origin}")
        if not isinstance(body, dict):
            raise ConfigError(section, f"must be a table in {origin}")
        known = {f.name for f in dataclasses.fields(SECTIONS[section])}
        for key, raw in body.items():
            if f"{section}.{key}" in _REMOVED:
                raise ConfigError(f"{section}.{key}", f"{_REMOVED[f'{section}.{key}']} (in {origin})")
            if key not in known:
                raise ConfigError(f"{section}.{key}", f"unknown setting in {origin}")
            values[section][key] = (raw, False)


def load(
    config_file: str | os.PathLike[str] | None = None,
    env: Mapping[str, str] | None = None,
    *,
    need_jwt_secret: bool = True,
) -> Settings:
    """Build the Settings from defaults, the optional file and the environment.

    ``need_jwt_secret``: False for commands that never sign or check a token (``migrate``, ``create-user``).
    """
    env = os.environ if env is None else env
    values: dict[str, dict[str, Any]] = {name: {} for name in SECTIONS}
    if DEFAULTS_FILE.exists():  # absent only when installed without the source tree
        _merge_file(values, _read_toml(DEFAULTS_FILE), str(DEFAULTS_FILE))
    config_file = config_file or env.get("CHATD_CONFIG") or None
    if config_file:
        _merge_file(values, _read_toml(Path(config_file)), str(config_file))

    by_env = {env_name(s, f.name): (s, f.name) for s, cls in SECTIONS.items() for f in dataclasses.fields(cls)}
    for name, value in env.items():
        if name in _ALIASES and value != "":
            section, key = _ALIASES[name]
            values[section][key] = (value, True)
    for name, value in env.items():
        if not name.startswith("CHATD_") or name in _NOT_SETTINGS:
            continue
        removed = next((k for k in _REMOVED if env_name(*k.split(".")) == name), None)
        if removed is not None:
            raise ConfigError(name, _REMOVED[removed])
        if name not in by_env:
            raise ConfigError(name, "unknown environment setting (see docs/CONFIG.md)")
        section, key = by_env[name]
        values[section][key] = (value, True)

    sections: dict[str, Any] = {}
    for section, cls in SECTIONS.items():
        hints = typing.get_type_hints(cls)
        kwargs: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            if f.name not in values[section]:
                continue
            raw, from_env = values[section][f.name]
            key = f"{section}.{f.name}"
            value = _coerce(key, raw, hints[f.name], from_env)
            _check(key, value, f.metadata)
            kwargs[f.name] = value
        sections[section] = cls(**kwargs)
    settings = Settings(**sections)
    validate(settings, need_jwt_secret=need_jwt_secret)
    return settings


def validate(settings: Settings, *, need_jwt_secret: bool = True) -> None:
    """Checks that span several settings, and the form of the URLs (reachability: ``check-config --connect``)."""
    auth = settings.auth
    _check_database_url(settings.storage.database_url)
    _check_redis_url(settings.storage.redis_url)
    for proxy in settings.server.trusted_proxies:
        try:
            ipaddress.ip_network(proxy, strict=False)
        except ValueError:
            raise ConfigError(
                "server.trusted_proxies", f"{proxy!r} is not an IP address or CIDR (e.g. 127.0.0.1, 10.0.0.0/8)"
            ) from None
    secret_from_file = auth.jwt_secret_file and not auth.jwt_secret  # read (and checked) at start
    if (
        need_jwt_secret
        and not settings.server.dev_mode
        and not secret_from_file
        and len(auth.jwt_secret.encode()) < MIN_SECRET_BYTES
    ):
        raise ConfigError(
            "auth.jwt_secret",
            f"must be at least {MIN_SECRET_BYTES} bytes outside dev_mode (set JWT_SECRET, or auth.jwt_secret_file,"
            " or server.dev_mode = true)",
        )
    if auth.jwt_public_key_file and not Path(auth.jwt_public_key_file).is_file():
        raise ConfigError("auth.jwt_public_key_file", f"file not found: {auth.jwt_public_key_file}")
    assistant = settings.assistant
    if assistant.provider == "anthropic" and not assistant.anthropic_api_key:
        raise ConfigError("assistant.provider", "anthropic needs ANTHROPIC_API_KEY (or assistant.anthropic_api_key)")
    if assistant.provider == "openai" and not assistant.openai_base_url:
        raise ConfigError("assistant.provider", "openai needs assistant.openai_base_url")
    if settings.storage.pg_pool_min > settings.storage.pg_pool_max:
        raise ConfigError("storage.pg_pool_min", "must be <= storage.pg_pool_max")
    if settings.ws.typing_ttl_s <= settings.ws.typing_interval_s:
        raise ConfigError("ws.typing_ttl_s", "must be greater than ws.typing_interval_s")
    for origin in settings.server.allowed_origins:
        _check_origin(origin)


# What a browser sends in Origin: scheme://host[:port], lower case, nothing else (a trailing / is tolerated).
_LABEL = r"[a-z0-9](?:[a-z0-9-]*[a-z0-9])?"
_ORIGIN = re.compile(rf"[a-z][a-z0-9+.-]*://(?:{_LABEL}(?:\.{_LABEL})*|\[[0-9a-f:.]+\])(?::(?P<port>[0-9]{{1,5}}))?/?")


def _check_origin(origin: str) -> None:
    if origin == "*":
        return
    match = _ORIGIN.fullmatch(origin)
    if match is None or not 0 < int(match["port"] or 1) <= 65535:
        raise ConfigError(
            "server.allowed_origins",
            f"{origin!r} is not an origin: write scheme://host[:port] in lower case, without path or user, as"
            " browsers send it (e.g. https://chat.example.com); several: a JSON list or commas",
        )


def secret_warning(secret: str, dev_mode: bool) -> str | None:
    """A short JWT secret is accepted in dev_mode only (``validate`` refuses it elsewhere), never silently."""
    size = len(secret.encode())
    if not dev_mode or not secret or size >= MIN_SECRET_BYTES:
        return None
    return (
        f"the JWT secret is {size} bytes, accepted only because server.dev_mode is on: anyone who guesses it can"
        f" sign tokens; use at least {MIN_SECRET_BYTES} random bytes (openssl rand -base64 48), or leave JWT_SECRET"
        " empty in development to have one generated"
    )


def warnings(settings: Settings) -> list[str]:
    """Settings that are allowed but probably a mistake, as ``key: problem`` lines (``check-config``)."""
    out = []
    secret = secret_warning(settings.auth.jwt_secret, settings.server.dev_mode)
    if secret:
        out.append(f"auth.jwt_secret: {secret}")
    return out


_DATABASE_URL_HINT = (
    "set DATABASE_URL to postgresql://user:password@host:5432/dbname (or a key=value conninfo),"
    " or leave it empty for the embedded PostgreSQL"
)


def _check_database_url(url: str) -> None:
    if not url:
        return
    from psycopg import ProgrammingError
    from psycopg.conninfo import conninfo_to_dict

    if "://" in url and not url.startswith(("postgresql://", "postgres://")):
        scheme = url.split("://")[0]
        raise ConfigError("storage.database_url", f"scheme {scheme!r} is not postgresql://; {_DATABASE_URL_HINT}")
    try:
        conninfo_to_dict(url)
    except ProgrammingError as exc:
        problem = str(exc).strip()
        raise ConfigError("storage.database_url", f"cannot be parsed ({problem}); {_DATABASE_URL_HINT}") from None


def _check_redis_url(url: str) -> None:
    if not url:
        return
    from redis.connection import parse_url

    if redisurl.is_sentinel(url) or redisurl.is_cluster(url):
        try:
            (redisurl.parse_sentinel if redisurl.is_sentinel(url) else redisurl.parse_cluster)(url)
        except ValueError as exc:
            raise ConfigError("storage.redis_url", f"{exc}; {redisurl.HINT}") from None
        return
    try:
        parse_url(url)  # type: ignore[no-untyped-call]
    except ValueError as exc:
        raise ConfigError("storage.redis_url", f"{exc}; {redisurl.HINT}") from None
    if url.startswith(("redis://", "rediss://")) and not url.split("://", 1)[1].split("/", 1)[0].rpartition("@")[2]:
        raise ConfigError("storage.redis_url", f"has no host; {redisurl.HINT}")


def as_dict(settings: Settings, *, mask_secrets: bool = True) -> dict[str, dict[str, Any]]:
    """The effective settings, secrets masked, for ``chatd check-config``."""
    out: dict[str, dict[str, Any]] = {}
    for section in SECTIONS:
        obj = getattr(settings, section)
        body: dict[str, Any] = {}
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if mask_secrets and f.metadata.get("secret") and value:
                value = _mask(f.name, value)
            body[f.name] = value
        out[section] = body
    return out


def _mask(name: str, value: str) -> str:
    if not name.endswith("_url"):
        return "***"
    base, question, query = value.partition("?")
    if query:  # e.g. sentinel://...?sentinel_password=...
        query = re.sub(r"(password=)[^&]*", r"\1***", query)
    if "@" in base:
        # Keep the host visible, hide credentials: postgresql://user:***@host/db
        scheme, _, rest = base.partition("://")
        creds, _, host = rest.rpartition("@")
        user = creds.split(":", 1)[0]
        base = f"{scheme}://{user}:***@{host}"
    return base + question + query


def reference_markdown() -> str:
    """docs/CONFIG.md, generated from the dataclasses (a test keeps it current)."""
    lines = [
        "# chatd configuration",
        "",
        "Generated from `chatd/process/config.py` by `chatd config-doc`; do not edit by hand.",
        "",
        "Settings come from `config/chatd.toml` (defaults), then the file given with `--config`"
        " (or `CHATD_CONFIG`), then environment variables. Every setting has an environment"
        " variable `CHATD_<SECTION>_<KEY>`; the conventional `DATABASE_URL`, `REDIS_URL`,"
        " `ANTHROPIC_API_KEY`, `ANTHROPIC_BASE_URL` and `JWT_SECRET` are read too. A list in the environment is"
        ' a JSON list (`CHATD_SERVER_ALLOWED_ORIGINS=\'["https://a.example", "https://b.example"]\'`) or'
        " comma-separated (`https://a.example,https://b.example`)."
        " An unknown key or `CHATD_*` variable, or a value of the wrong type or out of range,"
        " stops chatd at start with a message naming the key.",
        "",
    ]
    for section, cls in SECTIONS.items():
        lines += [f"## [{section}]", "", "| key | type | default | env | meaning |", "|---|---|---|---|---|"]
        hints = typing.get_type_hints(cls)
        instance = cls()
        for f in dataclasses.fields(cls):
            typ = hints[f.name]
            tname = getattr(typ, "__name__", str(typ)) if typing.get_origin(typ) is None else "list[str]"
            default = getattr(instance, f.name)
            meta = f.metadata
            bounds = []
            if "min" in meta:
                bounds.append(f">= {meta['min']}")
            if "max" in meta:
                bounds.append(f"<= {meta['max']}")
            if "choices" in meta:
                bounds.append("one of " + ", ".join(meta["choices"]))
            doc = meta["doc"] + (f" ({'; '.join(bounds)})" if bounds else "")
            shown = "(secret)" if meta.get("secret") and default else repr(default).replace("|", "\\|")
            lines.append(f"| `{f.name}` | {tname} | `{shown}` | `{env_name(section, f.name)}` | {doc} |")
        lines.append("")
    return "\n".join(lines)
