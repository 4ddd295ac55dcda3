"""sentinel:// URLs: what chatd reads from them, and what it refuses with a reason."""

from __future__ import annotations

import pytest

from chatd.core.errors import ConfigError
from chatd.process import config_load
from chatd.storage.redisurl import SentinelTarget, parse_sentinel, where


def test_full_url() -> None:
    target = parse_sentinel(
        "sentinel://app:s%40cret@10.0.0.1:26379,10.0.0.2,[::1]:26380/cache-main/3"
        "?sentinel_password=sp&sentinel_username=su"
    )
    assert target == SentinelTarget(
        sentinels=(("10.0.0.1", 26379), ("10.0.0.2", 26379), ("::1", 26380)),
        master="cache-main",
        db=3,
        username="app",
        password="s@cret",
        sentinel_username="su",
        sentinel_password="sp",
    )
    assert target.where() == "sentinel://10.0.0.1:26379,10.0.0.2:26379,[::1]:26380/cache-main/3"


def test_minimal_url() -> None:
    target = parse_sentinel("sentinel://s1/mymaster")
    assert (target.sentinels, target.master, target.db, target.password) == ((("s1", 26379),), "mymaster", 0, None)
    assert parse_sentinel("sentinel://:pw@s1:1/m").password == "pw"


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("sentinel://s1:26379", "names no master"),
        ("sentinel://s1:26379/", "names no master"),
        ("sentinel://s1:26379/m/x", "not /<master name>[/<db number>]"),
        ("sentinel://s1:26379/m/0/1", "not /<master name>[/<db number>]"),
        ("sentinel://s1:port/m", "invalid port"),
        ("sentinel://s1:70000/m", "invalid port"),
        ("sentinel://s1,,s2/m", "has no host"),
        ("sentinel:///m", "has no host"),
        ("sentinel://[::1/m", "is not [ipv6]:port"),
        ("sentinel://s1/m?password=x", "unknown option(s) password"),
    ],
)
def test_bad_urls_say_why(url: str, problem: str) -> None:
    with pytest.raises(ValueError, match=problem.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        parse_sentinel(url)
    with pytest.raises(ConfigError, match=r"storage\.redis_url: .*sentinel://"):
        config_load.load(env={"REDIS_URL": url}, need_jwt_secret=False)


def test_config_accepts_and_masks_a_sentinel_url() -> None:
    url = "sentinel://:secret@10.0.0.1:26379,10.0.0.2:26379/mymaster/1?sentinel_password=topsecret"
    settings = config_load.load(env={"REDIS_URL": url}, need_jwt_secret=False)
    assert settings.storage.redis_url == url
    shown = config_load.as_dict(settings)["storage"]["redis_url"]
    assert "secret" not in shown.replace("sentinel_password", "")
    assert shown == "sentinel://:***@10.0.0.1:26379,10.0.0.2:26379/mymaster/1?sentinel_password=***"


def test_where_never_shows_credentials() -> None:
    assert where("sentinel://u:pw@h:1/m") == "sentinel://h:1/m/0"
    assert where("redis://:pw@cache:6380/2") == "redis://cache:6380/2"
