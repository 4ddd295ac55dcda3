"""Accounts: register, login, refresh rotation, logout, and who a token belongs to.

Revocation has two layers: the access token's ``jti`` goes on a Redis
denylist until its ``exp`` (the documented mechanism), and its refresh
*family* is revoked in Postgres, which every authentication checks in the
same query as the user's status.  So a logout holds even while Redis blinks.
"""

from __future__ import annotations

import asyncio
import dataclasses
import secrets
import time
from dataclasses import dataclass
from typing import Any

from chatd.core import errors
from chatd.core.errors import CloseCode
from chatd.process.config import Settings
from chatd.process.logs import app_log, fields
from chatd.realtime.batching import Batched
from chatd.realtime.fanout import Hub
from chatd.services import credentials
from chatd.services.ratelimit import AuthLimiter
from chatd.services.tokens import Claims, TokenPair, TokenService
from chatd.storage import users as users_db
from chatd.storage.db import Database, iso
from chatd.storage.kv import KV


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
        "created_at": iso(row["created_at"]),
    }


class Accounts:
    def __init__(self, db: Database, kv: KV, hub: Hub, settings: Settings) -> None:
        self.db = db
        self.kv = kv
        self.hub = hub
        self.settings = settings
        self.tokens = TokenService(settings.auth)
        limit = settings.auth.auth_attempts_per_min
        self._by_ip = AuthLimiter(kv, "auth-ip", limit, 60.0)
        self._by_email = AuthLimiter(kv, "auth-email", limit, 60.0)
        self._lookups = AuthLimiter(kv, "user-lookup", settings.auth.user_lookups_per_min, 60.0)
        # Each Argon2 run holds 64 MiB and most of a core: a bounded few at once, the rest wait in line (FIFO).
        self._hashing = asyncio.Semaphore(settings.auth.hash_concurrency)
        # Every authentication reads the holder's status; concurrent ones share one query.
        self.status_reads: Batched[tuple[int, str | None], dict[str, Any] | None] = Batched(
            lambda holders: users_db.auth_statuses(db, holders)
        )
        # A socket's second look at a session-less token (its revocation is the denylist only), likewise.
        self.denied_reads: Batched[str, bool] = Batched(kv.denied_many)

    # -- helpers ------------------------------------------------------------

    async def _limit(self, ip: str, email: str) -> None:
        for decision in (await self._by_ip.hit(ip), await self._by_email.hit(email.strip().lower())):
            if not decision.allowed:
                raise errors.RateLimited("too many attempts, try again later", retry_after_ms=decision.retry_after_ms)

    async def _issue(self, user: dict[str, Any], family: str | None = None) -> dict[str, Any]:
        pair: TokenPair = self.tokens.mint_pair(user["id"], user["role"], family)
        assert pair.refresh.family is not None
        await users_db.store_refresh(self.db, pair.refresh.jti, pair.refresh.family, user["id"], pair.refresh.exp)
        return {
            "user": user_json(user),
            "access_token": pair.access_token,
            "refresh_token": pair.refresh_token,
            "token_type": "Bearer",
            "expires_in": pair.expires_in,
        }

    async def _cpu(self, fn: Any, *args: Any) -> Any:
        # Argon2 costs ~64 MiB and tens of ms: never on the event loop, and never more than hash_concurrency at once.
        async with self._hashing:
            return await asyncio.get_running_loop().run_in_executor(None, fn, *args)

    # -- flows ----------------------------------------------------------------

    async def register(self, email: str, password: str, name: str, ip: str) -> dict[str, Any]:
        email = credentials.validate_email(email)
        await self._limit(ip, email)
        password = credentials.validate_password(password)
        name = credentials.validate_name(name)
        password_hash = await self._cpu(credentials.hash_password, password)
        user = await users_db.create_user(self.db, email, name, password_hash, "user")
        app_log.info("user_registered", extra=fields(user_id=user["id"]))
        return await self._issue(user)

    async def load_test_users(self, count: int, password: str | None, access_ttl_s: int | None) -> dict[str, Any]:
        """``count`` new users with access tokens, without the registration limit: the users of a load test
        (``POST /admin/load-test-users``: dev mode or an admin).  One Argon2 hash for all of them (none without
        ``password``: they cannot sign in with one); session-less access tokens of ``access_ttl_s``."""
        password_hash = None
        if password is not None:
            password_hash = await self._cpu(credentials.hash_password, credentials.validate_password(password))
        tag = secrets.token_hex(4)
        names = [f"lt{i}-{tag}" for i in range(count)]
        rows = await users_db.create_users(self.db, [f"{n}@example.com" for n in names], names, password_hash)
        ttl = access_ttl_s or self.settings.auth.access_ttl_s
        tokens = TokenService(dataclasses.replace(self.settings.auth, access_ttl_s=ttl))
        app_log.info("load_test_users_created", extra=fields(count=count, first_user_id=rows[0]["id"]))
        return {
            "users": [{"user": user_json(r), "access_token": tokens.mint(r["id"], "user", "access")[0]} for r in rows],
            "token_type": "Bearer",
            "expires_in": ttl,
        }

    async def login(self, email: str, password: str, ip: str) -> dict[str, Any]:
        await self._limit(ip, email)
        user = await users_db.user_by_email(self.db, email.strip())
        if user is None or not user.get("password_hash"):
            await self._cpu(credentials.dummy_verify, password)  # same time as a wrong password
            raise errors.Unauthorized("invalid email or password")
        if not await self._cpu(credentials.verify_password, user["password_hash"], password):
            raise errors.Unauthorized("invalid email or password")
        if user["status"] != "active":
            raise errors.Unauthorized("invalid email or password")
        if credentials.needs_rehash(user["password_hash"]):
            await users_db.set_password_hash(self.db, user["id"], await self._cpu(credentials.hash_password, password))
        return await self._issue(user)

    async def refresh(self, token: str) -> dict[str, Any]:
        claims = self.tokens.verify(token, "refresh")
        assert claims.family is not None  # verify() guarantees a family on refresh tokens
        use = await users_db.use_refresh(self.db, claims.jti, claims.family)
        if not use.ok:
            if use.reused:
                # A stolen token and its owner both hold it: kill the whole family.
                app_log.warning("refresh_token_reuse", extra=fields(user_id=claims.sub, family=claims.family))
                await self._revoke_family(claims.sub, claims.family)
            raise errors.Unauthorized("refresh token already used or revoked")
        user = await users_db.user_by_id(self.db, claims.sub)
        if user is None or user["status"] != "active":
            raise errors.Unauthorized("account disabled")
        return await self._issue(user, family=claims.family)

    async def logout(self, principal: Principal, everywhere: bool) -> None:
        claims = principal.claims
        await self._deny(claims.jti, claims.exp)
        if everywhere:
            for family in await users_db.user_families(self.db, principal.user_id):
                await users_db.revoke_family(self.db, family)
            await self._close_sockets(principal.user_id, None, 4001, "logged out")
        elif claims.family:
            await self._revoke_family(principal.user_id, claims.family)
        else:
            await self._close_sockets(principal.user_id, None, 4001, "logged out")

    async def ban(self, user_id: int) -> dict[str, Any]:
        user = await users_db.set_user_status(self.db, user_id, "banned")
        if user is None:
            raise errors.NotFound("user not found")
        for family in await users_db.user_families(self.db, user_id):
            await users_db.revoke_family(self.db, family)
        await self._close_sockets(user_id, None, 1008, "account banned")
        return user_json(user)

    # -- account basics and the directory (issue 11) ---------------------------------

    async def rename(self, principal: Principal, name: str) -> dict[str, Any]:
        user = await users_db.update_user_name(self.db, principal.user_id, credentials.validate_name(name))
        if user is None:
            raise errors.Unauthorized("account disabled")
        return user_json(user)

    async def change_password(self, principal: Principal, old: str, new: str) -> None:
        """Old + new password; every other session of the user is revoked (and its sockets closed)."""
        new = credentials.validate_password(new)
        current = await users_db.password_hash_of(self.db, principal.user_id)
        if not current or not await self._cpu(credentials.verify_password, current, old):
            raise errors.Forbidden("old_password is wrong")
        await users_db.set_password_hash(self.db, principal.user_id, await self._cpu(credentials.hash_password, new))
        keep = principal.claims.family
        for family in await users_db.revoke_families_except(self.db, principal.user_id, keep):
            await self._close_sockets(principal.user_id, family, 4001, "password changed")
        if keep is None:  # a token without a session (external IdP): nothing to keep
            await self._close_sockets(principal.user_id, None, 4001, "password changed")
        app_log.info("password_changed", extra=fields(user_id=principal.user_id))

    async def deactivate(self, principal: Principal) -> None:
        """The user deletes their account: no more sign-in, sockets closed; their messages stay."""
        await users_db.set_user_status(self.db, principal.user_id, "deleted")
        await users_db.revoke_families_except(self.db, principal.user_id, None)
        await self._deny(principal.claims.jti, principal.claims.exp)
        await self._close_sockets(principal.user_id, None, 4001, "account deleted")
        app_log.info("account_deleted", extra=fields(user_id=principal.user_id))

    async def lookup(self, principal: Principal, query: str | None) -> list[dict[str, Any]]:
        """Find a user to invite: exact email, or a name prefix (>= 2 characters); id and name only."""
        q = (query or "").strip()
        if len(q) < 2 or len(q) > 320:
            raise errors.BadRequest("q must be an email or a name prefix of 2 to 320 characters")
        decision = await self._lookups.hit(str(principal.user_id))
        if not decision.allowed:
            raise errors.RateLimited("too many look-ups, try again later", retry_after_ms=decision.retry_after_ms)
        rows = await users_db.lookup_users(self.db, q, 10)
        return [{"id": r["id"], "name": r["name"]} for r in rows]

    async def _revoke_family(self, user_id: int, family: str) -> None:
        await users_db.revoke_family(self.db, family)
        await self._close_sockets(user_id, family, 4001, "session revoked")

    async def _close_sockets(self, user_id: int, family: str | None, code: int, reason: str) -> None:
        try:
            await self.hub.close_user(user_id, code, reason, family)
        except errors.Unavailable:
            # This worker's sockets are closed; other instances' sockets of a revoked session fail their
            # next authentication check (the family is revoked in Postgres).
            app_log.warning("close_broadcast_failed", extra=fields(user_id=user_id))

    async def _deny(self, jti: str, exp: int) -> None:
        ttl_s = max(1, exp - int(time.time()) + self.settings.auth.leeway_s)
        try:
            await self.kv.deny(jti, ttl_s)
        except errors.Unavailable:
            pass  # the family revocation in Postgres still stops the token

    # -- authentication -------------------------------------------------------

    async def authenticate(self, token: str | None, *, denylist: bool = True, exp_leeway: bool = True) -> Principal:
        """Who holds this access token, or Unauthorized: bad token, revoked, banned, deleted.

        ``denylist=False``: the caller checks the Redis denylist itself (the socket
        handshake does, in the same round trip as its connection registration).
        ``exp_leeway=False``: no clock-skew leeway on ``exp`` (sockets: closed at exp, not reopened).
        """
        if not token:
            raise errors.Unauthorized("missing access token")
        claims = self.tokens.verify(token, "access", exp_leeway=exp_leeway)
        if denylist:
            try:
                denied = await self.kv.is_denied(claims.jti)
            except errors.Unavailable:
                denied = False  # the family check below still stops a logged-out session
            if denied:
                raise errors.Unauthorized("token revoked")
        row = await self.status_reads((claims.sub, claims.family))
        refused = _refusal(row)
        if refused is not None:
            raise errors.Unauthorized(refused[1])
        assert row is not None
        return Principal(user_id=claims.sub, role=row["role"], claims=claims)

    async def ended_since(self, principal: Principal) -> tuple[int, str] | None:
        """Was the session of ``principal`` (authenticated a moment ago) ended since?  None if not, else the
        close code and reason of the forced close that went with it.

        The socket handshake asks once its worker listens on the user channel: a logout, password
        change, deactivation or ban written before is seen here, one after reaches the socket as a
        forced close.  Batched like ``authenticate`` (connect storms share the queries).
        """
        refused = await self.session_ended(principal.user_id, principal.claims.family)
        if refused is not None:
            return refused
        if principal.claims.family is None:
            try:
                denied = await self.denied_reads(principal.claims.jti)
            except errors.Unavailable:
                denied = False  # as in authenticate: the denylist fails open
            if denied:
                return int(CloseCode.AUTH_EXPIRED), "logged out"
        return None

    async def session_ended(self, user_id: int, family: str | None) -> tuple[int, str] | None:
        """The forced close a socket of this session gets, if the session may no longer be used (the
        status and revocation in Postgres; not the Redis denylist)."""
        refused = _refusal(await self.status_reads((user_id, family)))
        return None if refused is None else refused[0]


def _refusal(row: dict[str, Any] | None) -> tuple[tuple[int, str], str] | None:
    """Why a session with this status row (``storage.users.auth_statuses``) may not be used: the forced close a
    socket gets (the code and reason the revocation itself closes with) and the REST 401 message."""
    if row is None or row["status"] == "deleted":
        return (int(CloseCode.AUTH_EXPIRED), "account deleted"), "unknown user" if row is None else "account disabled"
    if row["status"] == "banned":
        return (int(CloseCode.POLICY_VIOLATION), "account banned"), "account disabled"
    if row["status"] != "active":
        return (int(CloseCode.AUTH_EXPIRED), "account disabled"), "account disabled"
    if row["revoked"]:
        return (int(CloseCode.AUTH_EXPIRED), "session revoked"), "token revoked"
    return None


def create_user_sync(settings: Settings, email: str, password: str, name: str, admin: bool) -> dict[str, Any]:
    """``chatd create-user``: create, or reset the password and role of an existing email."""
    email = credentials.validate_email(email)
    password_hash = credentials.hash_password(credentials.validate_password(password))
    role = "admin" if admin else "user"
    row = users_db.upsert_user_sync(
        settings.storage.database_url, email, name or email.split("@")[0], password_hash, role
    )
    return user_json(row)
