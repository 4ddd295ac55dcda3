"""Every Redis key and pub/sub channel name of chatd, in one place.

All names start with the configured prefix (``storage.redis_key_prefix``,
default ``chatd:``) so one Redis can serve several deployments.

In a Redis Cluster (``Keys(cluster=True)``, ``redis+cluster://``) a script or a MULTI may only touch
keys of one hash slot, so the keys touched together carry one hash tag after the prefix:

===============================  ==========================================================
``chatd:{auth}:...``             the denylist and the per-user connection sets (the connect
                                 script checks a token and registers its socket in one call)
``chatd:{presence}:...``         every presence key: per room, per worker, the heartbeats,
                                 the pending offlines, the revisions (the sweep walks them all)
``chatd:{q}:q:...``              the job queue (each transition is one script over all of it)
``chatd:{streams}:...``          the running answers' state, text and per-room sets (MULTI)
``chatd:{quota:<scope>}:...``    a shared quota's slices (one script per sync)
``chatd:{p<n>}``                 sharded pub/sub partition ``n`` (below)
===============================  ==========================================================

The other keys (rate limits, typing, live connections) are used one at a time: no tag, spread over
the slots.  Outside a cluster the tags are empty and every name is what it always was, so a rolling
upgrade of a one-Redis deployment sees no new keys.

Pub/sub in a cluster is sharded (SSUBSCRIBE/SPUBLISH: a message goes to one shard, not to every node),
and not one channel per room or user: every logical channel (``room_channel``, ``user_channel``,
``control``) maps to one of ``partitions`` channels (``partition_of``) and travels there wrapped with
its name (``pack``).  A worker subscribes partitions, a few hundred at most whatever the number of
rooms and users, so re-subscribing after a failover costs tens of commands per node, not one per room.
A worker gets every event of the partitions it listens to and drops those of channels it does not
want (a partition is ~1/``partitions`` of the traffic).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field

_PACK_SEP = b"\n"  # after the logical channel name; names never contain it


@dataclass(frozen=True, slots=True)
class Keys:
    prefix: str = "chatd:"
    cluster: bool = False
    partitions: int = 128
    # Hash-tagged sub-prefixes of the groups of keys used together (the prefix alone outside a cluster).
    _auth: str = field(init=False, repr=False, compare=False)
    _presence: str = field(init=False, repr=False, compare=False)
    _streams: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_auth", self.tagged("auth"))
        object.__setattr__(self, "_presence", self.tagged("presence"))
        object.__setattr__(self, "_streams", self.tagged("streams"))

    def tagged(self, group: str) -> str:
        """The prefix of a group of keys that must share a hash slot: ``chatd:{group}:`` in a cluster."""
        return f"{self.prefix}{{{group}}}:" if self.cluster else self.prefix

    @property
    def presence_prefix(self) -> str:
        """What the presence scripts build their keys from (the sweep finds rooms and workers inside Redis)."""
        return self._presence

    @property
    def queue_prefix(self) -> str:
        """What the job queue's scripts build their ``q:...`` keys from."""
        return self.tagged("q")

    # -- sharded pub/sub partitions (cluster only) ----------------------------------
    def partition_of(self, channel: str) -> int:
        """The partition of a logical channel: the same on every instance (CRC32, not Python's salted hash)."""
        return zlib.crc32(channel.encode()) % self.partitions

    def partition_channel(self, partition: int) -> str:
        """The sharded channel of a partition; its hash tag is the partition, so partitions spread over slots."""
        return f"{self.prefix}{{p{partition}}}"

    def sharded(self, channel: str, data: bytes) -> tuple[str, bytes]:
        """Where a publish on a logical channel goes in a cluster, and what it carries."""
        return self.partition_channel(self.partition_of(channel)), pack(channel, data)

    # -- auth -------------------------------------------------------------
    def denied_jti(self, jti: str) -> str:
        """An access token revoked by logout, kept until its exp."""
        return f"{self._auth}auth:deny:{jti}"

    def rate(self, scope: str, subject: str) -> str:
        """A sliding-window rate limit counter (sorted set)."""
        return f"{self.prefix}rate:{scope}:{subject}"

    def quota(self, scope: str) -> str:
        """Prefix of the per-subject, per-slice counters of a shared quota (``<prefix><subject>:<slice>``)."""
        return f"{self.tagged('quota:' + scope)}quota:{scope}:"

    def user_connections(self, user_id: int) -> str:
        """Sorted set of a user's live socket ids, scored by expiry (cross-instance cap)."""
        return f"{self._auth}conns:{user_id}"

    def live_connections(self) -> str:
        """Hash worker origin -> ``<sockets>:<expiry ms>``: live sockets per worker, for the admin stats."""
        return f"{self.prefix}live-conns"

    # -- channels ---------------------------------------------------------
    def room_channel(self, room_id: int) -> str:
        """Room events: messages, typing, presence, assistant streams."""
        return f"{self.prefix}room:{room_id}"

    def user_channel(self, user_id: int) -> str:
        """Events for one user's sockets on every instance (read sync, forced close)."""
        return f"{self.prefix}user:{user_id}"

    # -- presence ---------------------------------------------------------
    def presence(self, room_id: int) -> str:
        """Hash ``<user_id>:<worker origin>`` -> 1: which workers have a socket of the user in the room."""
        return f"{self._presence}presence:{room_id}"

    def presence_users(self, room_id: int) -> str:
        """Hash user_id -> number of workers with a socket of the user in the room (> 0: online)."""
        return f"{self._presence}presence-n:{room_id}"

    def presence_grace(self, room_id: int) -> str:
        """Hash user_id -> 1: the room's users in their grace (last socket gone, offline not yet announced),
        an index of their ``presence_pending`` entries, checked against them when read."""
        return f"{self._presence}presence-grace:{room_id}"

    def presence_revisions(self) -> str:
        """Hash room_id -> presence revision: bumped by each announcement (online or offline) of the
        room, which carries it; a worker that skipped one reads the room's view again."""
        return f"{self._presence}presence-rev"

    def worker_rooms(self, origin: str) -> str:
        """Set of the rooms where a worker has presence entries (what to clean when it dies)."""
        return f"{self._presence}worker-rooms:{origin}"

    # The presence scripts of chatd/storage/kv.py build presence:, presence-n:, presence-grace: and
    # worker-rooms: names from ``presence_prefix`` for rooms and workers they find inside Redis (sweep, due).

    def workers(self) -> str:
        """Sorted set worker origin -> heartbeat expiry (ms): a worker missing its heartbeats is dead."""
        return f"{self._presence}workers"

    def presence_pending(self) -> str:
        """Sorted set ``<room_id>:<user_id>`` -> due ms: users gone everywhere, offline once the grace ends
        unless they come back (any worker announces it; the worker that saw them leave may be gone)."""
        return f"{self._presence}presence-pending"

    # -- assistant -----------------------------------------------------------
    def stream(self, message_id: int) -> str:
        """Hash of a running answer: room, reply_to, model, requester, owner, index of the last chunk."""
        return f"{self._streams}stream:{message_id}"

    def stream_text(self, message_id: int) -> str:
        """The text of chunks 0..index of a running answer, for sockets joining mid-stream."""
        return f"{self._streams}stream-text:{message_id}"

    def room_streams(self, room_id: int) -> str:
        """Set of the answer message ids streaming in a room."""
        return f"{self._streams}streams:{room_id}"

    def control(self) -> str:
        """Channel every worker listens to: assistant cancels."""
        return f"{self.prefix}control"

    # The job queue's keys (q:depth, q:users, q:active, q:leases, q:user:<id>, q:job:<id>,
    # q:running:<id>) are built inside chatd/storage/jobqueue.py's Lua scripts from ``queue_prefix``.

    def typing(self, room_id: int, user_id: int) -> str:
        return f"{self.prefix}typing:{room_id}:{user_id}"


def pack(channel: str, data: bytes) -> bytes:
    """A logical channel's message on its partition channel: the channel's name, a newline, the message."""
    return channel.encode() + _PACK_SEP + data


def unpack(message: bytes) -> tuple[bytes, bytes]:
    """``pack``'s inverse: ``(logical channel, message)``; ValueError when there is no name."""
    channel, sep, data = message.partition(_PACK_SEP)
    if not sep or not channel:
        raise ValueError("not <channel>\\n<message>")
    return channel, data
