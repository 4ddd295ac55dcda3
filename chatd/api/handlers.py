"""REST API under ``/api/v1`` (docs/API.md).  Thin: parse, call the service, render."""

from __future__ import annotations

import asyncio
import json
import re
import secrets
from typing import Any
from urllib.parse import quote

import tornado.web

from chatd.api.openapi import BOOL, ID, INT, MAX_QUERY_CHARS, MAX_SAFE_INT, STR, Param, nullable, obj, op, page, ref
from chatd.api.web import BaseHandler
from chatd.core import errors, protocol
from chatd.process.config import Settings
from chatd.process.state import ServerState
from chatd.services import auth
from chatd.services.accounts import Accounts, Principal, user_json
from chatd.services.admin import MAX_ANNOUNCEMENT_CHARS, Admin
from chatd.services.files import MAX_CAPTION_CHARS, Files, Upload
from chatd.services.rooms import ASSISTANT_MODES, ROOM_KINDS, Rooms
from chatd.services.search import MODES, Search
from chatd.storage import store
from chatd.storage.store import Database

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


# -- auth ----------------------------------------------------------------------------


# Python's whitespace (str.strip, re's \s), spelled out: a pattern's \s is ECMA-262's, which differs (U+0085).
_WS = r"\t-\r\x1c-\x20\x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"
_CC = r"\x00-\x1f\x7f-\x9f"  # control characters (category Cc)
# What auth.validate_email / validate_password / validate_name accept (docs/API.md, register).
_DOMAIN_PART = rf"[^@.{_WS}\x00-\x1f\x7f]+"
EMAIL = {
    "type": "string",
    "maxLength": auth.MAX_EMAIL_CHARS,
    "pattern": rf"^[^@{_WS}\x00-\x1f\x7f]+@{_DOMAIN_PART}(\.{_DOMAIN_PART})+$",
}
PASSWORD = {"type": "string", "minLength": auth.MIN_PASSWORD_CHARS, "maxLength": auth.MAX_PASSWORD_CHARS}
NAME = {  # trimmed, 1..100 characters, no control characters
    "type": "string",
    "maxLength": auth.MAX_NAME_CHARS,
    "pattern": rf"^[^{_CC}]*[^{_WS}{_CC}][^{_CC}]*$",
}
NON_EMPTY = {"type": "string", "minLength": 1}
NOT_BLANK = rf"[^{_WS}]"  # (unanchored) not only whitespace
# A query argument reaches the handler with these control characters turned into spaces (Tornado's get_argument).
_QUERY_WS = _WS + r"\x00-\x08\x0e-\x1f"
QUERY_NOT_BLANK = rf"[^{_QUERY_WS}]"
QUERY_TWO_CHARS = rf"[^{_QUERY_WS}][\s\S]*[^{_QUERY_WS}]"  # at least 2 characters once trimmed

_REGISTER = obj({"email": EMAIL, "password": PASSWORD, "name": NAME}, extra=True)
_LOGIN = obj({"email": NON_EMPTY, "password": NON_EMPTY}, extra=True)
_REFRESH = obj({"refresh_token": NON_EMPTY}, extra=True)
_OK = {"type": "object"}


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


class MeHandler(ApiHandler):
    @op(summary="The caller", tag="account", responses={200: ("User", ref("User"))})
    async def get(self) -> None:
        principal = await self.auth()
        user = await store.user_by_id(self.db, principal.user_id)
        if user is None:
            raise errors.Unauthorized("unknown user")
        self.send_json(user_json(user))

    @op(summary="Change your name", tag="account", body=obj({"name": NAME}), responses={200: ("User", ref("User"))})
    async def patch(self) -> None:
        principal = await self.auth()
        self.send_json(await self.accounts.rename(principal, self.json_body()))

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
        body=obj({"old_password": NON_EMPTY, "new_password": PASSWORD}, extra=True),
        responses={204: ("Changed", None)},
    )
    async def post(self) -> None:
        principal = await self.auth()
        await self.accounts.change_password(principal, self.json_body())
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
        responses={200: ("Matches (at most 10)", obj({"users": {"type": "array", "items": ref("UserRef")}}))},
    )
    async def get(self) -> None:
        principal = await self.auth()
        self.send_json({"users": await self.accounts.lookup(principal, self.arg("q"))})


class BanHandler(ApiHandler):
    @op(summary="Ban a user (sessions revoked, sockets closed)", tag="admin", responses={200: ("User", ref("User"))})
    async def post(self, user_id: str) -> None:
        principal = await self.auth()
        if not principal.is_admin:
            raise errors.Forbidden("admin only")
        self.send_json(await self.accounts.ban(self.path_id(user_id, "user")))


# -- rooms ---------------------------------------------------------------------------


room_json = protocol.room_object


def parse_assistant(value: Any, defaults: dict[str, Any] | None) -> dict[str, Any] | None:
    if value is None:
        return defaults
    if not isinstance(value, dict):
        raise errors.BadRequest("assistant must be an object")
    out = dict(defaults or {})
    for key in ("model", "system_prompt"):
        if key in value:
            if not isinstance(value[key], str) or len(value[key]) > 20_000:
                raise errors.BadRequest(f"assistant.{key} must be a string")
            out[key] = value[key]
    if "mode" in value:
        if value["mode"] not in ASSISTANT_MODES:
            raise errors.BadRequest(f"assistant.mode must be one of {', '.join(ASSISTANT_MODES)}")
        out["mode"] = value["mode"]
    unknown = set(value) - {"model", "system_prompt", "mode"}
    if unknown:
        raise errors.BadRequest(f"unknown assistant settings: {', '.join(sorted(unknown))}")
    return out


def parse_name(value: Any) -> str:
    if not isinstance(value, str) or not value.strip() or len(value) > 200:
        raise errors.BadRequest("name must be a non-empty string of at most 200 characters")
    return value.strip()


ROOM_NAME = {"type": "string", "maxLength": 200, "pattern": NOT_BLANK}  # parse_name
_SETTING = {"type": "string", "maxLength": 20_000}
ASSISTANT = nullable(  # parse_assistant; null keeps the defaults (creation) or the current settings (PATCH)
    obj({"model": _SETTING, "system_prompt": _SETTING, "mode": {"enum": list(ASSISTANT_MODES)}}, required=[])
)
_ROOM_CREATE = obj(
    {
        "name": ROOM_NAME,
        "kind": {"enum": list(ROOM_KINDS)},
        "members": {"type": "array", "items": ID, "maxItems": 1000},
        "assistant": ASSISTANT,
    },
    required=["name"],
    extra=True,
)
_LIMIT = Param("limit", {"type": "integer", "minimum": 1, "maximum": MAX_PAGE, "default": 50})


class RoomsHandler(ApiHandler):
    @op(
        summary="Create a room (room_added to every member)",
        tag="rooms",
        body=_ROOM_CREATE,
        responses={201: ("Room", ref("Room"))},
    )
    async def post(self) -> None:
        principal = await self.auth()
        body = self.json_body()
        kind = body.get("kind", "group")
        if kind not in ROOM_KINDS:
            raise errors.BadRequest(f"kind must be one of {', '.join(ROOM_KINDS)}")
        listed = body.get("members", [])
        ids = [body_id(m) for m in listed] if isinstance(listed, list) else [None]
        members = [m for m in ids if m is not None]
        if len(members) != len(ids):
            raise errors.BadRequest("members must be a list of user ids")
        if len(members) > 1000:
            raise errors.BadRequest("at most 1000 members at creation")
        default_mode = "always" if kind == "assistant" else "mention"
        assistant = parse_assistant(body.get("assistant"), {"mode": default_mode} if kind == "assistant" else None)
        room = await store.create_room(
            self.db, parse_name(body.get("name")), kind, principal.user_id, members, assistant
        )
        await self.rooms.created(room, sorted({principal.user_id, *members}))
        self.send_json(room_json(room | {"read_seq": 0}), 201)

    @op(
        summary="Your rooms, newest first",
        tag="rooms",
        query=(
            Param("status", {"type": "string", "enum": ["active", "archived"], "default": "active"}),
            _LIMIT,
            Param("cursor", {"type": "integer", "minimum": 1}, "next_cursor of the previous page"),
        ),
        responses={200: ("Page of rooms", page("Room", "rooms"))},
    )
    async def get(self) -> None:
        principal = await self.auth()
        status = self.arg("status")
        limit = self.arg("limit")
        cursor = self.arg("cursor")
        rows = await store.list_rooms(self.db, principal.user_id, status, limit + 1, cursor)
        page = rows[:limit]
        next_cursor = page[-1]["id"] if len(rows) > limit else None
        self.send_json({"rooms": [room_json(r) for r in page], "next_cursor": next_cursor})


class RoomAccess(ApiHandler):
    """The caller's room (404 for non-members) and the owner/admin check, for every room route."""

    async def _room(self, room_id: str) -> tuple[Principal, dict[str, Any]]:
        principal = await self.auth()
        room = await self.rooms.member_room(self.path_id(room_id, "room"), principal.user_id)
        return principal, room

    def _manage(self, principal: Principal, room: dict[str, Any]) -> None:
        if room["owner_id"] != principal.user_id and not principal.is_admin:
            raise errors.Forbidden("only the owner or an admin may change this room")


class RoomHandler(RoomAccess):
    @op(summary="A room of yours", tag="rooms", responses={200: ("Room", ref("Room"))})
    async def get(self, room_id: str) -> None:
        _, room = await self._room(room_id)
        self.send_json(room_json(room))

    @op(
        summary="Rename or reconfigure (owner/admin; room_updated to every member)",
        tag="rooms",
        body=obj({"name": ROOM_NAME, "assistant": ASSISTANT}, required=[]),
        responses={200: ("Room", ref("Room"))},
    )
    async def patch(self, room_id: str) -> None:
        principal, room = await self._room(room_id)
        self._manage(principal, room)
        body = self.json_body()
        changes: dict[str, Any] = {}
        if "name" in body:
            changes["name"] = parse_name(body["name"])
        if "assistant" in body:
            changes["assistant"] = parse_assistant(body["assistant"], room["assistant"] or {})
        unknown = set(body) - {"name", "assistant"}
        if unknown:
            raise errors.BadRequest(f"cannot change: {', '.join(sorted(unknown))}")
        updated = await store.update_room(self.db, room["id"], changes)
        await self.rooms.updated(updated)
        self.send_json(room_json(updated | {"read_seq": room["read_seq"]}))

    @op(
        summary="Archive (owner/admin; room_updated to every member)",
        tag="rooms",
        responses={200: ("Room", ref("Room"))},
    )
    async def delete(self, room_id: str) -> None:
        principal, room = await self._room(room_id)
        self._manage(principal, room)
        updated = await store.update_room(self.db, room["id"], {"status": "archived"})
        await self.rooms.updated(updated)
        self.send_json(room_json(updated | {"read_seq": room["read_seq"]}))


_ADDED = obj({"room_id": ID, "user_id": ID, "added": BOOL})


class MembersHandler(RoomAccess):
    @op(
        summary="Add a member (owner/admin): member_joined in the room, room_added to the new member",
        tag="rooms",
        body=obj({"user_id": ID}, extra=True),
        responses={201: ("Added", _ADDED), 200: ("Already a member", _ADDED)},
    )
    async def post(self, room_id: str) -> None:
        principal, room = await self._room(room_id)
        self._manage(principal, room)
        user_id = body_id(self.json_body().get("user_id"))
        if user_id is None:
            raise errors.BadRequest("user_id must be a positive integer")
        added = await self.rooms.add_member(room, user_id, principal.user_id)
        self.send_json({"room_id": room["id"], "user_id": user_id, "added": added}, 201 if added else 200)

    @op(
        summary="The room's members with presence and read position (members only), by user id",
        tag="rooms",
        query=(
            Param("limit", {"type": "integer", "minimum": 1, "maximum": MAX_PAGE, "default": 100}),
            Param("cursor", {"type": "integer", "minimum": 1}, "next_cursor of the previous page"),
        ),
        responses={200: ("Page of members", page("Member", "members"))},
    )
    async def get(self, room_id: str) -> None:
        _, room = await self._room(room_id)
        limit = self.arg("limit")
        rows = await store.room_roster(self.db, room["id"], self.arg("cursor") or 0, limit + 1)
        items = rows[:limit]
        online = await self.rooms.online_now(room["id"])
        members = [
            {
                "id": r["id"],
                "name": r["name"],
                "status": r["status"],
                "role": r["role"],
                "online": r["id"] in online,
                "read_seq": r["read_seq"],
                "joined_at": store.iso(r["joined_at"]),
            }
            for r in items
        ]
        self.send_json({"members": members, "next_cursor": items[-1]["id"] if len(rows) > limit else None})


class MemberHandler(RoomAccess):
    @op(
        summary="Leave, or remove a member (owner/admin): room_removed to them, member_left in the room",
        tag="rooms",
        responses={204: ("Removed", None)},
    )
    async def delete(self, room_id: str, user_id: str) -> None:
        principal, room = await self._room(room_id)
        target = self.path_id(user_id, "member")
        if target != principal.user_id:
            self._manage(principal, room)
        if target == room["owner_id"]:
            raise errors.Conflict("the owner cannot leave; archive the room instead")
        await self.rooms.remove_member(room, target, principal.user_id)
        self.set_status(204)
        self.finish()


# protocol.parse_client_frame's send: content not blank, no NUL, at most ws.max_message_chars (default; longer:
# 413 too_large); client_msg_id 1..64 printable ASCII characters without spaces.
CONTENT = {
    "type": "string",
    "maxLength": 4000,
    "pattern": rf"^[^\x00]*[^{_WS}\x00][^\x00]*$",
    "description": "at most ws.max_message_chars characters (default 4000), not blank, no NUL",
}
CLIENT_MSG_ID = {"type": "string", "pattern": f"^[!-~]{{1,{protocol.MAX_ID_CHARS}}}$"}
_SEND = obj({"content": CONTENT, "client_msg_id": CLIENT_MSG_ID}, extra=True)


class MessagesHandler(RoomAccess):
    @op(
        summary="A page of the room's messages, ascending by seq",
        tag="messages",
        query=(
            _LIMIT,
            Param("after_seq", {"type": "integer", "minimum": 0}),
            Param("before_seq", {"type": "integer", "minimum": 0}),
        ),
        responses={200: ("Page", obj({"messages": {"type": "array", "items": ref("Message")}, "has_more": BOOL}))},
    )
    async def get(self, room_id: str) -> None:
        _, room = await self._room(room_id)
        limit = self.arg("limit")
        rows, has_more = await store.messages_page(
            self.db, room["id"], self.arg("after_seq"), self.arg("before_seq"), limit
        )
        self.send_json({"messages": [_message_json(r) for r in rows], "has_more": has_more})

    @op(
        summary="Send a message (idempotent by client_msg_id)",
        tag="messages",
        body=_SEND,
        responses={201: ("Stored", ref("Message")), 200: ("Duplicate of a stored message", ref("Message"))},
    )
    async def post(self, room_id: str) -> None:
        principal = await self.auth()
        body = self.json_body()
        content, client_msg_id = body.get("content"), body.get("client_msg_id")
        try:
            frame = protocol.parse_client_frame(
                {
                    "type": "send",
                    "room_id": self.path_id(room_id, "room"),
                    "content": content,
                    "client_msg_id": client_msg_id,
                },
                max_message_chars=self.config.ws.max_message_chars,
            )
        except protocol.FrameError as exc:
            raise exc.error from None
        assert isinstance(frame, protocol.Send)
        result = await self.rooms.send(principal.user_id, frame.room_id, frame.content, frame.client_msg_id)
        body = _message_json(result.row) | {"duplicate": result.duplicate}
        if result.queued_position is not None:
            body["assistant"] = {"status": "queued", "position": result.queued_position}
        elif result.assistant_error is not None:
            body["assistant"] = {"status": "refused", "error": result.assistant_error.to_dict()}
        elif result.answer_pending:  # owed; the sweeper queues it once the queue answers
            body["assistant"] = {"status": "pending"}
        self.send_json(body, 200 if result.duplicate else 201)


# One event of the stream (OpenAPI 3.2's reading of an event-stream schema: each event, not the whole text).
SSE_EVENT = obj(
    {
        "event": {"enum": ["message", "queued", "stream_start", "stream_chunk", "stream_end", "error"]},
        "data": {"type": "string", "contentMediaType": "application/json"},
    },
    extra=True,  # id, retry: never sent, but allowed by the format
)


class StreamingSendHandler(RoomAccess):
    """``POST /rooms/{id}/messages/stream``: send, then the answer as Server-Sent Events.

    The same JSON as the socket's ``queued`` / ``stream_start`` / ``stream_chunk``
    / ``stream_end`` frames, as SSE events of those names; the room's sockets
    see the same stream.  Ends after ``stream_end`` (or at once when no answer
    is coming: ``error`` event).
    """

    @op(
        summary="Send, then the assistant's answer as Server-Sent Events",
        tag="messages",
        body=_SEND,
        content_type="text/event-stream",
        responses={200: ("message, queued, stream_start, stream_chunk, stream_end or error events", SSE_EVENT)},
    )
    async def post(self, room_id: str) -> None:
        principal = await self.auth()
        room = await self.rooms.member_room(self.path_id(room_id, "room"), principal.user_id)
        body = self.json_body()
        try:
            frame = protocol.parse_client_frame(
                {
                    "type": "send",
                    "room_id": room["id"],
                    "content": body.get("content"),
                    "client_msg_id": body.get("client_msg_id"),
                },
                max_message_chars=self.config.ws.max_message_chars,
            )
        except protocol.FrameError as exc:
            raise exc.error from None
        assert isinstance(frame, protocol.Send)
        listener = self._listener = SseListener(self, principal.user_id, self.config.ws.max_held_frames)
        hub = self.rooms.hub
        await hub.join_room(listener, room["id"])  # listening before the message exists: nothing missed
        try:
            hub.finish_join(listener, room["id"], [], room["last_seq"])
            result = await self.rooms.send(principal.user_id, room["id"], frame.content, frame.client_msg_id)
            self.set_header("Content-Type", "text/event-stream; charset=utf-8")
            self.set_header("X-Accel-Buffering", "no")  # nginx: do not buffer the stream
            self.sse("message", _message_json(result.row))
            prompt_id = int(result.row["id"])
            assistant = self.rooms.assistant
            # A retried request (same client_msg_id): re-attach to its answer, running or stored.
            attach = await assistant.attach(room["id"], prompt_id) if result.duplicate and assistant else None
            listener.set_prompt(prompt_id, attach)  # then replays what arrived before the id was known
            coming = attach is not None or result.queued_position is not None or result.answer_pending
            if result.assistant_error is not None:
                self.sse("error", result.assistant_error.to_dict())
            elif not coming:
                self.sse("error", {"code": "bad_request", "message": "no assistant answers in this room"})
            else:
                await self.flush()
                limit_s = self.config.assistant.provider_timeout_s * 5
                if not await self._wait_with_keepalive(listener.done, limit_s):
                    self.sse("error", {"code": "unavailable", "message": "no answer in time"})
        finally:
            await hub.leave_room(listener, room["id"])
        self.finish()

    def on_connection_close(self) -> None:
        listener = getattr(self, "_listener", None)
        if listener is not None:
            listener.force_close(0, "client went away")
        super().on_connection_close()

    def sse(self, event: str, data: dict[str, Any]) -> None:
        self.write(f"event: {event}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n")

    async def _wait_with_keepalive(self, done: asyncio.Future[None], timeout_s: float) -> bool:
        """Wait for ``done``; a comment line every ``sse_keepalive_s`` meanwhile, so a long wait for the
        first token never trips a proxy's read timeout. False when ``timeout_s`` passed first."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        every = self.config.server.sse_keepalive_s
        while not done.done():
            remaining = deadline - loop.time()
            if remaining <= 0:
                return False
            try:
                await asyncio.wait_for(asyncio.shield(done), min(every, remaining))
            except TimeoutError:
                if not done.done() and loop.time() < deadline and self.request.connection is not None:
                    self.write(": keepalive\n\n")  # a comment: EventSource clients ignore it
                    await self.flush()
        return True


class SseListener:
    """A fan-out subscriber that forwards one prompt's answer to an SSE response."""

    def __init__(self, handler: StreamingSendHandler, user_id: int, max_early: int) -> None:
        self.handler = handler
        self.max_early = max_early
        self.connection_id = "sse-" + secrets.token_hex(6)
        self.user_id = user_id
        self.family: str | None = None
        self.room_seq: dict[int, int] = {}
        self.stream_marks: dict[int, int] = {}
        self.prompt_id: int | None = None
        self.message_id: int | None = None
        self.mark = -1  # chunks up to this index were sent by a catch-up
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._early: list[dict[str, Any]] = []  # frames before the prompt's id is known

    def set_prompt(self, prompt_id: int, catch_up: tuple[list[dict[str, Any]], int] | None = None) -> None:
        self.prompt_id = prompt_id
        if catch_up is not None:
            frames, index = catch_up
            for frame_json in frames:
                self._forward(dict(frame_json))
            self.mark = index  # live chunks up to it are in the catch-up chunk
        early, self._early = self._early, []
        for frame_json in early:
            self._forward(frame_json)

    def write_frame(self, frame: bytes) -> None:
        for payload in protocol.ws_frame_payloads(frame):
            frame_json = json.loads(payload)
            if self.prompt_id is None:
                if len(self._early) < self.max_early:  # a fast answer can start before send() returns
                    self._early.append(frame_json)
                continue
            self._forward(frame_json)

    def _forward(self, frame_json: dict[str, Any]) -> None:
        kind = frame_json.get("type")
        if kind in ("queued", "stream_start") and frame_json.get("reply_to_message_id") == self.prompt_id:
            if kind == "stream_start":
                if frame_json["message_id"] == self.message_id:
                    return  # announced by the catch-up already
                self.message_id = frame_json["message_id"]
        elif kind in ("stream_chunk", "stream_end") and frame_json.get("message_id") == self.message_id:
            if kind == "stream_chunk" and frame_json.get("index", 0) <= self.mark:
                return  # covered by the catch-up chunk
        else:
            return
        if self.handler.request.connection is None or self.done.done():
            return
        frame_json.pop("type", None)
        self.handler.sse(kind, frame_json)
        self.handler.flush()
        if kind == "stream_end":
            self.done.set_result(None)

    def force_close(self, code: int, reason: str) -> None:
        if not self.done.done():
            self.done.set_result(None)

    def kicked(self, room_id: int) -> None:
        self.force_close(0, "removed")


def _message_json(row: dict[str, Any]) -> dict[str, Any]:
    frame = protocol.message_from_row(row)
    frame.pop("type", None)
    return frame


# -- files --------------------------------------------------------------------------


# Bodies these routes stream and cap themselves (web.RequestLimits leaves them alone).
STREAMED_BODIES = (re.compile(r"^/api/v1/rooms/[^/]+/files$"),)


@tornado.web.stream_request_body
class FileUploadHandler(RoomAccess):
    """``POST /rooms/{id}/files``: the body is parsed as it arrives, into a temporary file on disk."""

    files: Files

    def initialize(self, files: Files, **deps: Any) -> None:  # type: ignore[override]
        super().initialize(**deps)
        self.files = files
        self.upload: Upload | None = None
        self.refused: errors.ChatdError | None = None

    async def prepare(self) -> None:  # type: ignore[override]
        super().prepare()
        if self.request.method != "POST":
            return
        self.upload_room = (await self._room(self.path_args[0]))[1]
        cap = self.config.files.max_bytes + 65536
        declared = self.request.headers.get("Content-Length")
        if declared is not None and declared.isdigit() and int(declared) > cap:
            raise errors.TooLarge(f"file over {self.config.files.max_bytes} bytes")  # refused before any byte
        # Tornado's own bound is looser (it refuses a chunk before reading it, with a bare 400): the exact
        # cap is Upload's, checked on every chunk as it arrives.
        self.request.connection.set_max_body_size(2 * cap)  # type: ignore[union-attr]
        self.upload = self.files.begin(self.request.headers.get("Content-Type", ""))

    def data_received(self, chunk: bytes) -> None:
        if self.refused is not None or self.upload is None:
            return
        try:
            self.upload.feed(chunk)
        except errors.ChatdError as err:
            # Answer now, mid-body: Tornado reads no more of it and closes the connection once the
            # response is written (the only way not to read the rest of a body).
            self.refused = err
            self.upload.discard()
            self._render_error(err)

    def on_connection_close(self) -> None:
        if self.upload is not None:
            self.upload.discard()
        super().on_connection_close()

    @op(
        summary="Attach a file: multipart (file + optional caption), streamed, sniffed; a message of kind file",
        tag="files",
        multipart=obj(
            {
                "file": {"type": "string", "contentMediaType": "application/octet-stream", "minLength": 1},
                "caption": {"type": "string", "maxLength": MAX_CAPTION_CHARS},
            },
            required=["file"],
        ),
        description="The type is sniffed from the bytes: one outside files.allowed_types is 415 unsupported_type; "
        "a file over files.max_bytes is 413 too_large.",
        responses={201: ("The file message", ref("Message"))},
    )
    async def post(self, room_id: str) -> None:
        principal = self.principal
        assert principal is not None and self.upload is not None
        if self.refused is not None:
            raise self.refused
        try:
            row = await self.files.complete(self.upload, self.upload_room["id"], principal.user_id)
        finally:
            self.upload.discard()
        self.send_json(_message_json(row), 201)


_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """One byte range of ``Range`` as (start, end) inclusive; None for the whole file."""
    if not header:
        return None
    m = _RANGE.match(header.strip())
    if m is None or (not m.group(1) and not m.group(2)):
        return None  # multiple or malformed ranges: the whole file (RFC 9110 allows ignoring Range)
    if not m.group(1):
        n = int(m.group(2))
        if n == 0:
            raise errors.RangeNotSatisfiable(f"size {size}")
        return max(0, size - n), size - 1
    start = int(m.group(1))
    end = int(m.group(2)) if m.group(2) else size - 1
    if start >= size or end < start:
        raise errors.RangeNotSatisfiable(f"size {size}")
    return start, min(end, size - 1)


class FileHandler(ApiHandler):
    files: Files

    def initialize(self, files: Files, **deps: Any) -> None:  # type: ignore[override]
        super().initialize(**deps)
        self.files = files

    @op(
        summary="Download an attachment (members of its room only; Range supported)",
        tag="files",
        content_type="*/*",  # the file's own (sniffed) type
        responses={200: ("The file", STR), 206: ("Part of the file", STR)},
    )
    async def get(self, file_id: str) -> None:
        principal = await self.auth()
        row = await self.files.for_member(self.path_id(file_id, "file"), principal.user_id)
        size = int(row["size"])
        try:
            wanted = parse_range(self.request.headers.get("Range"), size)
        except errors.RangeNotSatisfiable as err:
            self.set_status(416)
            self.set_header("Content-Range", f"bytes */{size}")
            self.finish(json.dumps({"error": err.to_dict()}))
            return
        start, end = wanted if wanted is not None else (0, size - 1)
        inline = self.files.inline(row["content_type"])
        name = row["name"]
        fallback = "".join(c if c.isascii() and c.isprintable() and c not in '"\\' else "_" for c in name)
        self.set_header("Content-Type", row["content_type"])
        self.set_header(
            "Content-Disposition",
            f"{'inline' if inline else 'attachment'}; filename=\"{fallback}\"; filename*=UTF-8''{quote(name)}",
        )
        self.set_header("Content-Security-Policy", "sandbox; default-src 'none'; frame-ancestors 'none'")
        self.set_header("Cache-Control", "private, max-age=3600")
        self.set_header("Accept-Ranges", "bytes")
        self.set_header("ETag", f'"{row["sha256"]}"')
        self.set_header("Content-Length", str(end - start + 1))
        if wanted is not None:
            self.set_status(206)
            self.set_header("Content-Range", f"bytes {start}-{end}/{size}")
        async for chunk in self.files.storage.read(row["storage_key"], start, end):
            self.write(chunk)
            await self.flush()
        self.finish()


# -- search ---------------------------------------------------------------------------


class SearchHandler(ApiHandler):
    search: Search

    def initialize(self, search: Search, **deps: Any) -> None:  # type: ignore[override]
        super().initialize(**deps)
        self.search = search

    @op(
        summary="Search the messages of your rooms (text, semantic or hybrid)",
        tag="search",
        query=(
            Param(
                "q", {"type": "string", "minLength": 1, "maxLength": 500, "pattern": QUERY_NOT_BLANK}, "the query", True
            ),
            Param("room_id", {"type": "integer", "minimum": 1}, "only this room (yours)"),
            Param("mode", {"type": "string", "enum": list(MODES), "default": "text"}),
            Param("limit", {"type": "integer", "minimum": 1, "maximum": 50, "default": 20}),
            Param("cursor", {"type": "integer", "minimum": 0, "maximum": 1000}, "next_cursor of the previous page"),
        ),
        responses={
            200: (
                "Ranked hits",
                obj(
                    {
                        "hits": {"type": "array", "items": ref("SearchHit")},
                        "mode": {"enum": list(MODES)},
                        "next_cursor": {"anyOf": [INT, {"type": "null"}]},
                    }
                ),
            )
        },
    )
    async def get(self) -> None:
        principal = await self.auth()
        room_id = self.arg("room_id")
        if room_id is not None:
            await self.rooms.member_room(room_id, principal.user_id)  # 404 for other rooms
        self.send_json(
            await self.search.search(
                principal.user_id, self.arg("q"), room_id, self.arg("mode"), self.arg("limit"), self.arg("cursor") or 0
            )
        )


# -- admin ------------------------------------------------------------------------------


ANNOUNCEMENT = {"type": "string", "maxLength": MAX_ANNOUNCEMENT_CHARS, "pattern": NOT_BLANK}  # announcement_text
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
            _LIMIT,
            Param("cursor", {"type": "integer", "minimum": 1}),
        ),
        responses={200: ("Page of users", page("User", "users"))},
    )
    async def get(self) -> None:
        await self.admin_auth()
        self.send_json(await self.admin.users(self.arg("q"), self.arg("status"), self.arg("cursor"), self.arg("limit")))


class AdminUnbanHandler(AdminHandler):
    @op(summary="Unban a user", tag="admin", responses={200: ("User", ref("User"))})
    async def post(self, user_id: str) -> None:
        await self.admin_auth()
        target = self.path_id(user_id, "user")
        self.audit_target = f"user:{target}"
        self.send_json(await self.admin.unban(target))


class AdminRoleHandler(AdminHandler):
    @op(
        summary="Set a user's role",
        tag="admin",
        body=obj({"role": {"enum": ["user", "admin"]}}, extra=True),
        responses={200: ("User", ref("User"))},
    )
    async def post(self, user_id: str) -> None:
        await self.admin_auth()
        target = self.path_id(user_id, "user")
        role = self.json_body().get("role")
        self.audit_target, self.audit_details = f"user:{target}", {"role": role}
        self.send_json(await self.admin.set_role(target, role))


class AdminRoomMessagesHandler(AdminHandler):
    @op(
        summary="Browse any room's log, deleted messages included (newest first)",
        tag="admin",
        query=(_LIMIT, Param("cursor", {"type": "integer", "minimum": 1}, "before this seq")),
        responses={200: ("Page", page("AdminMessage", "messages"))},
    )
    async def get(self, room_id: str) -> None:
        await self.admin_auth()
        target = self.path_id(room_id, "room")
        self.audit_target = f"room:{target}"
        self.send_json(await self.admin.room_messages(target, self.arg("cursor"), self.arg("limit")))

    @op(
        summary="Announce in a room: a system message (kind system) with a seq",
        tag="admin",
        body=obj({"content": ANNOUNCEMENT}, extra=True),
        responses={201: ("The message", ref("Message"))},
    )
    async def post(self, room_id: str) -> None:
        principal = await self.admin_auth()
        target = self.path_id(room_id, "room")
        self.audit_target = f"room:{target}"
        self.send_json(await self.admin.announce(principal.user_id, target, self.json_body().get("content")), 201)


class AdminBroadcastHandler(AdminHandler):
    @op(
        summary="Broadcast: a system message in every active room, or an announcement frame to every user",
        tag="admin",
        body=obj({"target": {"enum": ["rooms", "users"]}, "content": ANNOUNCEMENT}, extra=True),
        responses={200: ("Done", obj({"target": {"enum": ["rooms", "users"]}, "count": INT}))},
    )
    async def post(self) -> None:
        principal = await self.admin_auth()
        body = self.json_body()
        self.audit_target = f"broadcast:{body.get('target')}"
        self.send_json(await self.admin.broadcast(principal.user_id, body.get("target"), body.get("content")))


class AdminAuditHandler(AdminHandler):
    @op(
        summary="The audit log, newest first",
        tag="admin",
        query=(_LIMIT, Param("cursor", {"type": "integer", "minimum": 1})),
        responses={200: ("Page", page("AuditEntry", "entries"))},
    )
    async def get(self) -> None:
        await self.admin_auth()
        self.send_json(await self.admin.audit_page(self.arg("cursor"), self.arg("limit")))


class UsageHandler(ApiHandler):
    admin: Admin

    def initialize(self, admin: Admin, **deps: Any) -> None:  # type: ignore[override]
        super().initialize(**deps)
        self.admin = admin

    @op(
        summary="Your token usage (30 days) and what is left of today's budget",
        tag="account",
        responses={200: ("Usage", ref("Usage"))},
    )
    async def get(self) -> None:
        principal = await self.auth()
        self.send_json(await self.admin.usage(principal.user_id))


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
        (prefix + r"/rooms", RoomsHandler, deps),
        (prefix + r"/rooms/([^/]+)", RoomHandler, deps),
        (prefix + r"/rooms/([^/]+)/members", MembersHandler, deps),
        (prefix + r"/rooms/([^/]+)/members/([^/]+)", MemberHandler, deps),
        (prefix + r"/rooms/([^/]+)/messages", MessagesHandler, deps),
        (prefix + r"/rooms/([^/]+)/messages/stream", StreamingSendHandler, deps),
        (prefix + r"/rooms/([^/]+)/files", FileUploadHandler, {**deps, "files": files}),
        (prefix + r"/files/([^/]+)", FileHandler, {**deps, "files": files}),
        (prefix + r"/search", SearchHandler, {**deps, "search": search}),
        (prefix + r"/openapi.json", OpenApiHandler, {**deps, "spec": spec}),
    ]
