"""REST side of the clients: sign-in, serialized token refresh, and JSON calls under /api/v1 (docs/API.md)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx2

REFRESH_AHEAD_S = 60  # refresh when the access token has less left (PROTOCOL.md §10 step 1) ...


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status, self.code, self.message = status, code, message


class Api:
    """One signed-in session.  Refresh tokens are single-use, so refreshes are serialized."""

    def __init__(self, base_url: str) -> None:
        self.base_url = base_url.rstrip("/")
        # trust_env=False: a proxy from the environment must not see a loopback server's tokens.
        self._http = httpx2.AsyncClient(base_url=self.base_url + "/api/v1", timeout=20, trust_env=False)
        self._refresh_lock = asyncio.Lock()
        self.access_token = ""
        self.refresh_token = ""
        self.expires_at = 0.0  # time.monotonic() of the access token's expiry
        self.ahead_s = float(REFRESH_AHEAD_S)
        self.user: dict[str, Any] = {}

    async def aclose(self) -> None:
        await self._http.aclose()

    def _take(self, body: dict[str, Any]) -> None:
        self.access_token = body["access_token"]
        self.refresh_token = body["refresh_token"]
        lifetime = float(body.get("expires_in", 900))
        self.expires_at = time.monotonic() + lifetime
        self.ahead_s = min(REFRESH_AHEAD_S, lifetime / 3)  # ... or a third of a short lifetime
        self.user = body.get("user", self.user)

    async def sign_in(self, email: str, password: str, register_name: str | None = None) -> dict[str, Any]:
        if register_name is not None:
            body = {"email": email, "password": password, "name": register_name}
            self._take(await self._raw("POST", "/auth/register", body))
        else:
            self._take(await self._raw("POST", "/auth/login", {"email": email, "password": password}))
        return self.user

    async def refresh(self) -> str:
        """A fresh access token; raises ApiError(401) when the session is over (sign in again)."""
        seen = self.refresh_token
        async with self._refresh_lock:
            if self.refresh_token != seen:  # refreshed by another task while we waited
                return self.access_token
            self._take(await self._raw("POST", "/auth/refresh", {"refresh_token": self.refresh_token}))
            return self.access_token

    async def token(self) -> str:
        if self.expires_at - time.monotonic() < self.ahead_s:
            return await self.refresh()
        return self.access_token

    async def call(self, method: str, path: str, body: Any = None, params: dict[str, Any] | None = None) -> Any:
        """An authenticated call; one refresh and retry on 401 (the token may have just expired)."""
        token = await self.token()
        try:
            return await self._raw(method, path, body, params, token)
        except ApiError as exc:
            if exc.status != 401:
                raise
        return await self._raw(method, path, body, params, await self.refresh())

    async def _raw(
        self, method: str, path: str, body: Any = None, params: dict[str, Any] | None = None, token: str = ""
    ) -> Any:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        resp = await self._http.request(method, path, json=body, params=params, headers=headers)
        if resp.status_code >= 400:
            try:
                err = resp.json()["error"]
                code, message = str(err["code"]), str(err["message"])
            except (ValueError, KeyError, TypeError):
                code, message = "http", resp.text[:200]
            raise ApiError(resp.status_code, code, message)
        return resp.json() if resp.content else None
