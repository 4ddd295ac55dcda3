"""Accounts: register, login, refresh rotation, logout, and who a token belongs to.

Revocation has two layers: the access token's ``jti`` goes on a Redis
denylist until its ``exp`` (the documented mechanism), and its refresh
*family* is revoked in Postgres, which every authentication checks in the
same query as the user's status.  So a logout holds even while Redis blinks.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any

from redis.exceptions import RedisError

from chatd import auth, errors, store
from chatd.auth import Claims, TokenPair, TokenService
from chatd.config import Settings
from chatd.fanout import Hub
from chatd.logs import app_log, fields
from chatd.ratelimit import RedisLimiter
from chatd.state import ServerState


@dataclass(frozen=True, slots=True)
class Principal:
    """An authenticated caller."""

    user_id: int
    role: str
    claims: Claims

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"


def user_json(row: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": row["id"],
        "email": row["email"],
        "name": row["name"],
        "role": row["role"],
        "status": row["status"],
        "created_at": store.iso(row["created_at"]),
    }


class Accounts:
    def __init__(self, state: ServerState, hub: Hub) -> None:
        self.state = state
        self.hub = hub
        self.settings: Settings = state.settings
        self.tokens = TokenService(state.settings.auth)
        limit = state.settings.auth.auth_attempts_per_min
        self._by_ip = RedisLimiter(state.redis, lambda s: state.keys.rate("auth-ip", s), limit, 60.0)
        self._by_email = RedisLimiter(state.redis, lambda s: state.keys.rate("auth-email", s), limit, 60.0)

    # -- helpers ------------------------------------------------------------

    async def _limit(self, ip: str, email: str) -> None:
        for decision in (await self._by_ip.hit(ip), await self._by_email.hit(email.strip().lower())):
            if not decision.allowed:
                raise errors.RateLimited("too many attempts, try again later", retry_after_ms=decision.retry_after_ms)

    async def _issue(self, user: dict[str, Any], family: str | None = None) -> dict[str, Any]:
        pair: TokenPair = self.tokens.mint_pair(user["id"], user["role"], family)
        assert pair.refresh.family is not None
        await store.store_refresh(self.state.pg, pair.refresh.jti, pair.refresh.family, user["id"], pair.refresh.exp)
        return {
            "user": user_json(user),
            "access_token": pair.access_token,
            "refresh_token": pair.refresh_token,
            "token_type": "Bearer",
            "expires_in": pair.expires_in,
        }

    @staticmethod
    async def _cpu(fn: Any, *args: Any) -> Any:
        # Argon2 costs ~64 MiB and tens of ms: never on the event loop.
        return await asyncio.get_running_loop().run_in_executor(None, fn, *args)

    # -- flows ----------------------------------------------------------------

    async def register(self, body: dict[str, Any], ip: str) -> dict[str, Any]:
        email = auth.validate_email(body.get("email"))
        await self._limit(ip, email)
        password = auth.validate_password(body.get("password"))
        name = auth.validate_name(body.get("name"))
        password_hash = await self._cpu(auth.hash_password, password)
        user = await store.create_user(self.state.pg, email, name, password_hash, "user")
        app_log.info("user_registered", extra=fields(user_id=user["id"]))
        return await self._issue(user)

    async def login(self, body: dict[str, Any], ip: str) -> dict[str, Any]:
        email, password = body.get("email"), body.get("password")
        if not isinstance(email, str) or not isinstance(password, str) or not email or not password:
            raise errors.BadRequest("email and password are required")
        await self._limit(ip, email)
        user = await store.user_by_email(self.state.pg, email.strip())
        if user is None or not user.get("password_hash"):
            await self._cpu(auth.dummy_verify, password)  # same time as a wrong password
            raise errors.Unauthorized("invalid email or password")
        if not await self._cpu(auth.verify_password, user["password_hash"], password):
            raise errors.Unauthorized("invalid email or password")
        if user["status"] != "active":
            raise errors.Unauthorized("invalid email or password")
        if auth.needs_rehash(user["password_hash"]):
            await store.set_password_hash(self.state.pg, user["id"], await self._cpu(auth.hash_password, password))
        return await self._issue(user)

    async def refresh(self, body: dict[str, Any]) -> dict[str, Any]:
        token = body.get("refresh_token")
        if not isinstance(token, str) or not token:
            raise errors.BadRequest("refresh_token is required")
        claims = self.tokens.verify(token, "refresh")
        assert claims.family is not None  # verify() guarantees a family on refresh tokens
        use = await store.use_refresh(self.state.pg, claims.jti, claims.family)
        if not use.ok:
            if use.reused:
                # A stolen token and its owner both hold it: kill the whole family.
                app_log.warning("refresh_token_reuse", extra=fields(user_id=claims.sub, family=claims.family))
                await self._revoke_family(claims.sub, claims.family)
            raise errors.Unauthorized("refresh token already used or revoked")
        user = await store.user_by_id(self.state.pg, claims.sub)
        if user is None or user["status"] != "active":
            raise errors.Unauthorized("account disabled")
        return await self._issue(user, family=claims.family)

    async def logout(self, principal: Principal, everywhere: bool) -> None:
        claims = principal.claims
        await self._deny(claims.jti, claims.exp)
        if everywhere:
            for family in await store.user_families(self.state.pg, principal.user_id):
                await store.revoke_family(self.state.pg, family)
            await self._close_sockets(principal.user_id, None, 4001, "logged out")
        elif claims.family:
            await self._revoke_family(principal.user_id, claims.family)
        else:
            await self._close_sockets(principal.user_id, None, 4001, "logged out")

    async def ban(self, user_id: int) -> dict[str, Any]:
        user = await store.set_user_status(self.state.pg, user_id, "banned")
        if user is None:
            raise errors.NotFound("user not found")
        for family in await store.user_families(self.state.pg, user_id):
            await store.revoke_family(self.state.pg, family)
        await self._close_sockets(user_id, None, 1008, "account banned")
        return user_json(user)

    async def _revoke_family(self, user_id: int, family: str) -> None:
        await store.revoke_family(self.state.pg, family)
        await self._close_sockets(user_id, family, 4001, "session revoked")

    async def _close_sockets(self, user_id: int, family: str | None, code: int, reason: str) -> None:
        try:
            await self.hub.close_user(user_id, code, reason, family)
        except RedisError as exc:
            app_log.warning("close_broadcast_failed", extra=fields(user_id=user_id, error=str(exc)[:200]))

    async def _deny(self, jti: str, exp: int) -> None:
        ttl_s = max(1, exp - int(time.time()) + self.settings.auth.leeway_s)
        try:
            await self.state.redis.set(self.state.keys.denied_jti(jti), b"1", ex=ttl_s)
        except RedisError as exc:
            # The family revocation in Postgres still stops the token.
            app_log.warning("denylist_unavailable", extra=fields(error=str(exc)[:200]))

    # -- authentication -------------------------------------------------------

    async def authenticate(self, token: str | None) -> Principal:
        """Who holds this access token, or Unauthorized: bad token, revoked, banned, deleted."""
        if not token:
            raise errors.Unauthorized("missing access token")
        claims = self.tokens.verify(token, "access")
        denied = False
        try:
            denied = bool(await self.state.redis.exists(self.state.keys.denied_jti(claims.jti)))
        except RedisError as exc:
            app_log.warning("denylist_unavailable", extra=fields(error=str(exc)[:200]))
        if denied:
            raise errors.Unauthorized("token revoked")
        row = await store.fetch_one(
            self.state.pg,
            "SELECT u.status, u.role,"
            " EXISTS (SELECT 1 FROM refresh_tokens t WHERE t.family = %s AND t.revoked_at IS NOT NULL) AS revoked"
            " FROM users u WHERE u.id = %s",
            (claims.family, claims.sub),
        )
        if row is None:
            raise errors.Unauthorized("unknown user")
        if row["status"] != "active":
            raise errors.Unauthorized("account disabled")
        if row["revoked"]:
            raise errors.Unauthorized("token revoked")
        return Principal(user_id=claims.sub, role=row["role"], claims=claims)


def create_user_sync(settings: Settings, email: str, password: str, name: str, admin: bool) -> dict[str, Any]:
    """``chatd create-user``: create, or reset the password and role of an existing email."""
    import psycopg
    from psycopg.rows import dict_row

    email = auth.validate_email(email)
    password_hash = auth.hash_password(auth.validate_password(password))
    role = "admin" if admin else "user"
    with psycopg.connect(settings.storage.database_url, row_factory=dict_row) as conn:
        row = conn.execute(
            "INSERT INTO users (email, name, password_hash, role) VALUES (%s, %s, %s, %s)"
            " ON CONFLICT (lower(email)) DO UPDATE SET password_hash = EXCLUDED.password_hash, role = EXCLUDED.role,"
            " status = 'active', updated_at = now()"
            f" RETURNING {store.USER_COLUMNS}",
            (email, name or email.split("@")[0], password_hash, role),
        ).fetchone()
    assert row is not None
    return user_json(row)
