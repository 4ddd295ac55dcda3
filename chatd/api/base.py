"""What every ``/api/v1`` handler shares (docs/API.md): ``ApiHandler`` (auth, declared query parameters and
body, path ids), ``RoomAccess``, the message JSON and the query parameters' schema fragments of more than one
resource.  The handlers are thin: parse, call the service, render.
"""

from __future__ import annotations

from typing import Any

from chatd.api.bodies import WS, B, decode
from chatd.api.openapi import MAX_QUERY_CHARS, MAX_SAFE_INT, Op, Param, op_of
from chatd.api.web import BaseHandler
from chatd.core import errors, server_frames
from chatd.process.config import Settings
from chatd.process.state import ServerState
from chatd.services.accounts import Accounts, Principal
from chatd.services.rooms import Rooms
from chatd.storage.db import Database

MAX_PAGE = 200
_MAX_INT = MAX_SAFE_INT


class ApiHandler(BaseHandler):
    accounts: Accounts
    rooms: Rooms

    def initialize(  # type: ignore[override]
        self, state: ServerState, settings: Settings, db: Database, accounts: Accounts, rooms: Rooms
    ) -> None:
        super().initialize(state, settings)
        self.db = db
        self.accounts = accounts
        self.rooms = rooms
        self.principal: Principal | None = None

    async def auth(self) -> Principal:
        header = self.request.headers.get("Authorization", "")
        token = header[7:].strip() if header.lower().startswith("bearer ") else None
        self.principal = await self.accounts.authenticate(token)
        return self.principal

    def _decl(self) -> Op:
        method = getattr(type(self), (self.request.method or "get").lower())
        decl = op_of(method)
        if decl is None:
            raise errors.Internal(f"{type(self).__name__} has no declaration")
        return decl

    def body(self, model: type[B]) -> B:
        """The JSON body, decoded and checked by its model (``@op(body=model)``, ``api.bodies``): the handler
        and the OpenAPI document read the same model.  An optional body (``body_required=False``) may be
        absent: the model's defaults."""
        decl = self._decl()
        if decl.body is not model:
            raise errors.Internal(f"{type(self).__name__} declares {decl.body!r}, not {model.__name__}")
        raw = self.request.body
        if not raw and not decl.body_required:
            raw = b"{}"
        return decode(model, raw)

    def arg(self, name: str) -> Any:
        """A query parameter, parsed and checked by its declaration (``@op(query=...)``): the handler and
        the OpenAPI document read the same ``Param``."""
        decl = self._decl()
        param = decl.param(name)
        schema = param.schema
        raw = self.get_query_argument(name, None)
        if raw is None or raw == "":
            if param.required:
                raise errors.BadRequest(f"{name} is required")
            return schema.get("default")
        if schema.get("type") == "integer":
            low, high = schema.get("minimum", 0), schema.get("maximum", _MAX_INT)
            if not (raw.isascii() and raw.isdigit()) or not low <= int(raw) <= high:
                raise errors.BadRequest(f"{name} must be an integer between {low} and {high}")
            return int(raw)
        if "enum" in schema and raw not in schema["enum"]:
            raise errors.BadRequest(f"{name} must be one of {', '.join(schema['enum'])}")
        if len(raw) > schema.get("maxLength", MAX_QUERY_CHARS):
            raise errors.BadRequest(f"{name} is too long")
        return raw

    @staticmethod
    def path_id(raw: str, what: str) -> int:
        if not (raw.isascii() and raw.isdigit()) or not 1 <= int(raw) <= _MAX_INT:
            raise errors.NotFound(f"{what} not found")
        return int(raw)


# A query argument reaches the handler with these control characters turned into spaces (Tornado's get_argument).
_QUERY_WS = WS + r"\x00-\x08\x0e-\x1f"
QUERY_NOT_BLANK = rf"[^{_QUERY_WS}]"
QUERY_TWO_CHARS = rf"[^{_QUERY_WS}][\s\S]*[^{_QUERY_WS}]"  # at least 2 characters once trimmed

LIMIT = Param("limit", {"type": "integer", "minimum": 1, "maximum": MAX_PAGE, "default": 50})


class RoomAccess(ApiHandler):
    """The caller's room (404 for non-members) and the owner/admin check, for every room route."""

    async def _room(self, room_id: str) -> tuple[Principal, dict[str, Any]]:
        principal = await self.auth()
        room = await self.rooms.member_room(self.path_id(room_id, "room"), principal.user_id)
        return principal, room

    def _manage(self, principal: Principal, room: dict[str, Any]) -> None:
        if room["owner_id"] != principal.user_id and not principal.is_admin:
            raise errors.Forbidden("only the owner or an admin may change this room")


def message_json(row: dict[str, Any], viewer: int | None = None) -> dict[str, Any]:
    """A message as REST shows it; with ``viewer``, each reaction says whether it is theirs (``me``): a
    response has one reader, unlike a fan-out frame, whose readers compute it from ``users``."""
    frame = server_frames.message_from_row(row)
    frame.pop("type", None)
    if viewer is not None and "reactions" in frame:
        frame["reactions"] = [r | {"me": viewer in r["users"]} for r in frame["reactions"]]
    return frame
