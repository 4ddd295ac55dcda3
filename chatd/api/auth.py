"""``/api/v1/auth``: register, sign in, rotate the refresh token, sign out."""

from __future__ import annotations

from chatd.api.base import EMAIL, NAME, NON_EMPTY, PASSWORD, ApiHandler
from chatd.api.openapi import BOOL, obj, op, ref
from chatd.core import errors

_REGISTER = obj({"email": EMAIL, "password": PASSWORD, "name": NAME}, extra=True)
_LOGIN = obj({"email": NON_EMPTY, "password": NON_EMPTY}, extra=True)
_REFRESH = obj({"refresh_token": NON_EMPTY}, extra=True)


class RegisterHandler(ApiHandler):
    @op(summary="Create an account", tag="auth", auth=False, body=_REGISTER, responses={201: ("Tokens", ref("Tokens"))})
    async def post(self) -> None:
        self.send_json(await self.accounts.register(self.json_body(), self.request.remote_ip or ""), 201)


class LoginHandler(ApiHandler):
    @op(summary="Sign in", tag="auth", auth=False, body=_LOGIN, responses={200: ("Tokens", ref("Tokens"))})
    async def post(self) -> None:
        self.send_json(await self.accounts.login(self.json_body(), self.request.remote_ip or ""))


class RefreshHandler(ApiHandler):
    @op(
        summary="Rotate the refresh token",
        tag="auth",
        auth=False,
        body=_REFRESH,
        responses={200: ("Tokens", ref("Tokens"))},
    )
    async def post(self) -> None:
        self.send_json(await self.accounts.refresh(self.json_body()))


class LogoutHandler(ApiHandler):
    @op(
        summary="Sign out (this session, or all with all=true)",
        tag="auth",
        body=obj({"all": BOOL}, required=[], extra=True),
        body_required=False,
        responses={204: ("Signed out", None)},
    )
    async def post(self) -> None:
        principal = await self.auth()
        body = self.json_body() if self.request.body else {}
        everywhere = body.get("all", False)
        if not isinstance(everywhere, bool):
            raise errors.BadRequest("all must be a boolean")
        await self.accounts.logout(principal, everywhere)
        self.set_status(204)
        self.finish()
