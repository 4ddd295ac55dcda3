"""What every ``/api/v1`` handler shares (docs/API.md): ``ApiHandler`` (auth, declared query parameters,
path ids), ``RoomAccess``, ids in JSON bodies, the message JSON and the JSON-schema fragments of more than one
resource.  The handlers are thin: parse, call the service, render.
"""

from __future__ import annotations

from typing import Any

from chatd.api.openapi import MAX_QUERY_CHARS, MAX_SAFE_INT, Param
from chatd.api.web import BaseHandler
from chatd.core import errors, server_frames
from chatd.process.config import Settings
from chatd.process.state import ServerState
from chatd.services import auth
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

    def arg(self, name: str) -> Any:
        """A query parameter, parsed and checked by its declaration (``@op(query=...)``): the handler and
        the OpenAPI document read the same ``Param``."""
        method = getattr(type(self), (self.request.method or "get").lower())
        decl = getattr(method, "__openapi__", None)
        if decl is None:
            raise errors.Internal(f"{type(self).__name__} has no declaration")
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


def body_id(value: Any) -> int | None:
    """An id in a JSON body (1..2^53-1), or None. ``7.0`` counts: JSON Schema's integer is any number without a
    fractional part, and some JSON encoders write every number as a float."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, int) and not isinstance(value, bool) and 0 < value <= _MAX_INT:
        return value
    return None


# Python's whitespace (str.strip, re's \s), spelled out: a pattern's \s is ECMA-262's, which differs (U+0085).
WS = r"\t-\r\x1c-\x20\x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"
_CC = r"\x00-\x1f\x7f-\x9f"  # control characters (category Cc)
# What auth.validate_email / validate_password / validate_name accept (docs/API.md, register).
_DOMAIN_PART = rf"[^@.{WS}\x00-\x1f\x7f]+"
EMAIL = {
    "type": "string",
    "maxLength": auth.MAX_EMAIL_CHARS,
    "pattern": rf"^[^@{WS}\x00-\x1f\x7f]+@{_DOMAIN_PART}(\.{_DOMAIN_PART})+$",
}
PASSWORD = {"type": "string", "minLength": auth.MIN_PASSWORD_CHARS, "maxLength": auth.MAX_PASSWORD_CHARS}
NAME = {  # trimmed, 1..100 characters, no control characters
    "type": "string",
    "maxLength": auth.MAX_NAME_CHARS,
    "pattern": rf"^[^{_CC}]*[^{WS}{_CC}][^{_CC}]*$",
}
NON_EMPTY = {"type": "string", "minLength": 1}
NOT_BLANK = rf"[^{WS}]"  # (unanchored) not only whitespace
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


def message_json(row: dict[str, Any]) -> dict[str, Any]:
    frame = server_frames.message_from_row(row)
    frame.pop("type", None)
    return frame
