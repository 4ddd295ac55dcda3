"""Every Redis key and pub/sub channel name of chatd, in one place.

All names start with the configured prefix (``storage.redis_key_prefix``,
default ``chatd:``) so one Redis can serve several deployments.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Keys:
    prefix: str = "chatd:"

    # -- auth -------------------------------------------------------------
    def denied_jti(self, jti: str) -> str:
        """An access token revoked by logout, kept until its exp."""
        return f"{self.prefix}auth:deny:{jti}"

    def rate(self, scope: str, subject: str) -> str:
        """A sliding-window rate limit counter (sorted set)."""
        return f"{self.prefix}rate:{scope}:{subject}"

    def quota(self, scope: str) -> str:
        """Prefix of the per-subject, per-slice counters of a shared quota (``<prefix><subject>:<slice>``)."""
        return f"{self.prefix}quota:{scope}:"

    def user_connections(self, user_id: int) -> str:
        """Sorted set of a user's live socket ids, scored by expiry (cross-instance cap)."""
        return f"{self.prefix}conns:{user_id}"

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
        return f"{self.prefix}presence:{room_id}"

    def presence_users(self, room_id: int) -> str:
        """Hash user_id -> number of workers with a socket of the user in the room (> 0: online)."""
        return f"{self.prefix}presence-n:{room_id}"

    def presence_grace(self, room_id: int) -> str:
        """Hash user_id -> 1: the room's users in their grace (last socket gone, offline not yet announced),
        an index of their ``presence_pending`` entries, checked against them when read."""
        return f"{self.prefix}presence-grace:{room_id}"

    def presence_revisions(self) -> str:
        """Hash room_id -> presence revision: bumped by each announcement (online or offline) of the
        room, which carries it; a worker that skipped one reads the room's view again."""
        return f"{self.prefix}presence-rev"

    def worker_rooms(self, origin: str) -> str:
        """Set of the rooms where a worker has presence entries (what to clean when it dies)."""
        return f"{self.prefix}worker-rooms:{origin}"

    # The presence scripts of chatd/storage/kv.py build presence:, presence-n:, presence-grace: and
    # worker-rooms: names from the prefix for rooms and workers they find inside Redis (sweep, due).

    def workers(self) -> str:
        """Sorted set worker origin -> heartbeat expiry (ms): a worker missing its heartbeats is dead."""
        return f"{self.prefix}workers"

    def presence_pending(self) -> str:
        """Sorted set ``<room_id>:<user_id>`` -> due ms: users gone everywhere, offline once the grace ends
        unless they come back (any worker announces it; the worker that saw them leave may be gone)."""
        return f"{self.prefix}presence-pending"

    # -- assistant -----------------------------------------------------------
    def stream(self, message_id: int) -> str:
        """Hash of a running answer: room, reply_to, model, requester, owner, index of the last chunk."""
        return f"{self.prefix}stream:{message_id}"

    def stream_text(self, message_id: int) -> str:
        """The text of chunks 0..index of a running answer, for sockets joining mid-stream."""
        return f"{self.prefix}stream-text:{message_id}"

    def room_streams(self, room_id: int) -> str:
        """Set of the answer message ids streaming in a room."""
        return f"{self.prefix}streams:{room_id}"

    def control(self) -> str:
        """Channel every worker listens to: assistant cancels."""
        return f"{self.prefix}control"

    # The job queue's keys (q:depth, q:users, q:active, q:leases, q:user:<id>, q:job:<id>,
    # q:running:<id>) are built inside chatd/storage/jobqueue.py's Lua scripts from this prefix.

    def typing(self, room_id: int, user_id: int) -> str:
        return f"{self.prefix}typing:{room_id}:{user_id}"
