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

    def user_connections(self, user_id: int) -> str:
        """Sorted set of a user's live socket ids, scored by expiry (cross-instance cap)."""
        return f"{self.prefix}conns:{user_id}"

    # -- channels ---------------------------------------------------------
    def room_channel(self, room_id: int) -> str:
        """Room events: messages, typing, presence, assistant streams."""
        return f"{self.prefix}room:{room_id}"

    def user_channel(self, user_id: int) -> str:
        """Events for one user's sockets on every instance (read sync, forced close)."""
        return f"{self.prefix}user:{user_id}"

    # -- presence ---------------------------------------------------------
    def presence(self, room_id: int) -> str:
        """Hash user_id -> count of joined sockets across instances."""
        return f"{self.prefix}presence:{room_id}"

    def presence_leaving(self, room_id: int, user_id: int) -> str:
        """Set while a user's offline is held back for the grace period (any worker may cancel it)."""
        return f"{self.prefix}presence-leaving:{room_id}:{user_id}"

    def typing(self, room_id: int, user_id: int) -> str:
        return f"{self.prefix}typing:{room_id}:{user_id}"
