"""``/api/v1/auth``: register, sign in, rotate the refresh token, sign out."""

from __future__ import annotations

from chatd.api.base import ApiHandler
from chatd.api.bodies import Login, Logout, Refresh, Register
from chatd.api.openapi import op
from chatd.api.responses import Tokens


class RegisterHandler(ApiHandler):
    @op(summary="Create an account", tag="auth", auth=False, body=Register, responses={201: ("Tokens", Tokens)})
    async def post(self) -> None:
        body = self.body(Register)
        self.send_json(
            await self.accounts.register(body.email, body.password, body.name, self.request.remote_ip or ""), 201
        )


class LoginHandler(ApiHandler):
    @op(summary="Sign in", tag="auth", auth=False, body=Login, responses={200: ("Tokens", Tokens)})
    async def post(self) -> None:
        body = self.body(Login)
        self.send_json(await self.accounts.login(body.email, body.password, self.request.remote_ip or ""))


class RefreshHandler(ApiHandler):
    @op(
        summary="Rotate the refresh token",
        tag="auth",
        auth=False,
        body=Refresh,
        responses={200: ("Tokens", Tokens)},
    )
    async def post(self) -> None:
        self.send_json(await self.accounts.refresh(self.body(Refresh).refresh_token))


class LogoutHandler(ApiHandler):
    @op(
        summary="Sign out (this session, or all with all=true)",
        tag="auth",
        body=Logout,
        body_required=False,
        responses={204: ("Signed out", None)},
    )
    async def post(self) -> None:
        principal = await self.auth()
        await self.accounts.logout(principal, self.body(Logout).all)
        self.set_status(204)
        self.finish()
