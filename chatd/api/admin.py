"""``/admin/*`` (role admin only, every call audited): stats, users, unban, role, any room's log,
announcements, broadcasts, the audit log."""

from __future__ import annotations

from typing import Any

from msgspec import UNSET

from chatd.api.base import LIMIT, ApiHandler
from chatd.api.bodies import Announce, Broadcast, LoadTestUsers, RoleChange
from chatd.api.openapi import Param, op
from chatd.api.responses import (
    AdminMessagePage,
    AuditPage,
    BroadcastDone,
    LoadTestUsersMade,
    Message,
    User,
    UserPage,
)
from chatd.core import errors
from chatd.services.accounts import Principal
from chatd.services.admin import Admin

# from/to: a date or an RFC 3339 time (admin.parse_day)
_DAY = {"anyOf": [{"format": "date"}, {"format": "date-time"}, {"const": ""}], "maxLength": 40}  # "": the default


class AdminHandler(ApiHandler):
    """Role admin only; every call by a signed-in user (refused ones too) goes to ``audit_log``."""

    admin: Admin

    def initialize(self, admin: Admin, **deps: Any) -> None:  # type: ignore[override]
        super().initialize(**deps)
        self.admin = admin
        self.audit_target: str | None = None
        self.audit_details: dict[str, Any] | None = None

    async def admin_auth(self) -> Principal:
        principal = await self.auth()
        if not principal.is_admin:
            raise errors.Forbidden("admin only")
        return principal

    def on_finish(self) -> None:
        super().on_finish()
        if self.principal is not None:
            action = f"{self.request.method} {self.request.path}"
            self.state.tasks.spawn(
                self.admin.audit(
                    self.principal.user_id,
                    action,
                    self.audit_target,
                    self.audit_details,
                    self.request.remote_ip or "",
                    self.get_status(),
                ),
                "audit",
            )


class AdminStatsHandler(AdminHandler):
    @op(
        summary="Usage statistics over [from, to) (default: the last 7 days)",
        tag="admin",
        query=(
            Param("from", {"type": "string", **_DAY}, "YYYY-MM-DD or RFC 3339, years 1970..9998"),
            Param("to", {"type": "string", **_DAY}, "YYYY-MM-DD or RFC 3339, years 1970..9998"),
        ),
        responses={
            200: ("Statistics", {"type": "object", "required": ["users", "rooms", "messages_per_day", "assistant"]})
        },
    )
    async def get(self) -> None:
        await self.admin_auth()
        self.audit_details = {"from": self.arg("from"), "to": self.arg("to")}
        self.send_json(await self.admin.stats(self.arg("from"), self.arg("to")))


class AdminUsersHandler(AdminHandler):
    @op(
        summary="Users by email or name substring and status, newest first",
        tag="admin",
        query=(
            Param("q", {"type": "string", "maxLength": 320}),
            Param("status", {"type": "string", "enum": ["active", "banned", "deleted"]}),
            LIMIT,
            Param("cursor", {"type": "integer", "minimum": 1}),
        ),
        responses={200: ("Page of users", UserPage)},
    )
    async def get(self) -> None:
        await self.admin_auth()
        self.send_json(await self.admin.users(self.arg("q"), self.arg("status"), self.arg("cursor"), self.arg("limit")))


class AdminUnbanHandler(AdminHandler):
    @op(summary="Unban a user", tag="admin", responses={200: ("User", User)})
    async def post(self, user_id: str) -> None:
        await self.admin_auth()
        target = self.path_id(user_id, "user")
        self.audit_target = f"user:{target}"
        self.send_json(await self.admin.unban(target))


class AdminRoleHandler(AdminHandler):
    @op(
        summary="Set a user's role",
        tag="admin",
        body=RoleChange,
        responses={200: ("User", User)},
    )
    async def post(self, user_id: str) -> None:
        await self.admin_auth()
        target = self.path_id(user_id, "user")
        self.audit_target = f"user:{target}"
        role = self.body(RoleChange).role
        self.audit_details = {"role": role}
        self.send_json(await self.admin.set_role(target, role))


class AdminRoomMessagesHandler(AdminHandler):
    @op(
        summary="Browse any room's log, deleted messages included (newest first)",
        tag="admin",
        query=(LIMIT, Param("cursor", {"type": "integer", "minimum": 1}, "before this seq")),
        responses={200: ("Page", AdminMessagePage)},
    )
    async def get(self, room_id: str) -> None:
        await self.admin_auth()
        target = self.path_id(room_id, "room")
        self.audit_target = f"room:{target}"
        self.send_json(await self.admin.room_messages(target, self.arg("cursor"), self.arg("limit")))

    @op(
        summary="Announce in a room: a system message (kind system) with a seq",
        tag="admin",
        body=Announce,
        responses={201: ("The message", Message)},
    )
    async def post(self, room_id: str) -> None:
        principal = await self.admin_auth()
        target = self.path_id(room_id, "room")
        self.audit_target = f"room:{target}"
        self.send_json(await self.admin.announce(principal.user_id, target, self.body(Announce).content), 201)


class AdminBroadcastHandler(AdminHandler):
    @op(
        summary="Broadcast: a system message in every active room, or an announcement frame to every user",
        tag="admin",
        body=Broadcast,
        responses={200: ("Done", BroadcastDone)},
    )
    async def post(self) -> None:
        principal = await self.admin_auth()
        body = self.body(Broadcast)
        self.audit_target = f"broadcast:{body.target}"
        self.send_json(await self.admin.broadcast(principal.user_id, body.target, body.content))


class AdminAuditHandler(AdminHandler):
    @op(
        summary="The audit log, newest first",
        tag="admin",
        query=(LIMIT, Param("cursor", {"type": "integer", "minimum": 1})),
        responses={200: ("Page", AuditPage)},
    )
    async def get(self) -> None:
        await self.admin_auth()
        self.send_json(await self.admin.audit_page(self.arg("cursor"), self.arg("limit")))


class LoadTestUsersHandler(AdminHandler):
    """The users of a load test (loadtest/locustfile.py), past the registration limit of
    ``auth.auth_attempts_per_min`` per IP: an admin's call, or anyone's on a dev-mode server (``make run``)."""

    @op(
        summary="Users with access tokens in bulk, for load tests (admin; no token needed in dev mode)",
        tag="admin",
        body=LoadTestUsers,
        responses={201: ("The users, in order, each with an access token", LoadTestUsersMade)},
        description="Without server.dev_mode, admin only (401 without a token, 403 for a user) and audited."
        " In dev mode (`make run`) anyone who can reach the server may call it, so `locust -f"
        " loadtest/locustfile.py` gets its users without CHATD_AUTH_AUTH_ATTEMPTS_PER_MIN or database access."
        " The users are role user, named lt<i>-<tag>, with emails lt<i>-<tag>@example.com; with `password` they"
        " can also sign in. The access tokens are not tied to a session (no refresh token).",
    )
    async def post(self) -> None:
        if not self.config.server.dev_mode:
            await self.admin_auth()
        body = self.body(LoadTestUsers)
        self.audit_details = {"count": body.count}
        made = await self.accounts.load_test_users(
            body.count,
            None if body.password is UNSET else body.password,
            None if body.access_ttl_s is UNSET else body.access_ttl_s,
        )
        self.send_json(made, 201)
