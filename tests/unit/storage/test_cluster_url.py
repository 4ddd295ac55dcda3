"""``redis+cluster://`` URLs: parsed, validated, shown without credentials."""

from __future__ import annotations

import pytest

from chatd.storage import redisurl


def test_seed_nodes_credentials_and_partitions() -> None:
    target = redisurl.parse_cluster("redis+cluster://u:p%40ss@10.0.0.1:7000,[::1]:7001,node3?partitions=64")
    assert target.nodes == (("10.0.0.1", 7000), ("::1", 7001), ("node3", 6379))
    assert (target.username, target.password, target.partitions) == ("u", "p@ss", 64)
    assert target.where() == "redis+cluster://10.0.0.1:7000,[::1]:7001,node3:6379"
    assert redisurl.where("redis+cluster://:secret@h:7000/") == "redis+cluster://h:7000"


def test_defaults() -> None:
    target = redisurl.parse_cluster("redis+cluster://h")
    assert target.nodes == (("h", 6379),) and target.partitions == redisurl.DEFAULT_PARTITIONS == 128
    assert target.username is None and target.password is None


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("redis+cluster://h:7000/0", "a cluster has no databases"),
        ("redis+cluster://h:7000?db=1", "unknown option(s) db"),
        ("redis+cluster://h:7000?partitions=0", "partitions='0'"),
        ("redis+cluster://h:7000?partitions=x", "partitions='x'"),
        ("redis+cluster://h:70000", "invalid port"),
        ("redis+cluster://:7000", "has no host"),
    ],
)
def test_refused_with_the_reason(url: str, problem: str) -> None:
    with pytest.raises(ValueError, match=None) as exc:
        redisurl.parse_cluster(url)
    assert problem in str(exc.value)
    assert redisurl.where(url).startswith(("redis+cluster://", "(unparsable"))
