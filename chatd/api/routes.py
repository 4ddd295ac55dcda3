"""The ``/api/v1`` route table (one list, in registration order) and the handler of its OpenAPI document."""

from __future__ import annotations

from typing import Any

from chatd.api.admin import (
    AdminAuditHandler,
    AdminBroadcastHandler,
    AdminRoleHandler,
    AdminRoomMessagesHandler,
    AdminStatsHandler,
    AdminUnbanHandler,
    AdminUsersHandler,
    LoadTestUsersHandler,
)
from chatd.api.assistants import (
    AdminAssistantHandler,
    AdminAssistantsHandler,
    AdminAssistantUsageHandler,
    AssistantsHandler,
    RoomAssistantHandler,
    RoomAssistantsHandler,
)
from chatd.api.auth import LoginHandler, LogoutHandler, RefreshHandler, RegisterHandler
from chatd.api.base import ApiHandler
from chatd.api.files import FileHandler, FileUploadHandler
from chatd.api.messages import MessagesHandler, ReactionHandler, StreamingSendHandler
from chatd.api.moderation import (
    ContentRuleHandler,
    ContentRulesHandler,
    RedactHandler,
    ReportActionHandler,
    ReportHandler,
    ReportQueueHandler,
)
from chatd.api.openapi import op
from chatd.api.rooms import MemberHandler, MembersHandler, ReceiptsHandler, RoomHandler, RoomsHandler
from chatd.api.search import SearchHandler
from chatd.api.users import BanHandler, MeHandler, PasswordHandler, UsageHandler, UsersHandler
from chatd.process.config import Settings
from chatd.process.state import ServerState
from chatd.services.accounts import Accounts
from chatd.services.admin import Admin
from chatd.services.files import Files
from chatd.services.moderation import Moderation
from chatd.services.rooms import Rooms
from chatd.services.search import Search
from chatd.storage.db import Database


class OpenApiHandler(ApiHandler):
    def initialize(self, spec: dict[str, Any], **deps: Any) -> None:  # type: ignore[override]
        super().initialize(**deps)
        self.spec = spec

    @op(summary="This document (OpenAPI 3.1)", tag="meta", auth=False, responses={200: ("OpenAPI", {"type": "object"})})
    async def get(self) -> None:
        self.send_json(self.spec)


def routes(
    state: ServerState,
    settings: Settings,
    db: Database,
    accounts: Accounts,
    rooms: Rooms,
    files: Files,
    search: Search,
    admin: Admin,
    spec: dict[str, Any],
    moderation: Moderation | None = None,  # None: only the document is wanted (its handlers are not run)
) -> list[tuple[str, type[ApiHandler], dict[str, Any]]]:
    """Every REST route; ``spec`` is filled with the OpenAPI document of the application's routes."""
    deps = {"state": state, "settings": settings, "db": db, "accounts": accounts, "rooms": rooms}
    prefix = "/api/v1"
    return [
        (prefix + r"/auth/register", RegisterHandler, deps),
        (prefix + r"/auth/login", LoginHandler, deps),
        (prefix + r"/auth/refresh", RefreshHandler, deps),
        (prefix + r"/auth/logout", LogoutHandler, deps),
        (prefix + r"/me", MeHandler, deps),
        (prefix + r"/me/password", PasswordHandler, deps),
        (prefix + r"/me/usage", UsageHandler, {**deps, "admin": admin}),
        (prefix + r"/users", UsersHandler, deps),
        (prefix + r"/admin/users/([^/]+)/ban", BanHandler, deps),
        (prefix + r"/admin/stats", AdminStatsHandler, {**deps, "admin": admin}),
        (prefix + r"/admin/users", AdminUsersHandler, {**deps, "admin": admin}),
        (prefix + r"/admin/users/([^/]+)/unban", AdminUnbanHandler, {**deps, "admin": admin}),
        (prefix + r"/admin/users/([^/]+)/role", AdminRoleHandler, {**deps, "admin": admin}),
        (prefix + r"/admin/rooms/([^/]+)/messages", AdminRoomMessagesHandler, {**deps, "admin": admin}),
        (prefix + r"/admin/broadcast", AdminBroadcastHandler, {**deps, "admin": admin}),
        (prefix + r"/admin/audit", AdminAuditHandler, {**deps, "admin": admin}),
        (prefix + r"/admin/load-test-users", LoadTestUsersHandler, {**deps, "admin": admin}),
        (prefix + r"/admin/users/([^/]+)/redact", RedactHandler, {**deps, "admin": admin, "moderation": moderation}),
        (prefix + r"/admin/content-rules", ContentRulesHandler, {**deps, "admin": admin, "moderation": moderation}),
        (
            prefix + r"/admin/content-rules/([^/]+)",
            ContentRuleHandler,
            {**deps, "admin": admin, "moderation": moderation},
        ),
        (prefix + r"/moderation/reports", ReportQueueHandler, {**deps, "moderation": moderation}),
        (prefix + r"/moderation/reports/([^/]+)", ReportActionHandler, {**deps, "moderation": moderation}),
        (prefix + r"/admin/assistants", AdminAssistantsHandler, {**deps, "admin": admin}),
        (prefix + r"/admin/assistants/usage", AdminAssistantUsageHandler, {**deps, "admin": admin}),
        (prefix + r"/admin/assistants/([^/]+)", AdminAssistantHandler, {**deps, "admin": admin}),
        (prefix + r"/assistants", AssistantsHandler, deps),
        (prefix + r"/rooms", RoomsHandler, deps),
        (prefix + r"/rooms/([^/]+)", RoomHandler, deps),
        (prefix + r"/rooms/([^/]+)/members", MembersHandler, deps),
        (prefix + r"/rooms/([^/]+)/members/([^/]+)", MemberHandler, deps),
        (prefix + r"/rooms/([^/]+)/receipts", ReceiptsHandler, deps),
        (prefix + r"/rooms/([^/]+)/assistants", RoomAssistantsHandler, deps),
        (prefix + r"/rooms/([^/]+)/assistants/([^/]+)", RoomAssistantHandler, deps),
        (prefix + r"/rooms/([^/]+)/messages", MessagesHandler, deps),
        (prefix + r"/rooms/([^/]+)/messages/stream", StreamingSendHandler, deps),
        (prefix + r"/rooms/([^/]+)/messages/([^/]+)/reactions/([^/]+)", ReactionHandler, deps),
        (prefix + r"/rooms/([^/]+)/messages/([^/]+)/reports", ReportHandler, {**deps, "moderation": moderation}),
        (prefix + r"/rooms/([^/]+)/files", FileUploadHandler, {**deps, "files": files}),
        (prefix + r"/files/([^/]+)", FileHandler, {**deps, "files": files}),
        (prefix + r"/search", SearchHandler, {**deps, "search": search}),
        (prefix + r"/openapi.json", OpenApiHandler, {**deps, "spec": spec}),
    ]
