"""Where Redis is: ``redis://``, ``rediss://``, ``unix://`` (redis-py parses those), or Sentinel.

``sentinel://[[user]:password@]host[:port][,host[:port]...]/master[/db][?sentinel_password=...]``
``redis+cluster://[[user]:password@]host[:port][,host[:port]...][/][?partitions=128]``

lists the sentinels (port 26379 by default) and names the primary they watch
(``sentinel monitor <master> ...`` in sentinel.conf).  The credentials and
``db`` are those of the Redis primary and replicas; ``sentinel_username`` /
``sentinel_password`` authenticate to the sentinels themselves when they
have ``requirepass`` set.

``redis+cluster://`` lists some nodes of a Redis Cluster (port 6379 by default): the client asks them
for the slot map and follows it.  ``partitions`` is the number of sharded pub/sub channels the room and
user events are spread over (``chatd.core.keys``); every instance must use the same.

Parsing only, no I/O: ``config`` validates with it,
``kv`` and ``server`` connect with it.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import parse_qs, unquote

SCHEME = "sentinel://"
CLUSTER_SCHEME = "redis+cluster://"
DEFAULT_SENTINEL_PORT = 26379
DEFAULT_CLUSTER_PORT = 6379
DEFAULT_PARTITIONS = 128  # Centrifugo's default: enough to spread over any cluster, few enough to resubscribe
_QUERY_KEYS = {"sentinel_username", "sentinel_password"}
HINT = (
    "set REDIS_URL to redis://[:password@]host:6379/0, rediss:// (TLS), unix:///path/to.sock, or"
    " sentinel://[:password@]host1:26379,host2:26379,host3:26379/mymaster[/0] for a Sentinel-managed primary,"
    " or redis+cluster://[:password@]host1:6379,host2:6379,host3:6379 for a Redis Cluster,"
    " or leave it empty for the embedded Valkey"
)


@dataclass(frozen=True, slots=True)
class SentinelTarget:
    sentinels: tuple[tuple[str, int], ...]
    master: str
    db: int = 0
    username: str | None = None
    password: str | None = None
    sentinel_username: str | None = None
    sentinel_password: str | None = None

    def where(self) -> str:
        """For messages and logs: no credentials."""
        hosts = ",".join(f"[{h}]:{p}" if ":" in h else f"{h}:{p}" for h, p in self.sentinels)
        return f"{SCHEME}{hosts}/{self.master}/{self.db}"


@dataclass(frozen=True, slots=True)
class ClusterTarget:
    nodes: tuple[tuple[str, int], ...]
    username: str | None = None
    password: str | None = None
    partitions: int = DEFAULT_PARTITIONS

    def where(self) -> str:
        """For messages and logs: no credentials."""
        hosts = ",".join(f"[{h}]:{p}" if ":" in h else f"{h}:{p}" for h, p in self.nodes)
        return f"{CLUSTER_SCHEME}{hosts}"


def is_sentinel(url: str) -> bool:
    return url.startswith(SCHEME)


def is_cluster(url: str) -> bool:
    return url.startswith(CLUSTER_SCHEME)


def parse_cluster(url: str) -> ClusterTarget:
    """The seed nodes, credentials and partition count of a ``redis+cluster://`` URL; ValueError naming the problem."""
    if not is_cluster(url):
        raise ValueError("not a redis+cluster:// URL")
    rest, _, query = url[len(CLUSTER_SCHEME) :].partition("?")
    netloc, _, path = rest.partition("/")
    if path:
        raise ValueError(f"path /{path}: a cluster has no databases (redis+cluster://host:port[,host:port...])")
    creds, at, hosts = netloc.rpartition("@")
    username = password = None
    if at:
        user, colon, secret = creds.partition(":")
        username = unquote(user) or None
        password = unquote(secret) if colon else None
    nodes = tuple(_host_port(h, DEFAULT_CLUSTER_PORT, "cluster node") for h in hosts.split(","))
    options = parse_qs(query, keep_blank_values=True, strict_parsing=bool(query)) if query else {}
    unknown = set(options) - {"partitions"}
    if unknown:
        raise ValueError(f"unknown option(s) {', '.join(sorted(unknown))} (known: partitions)")
    partitions = options.get("partitions", [str(DEFAULT_PARTITIONS)])[-1]
    if not partitions.isdigit() or not 1 <= int(partitions) <= 16384:
        raise ValueError(f"partitions={partitions!r} is not a number from 1 to 16384")
    return ClusterTarget(nodes=nodes, username=username, password=password, partitions=int(partitions))


def parse_sentinel(url: str) -> SentinelTarget:
    """The sentinels, master name, db and credentials of a ``sentinel://`` URL; ValueError naming the problem."""
    if not is_sentinel(url):
        raise ValueError("not a sentinel:// URL")
    rest, _, query = url[len(SCHEME) :].partition("?")
    netloc, _, path = rest.partition("/")
    creds, at, hosts = netloc.rpartition("@")
    username = password = None
    if at:
        user, colon, secret = creds.partition(":")
        username = unquote(user) or None
        password = unquote(secret) if colon else None
    sentinels = tuple(_host_port(h, DEFAULT_SENTINEL_PORT, "sentinel") for h in hosts.split(","))
    parts = [unquote(p) for p in path.split("/")] if path else []
    if not parts or not parts[0]:
        raise ValueError("names no master (sentinel://host:26379/<master name>)")
    if len(parts) > 2 or (len(parts) == 2 and not parts[1].isdigit()):
        raise ValueError(f"path /{path} is not /<master name>[/<db number>]")
    options = parse_qs(query, keep_blank_values=True, strict_parsing=bool(query)) if query else {}
    unknown = set(options) - _QUERY_KEYS
    if unknown:
        raise ValueError(f"unknown option(s) {', '.join(sorted(unknown))} (known: {', '.join(sorted(_QUERY_KEYS))})")
    return SentinelTarget(
        sentinels=sentinels,
        master=parts[0],
        db=int(parts[1]) if len(parts) == 2 else 0,
        username=username,
        password=password,
        sentinel_username=options.get("sentinel_username", [None])[-1],
        sentinel_password=options.get("sentinel_password", [None])[-1],
    )


def _host_port(item: str, default_port: int, what: str) -> tuple[str, int]:
    item = item.strip()
    if item.startswith("["):  # [IPv6]:port
        host, bracket, port = item[1:].partition("]")
        if not bracket or (port and not port.startswith(":")):
            raise ValueError(f"{what} address {item!r} is not [ipv6]:port")
        port = port[1:]
    else:
        host, _, port = item.partition(":")
    if not host:
        raise ValueError(f"{what} address {item!r} has no host")
    if not port:
        return host, default_port
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{what} address {item!r} has an invalid port")
    return host, int(port)


def where(url: str) -> str:
    """Any Redis URL without its credentials, for messages."""
    if is_sentinel(url):
        try:
            return parse_sentinel(url).where()
        except ValueError:
            return "(unparsable sentinel URL)"
    if is_cluster(url):
        try:
            return parse_cluster(url).where()
        except ValueError:
            return "(unparsable cluster URL)"
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.hostname or ''}{':' + str(parts.port) if parts.port else ''}{parts.path}"
