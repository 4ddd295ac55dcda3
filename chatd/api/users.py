"""Accounts: the caller (``/me``: profile, password, token usage), the user look-up (``/users``), bans."""

from __future__ import annotations

from typing import Any

from chatd.api.base import QUERY_TWO_CHARS, ApiHandler
from chatd.api.bodies import PasswordChange, Rename
from chatd.api.openapi import Param, op
from chatd.api.responses import Usage, User, UserMatches
from chatd.core import errors
from chatd.services.accounts import user_json
from chatd.services.admin import Admin
from chatd.storage import users as users_db


class MeHandler(ApiHandler):
    @op(summary="The caller", tag="account", responses={200: ("User", User)})
    async def get(self) -> None:
        principal = await self.auth()
        user = await users_db.user_by_id(self.db, principal.user_id)
        if user is None:
            raise errors.Unauthorized("unknown user")
        self.send_json(user_json(user))

    @op(summary="Change your name", tag="account", body=Rename, responses={200: ("User", User)})
    async def patch(self) -> None:
        principal = await self.auth()
        self.send_json(await self.accounts.rename(principal, self.body(Rename).name))

    @op(
        summary="Delete your account (deactivate: sign-in refused, sockets closed, messages stay)",
        tag="account",
        responses={204: ("Deleted", None)},
    )
    async def delete(self) -> None:
        principal = await self.auth()
        await self.accounts.deactivate(principal)
        self.set_status(204)
        self.finish()


class PasswordHandler(ApiHandler):
    @op(
        summary="Change your password; every other session is revoked",
        tag="account",
        body=PasswordChange,
        responses={204: ("Changed", None)},
    )
    async def post(self) -> None:
        principal = await self.auth()
        body = self.body(PasswordChange)
        await self.accounts.change_password(principal, body.old_password, body.new_password)
        self.set_status(204)
        self.finish()


class UsersHandler(ApiHandler):
    @op(
        summary="Find a user to invite: exact email or name prefix (id and name only; rate limited)",
        tag="account",
        query=(
            Param(
                "q",
                {"type": "string", "minLength": 2, "maxLength": 320, "pattern": QUERY_TWO_CHARS},
                "email or name prefix (2 or more characters once trimmed)",
                True,
            ),
        ),
        responses={200: ("Matches (at most 10)", UserMatches)},
    )
    async def get(self) -> None:
        principal = await self.auth()
        self.send_json({"users": await self.accounts.lookup(principal, self.arg("q"))})


class BanHandler(ApiHandler):
    @op(summary="Ban a user (sessions revoked, sockets closed)", tag="admin", responses={200: ("User", User)})
    async def post(self, user_id: str) -> None:
        principal = await self.auth()
        if not principal.is_admin:
            raise errors.Forbidden("admin only")
        self.send_json(await self.accounts.ban(self.path_id(user_id, "user")))


class UsageHandler(ApiHandler):
    admin: Admin

    def initialize(self, admin: Admin, **deps: Any) -> None:  # type: ignore[override]
        super().initialize(**deps)
        self.admin = admin

    @op(
        summary="Your token usage (30 days) and what is left of today's budget",
        tag="account",
        responses={200: ("Usage", Usage)},
    )
    async def get(self) -> None:
        principal = await self.auth()
        self.send_json(await self.admin.usage(principal.user_id))
