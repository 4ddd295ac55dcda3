"""REST API under ``/api/v1`` (docs/API.md).  Thin: parse, call the service, render."""

from __future__ import annotations

import asyncio
import json
import secrets
from typing import Any

from chatd import errors, protocol, store
from chatd.accounts import Accounts, Principal, user_json
from chatd.config import Settings
from chatd.rooms import ASSISTANT_MODES, ROOM_KINDS, Rooms
from chatd.state import ServerState
from chatd.store import Database
from chatd.web import BaseHandler

MAX_PAGE = 200
_MAX_INT = 2**53 - 1


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

    def int_arg(self, name: str, default: int | None = None, minimum: int = 0, maximum: int = _MAX_INT) -> int | None:
        raw = self.get_query_argument(name, None)
        if raw is None or raw == "":
            return default
        if not (raw.isascii() and raw.isdigit()) or not minimum <= int(raw) <= maximum:
            raise errors.BadRequest(f"{name} must be an integer between {minimum} and {maximum}")
        return int(raw)

    @staticmethod
    def path_id(raw: str, what: str) -> int:
        if not (raw.isascii() and raw.isdigit()) or not 1 <= int(raw) <= _MAX_INT:
            raise errors.NotFound(f"{what} not found")
        return int(raw)


# -- auth ----------------------------------------------------------------------------


class RegisterHandler(ApiHandler):
    async def post(self) -> None:
        self.send_json(await self.accounts.register(self.json_body(), self.request.remote_ip or ""), 201)


class LoginHandler(ApiHandler):
    async def post(self) -> None:
        self.send_json(await self.accounts.login(self.json_body(), self.request.remote_ip or ""))


class RefreshHandler(ApiHandler):
    async def post(self) -> None:
        self.send_json(await self.accounts.refresh(self.json_body()))


class LogoutHandler(ApiHandler):
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
    async def get(self) -> None:
        principal = await self.auth()
        user = await store.user_by_id(self.db, principal.user_id)
        if user is None:
            raise errors.Unauthorized("unknown user")
        self.send_json(user_json(user))


class BanHandler(ApiHandler):
    async def post(self, user_id: str) -> None:
        principal = await self.auth()
        if not principal.is_admin:
            raise errors.Forbidden("admin only")
        self.send_json(await self.accounts.ban(self.path_id(user_id, "user")))


# -- rooms ---------------------------------------------------------------------------


def room_json(row: dict[str, Any]) -> dict[str, Any]:
    out = {
        "id": row["id"],
        "name": row["name"],
        "kind": row["kind"],
        "owner_id": row["owner_id"],
        "status": row["status"],
        "assistant": row["assistant"],
        "last_seq": row["last_seq"],
        "created_at": store.iso(row["created_at"]),
        "updated_at": store.iso(row["updated_at"]),
    }
    if "read_seq" in row:
        out["read_seq"] = row["read_seq"]
        out["unread_count"] = max(0, row["last_seq"] - row["read_seq"])
    if "last_message" in row:
        out["last_message"] = row["last_message"]
    return out


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


class RoomsHandler(ApiHandler):
    async def post(self) -> None:
        principal = await self.auth()
        body = self.json_body()
        kind = body.get("kind", "group")
        if kind not in ROOM_KINDS:
            raise errors.BadRequest(f"kind must be one of {', '.join(ROOM_KINDS)}")
        members = body.get("members", [])
        if not isinstance(members, list) or not all(
            isinstance(m, int) and not isinstance(m, bool) and 0 < m <= _MAX_INT for m in members
        ):
            raise errors.BadRequest("members must be a list of user ids")
        if len(members) > 1000:
            raise errors.BadRequest("at most 1000 members at creation")
        default_mode = "always" if kind == "assistant" else "mention"
        assistant = parse_assistant(body.get("assistant"), {"mode": default_mode} if kind == "assistant" else None)
        room = await store.create_room(
            self.db, parse_name(body.get("name")), kind, principal.user_id, members, assistant
        )
        self.send_json(room_json(room | {"read_seq": 0}), 201)

    async def get(self) -> None:
        principal = await self.auth()
        status = self.get_query_argument("status", "active")
        if status not in ("active", "archived"):
            raise errors.BadRequest("status must be active or archived")
        limit = self.int_arg("limit", 50, 1, MAX_PAGE)
        cursor = self.int_arg("cursor", None, 1)
        assert limit is not None
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
    async def get(self, room_id: str) -> None:
        _, room = await self._room(room_id)
        self.send_json(room_json(room))

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
        self.send_json(room_json(updated | {"read_seq": room["read_seq"]}))

    async def delete(self, room_id: str) -> None:
        principal, room = await self._room(room_id)
        self._manage(principal, room)
        updated = await store.update_room(self.db, room["id"], {"status": "archived"})
        self.send_json(room_json(updated | {"read_seq": room["read_seq"]}))


class MembersHandler(RoomAccess):
    async def post(self, room_id: str) -> None:
        principal, room = await self._room(room_id)
        self._manage(principal, room)
        user_id = self.json_body().get("user_id")
        if not isinstance(user_id, int) or isinstance(user_id, bool) or not 0 < user_id <= _MAX_INT:
            raise errors.BadRequest("user_id must be a positive integer")
        added = await store.add_member(self.db, room["id"], user_id)
        self.send_json({"room_id": room["id"], "user_id": user_id, "added": added}, 201 if added else 200)


class MemberHandler(RoomAccess):
    async def delete(self, room_id: str, user_id: str) -> None:
        principal, room = await self._room(room_id)
        target = self.path_id(user_id, "member")
        if target != principal.user_id:
            self._manage(principal, room)
        if target == room["owner_id"]:
            raise errors.Conflict("the owner cannot leave; archive the room instead")
        if not await store.remove_member(self.db, room["id"], target):
            raise errors.NotFound("member not found")
        await self.rooms.kick(room["id"], target)
        self.set_status(204)
        self.finish()


class MessagesHandler(RoomAccess):
    async def get(self, room_id: str) -> None:
        _, room = await self._room(room_id)
        limit = self.int_arg("limit", 50, 1, MAX_PAGE)
        assert limit is not None
        rows, has_more = await store.messages_page(
            self.db, room["id"], self.int_arg("after_seq"), self.int_arg("before_seq"), limit
        )
        self.send_json({"messages": [_message_json(r) for r in rows], "has_more": has_more})

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
        self.send_json(body, 200 if result.duplicate else 201)


class StreamingSendHandler(RoomAccess):
    """``POST /rooms/{id}/messages/stream``: send, then the answer as Server-Sent Events.

    The same JSON as the socket's ``queued`` / ``stream_start`` / ``stream_chunk``
    / ``stream_end`` frames, as SSE events of those names; the room's sockets
    see the same stream.  Ends after ``stream_end`` (or at once when no answer
    is coming: ``error`` event).
    """

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
            listener.set_prompt(result.row["id"])  # replays what arrived before the id was known
            if result.assistant_error is not None:
                self.sse("error", result.assistant_error.to_dict())
            elif result.queued_position is None:
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
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._early: list[dict[str, Any]] = []  # frames before the prompt's id is known

    def set_prompt(self, prompt_id: int) -> None:
        self.prompt_id = prompt_id
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
                self.message_id = frame_json["message_id"]
        elif not (kind in ("stream_chunk", "stream_end") and frame_json.get("message_id") == self.message_id):
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


def routes(
    state: ServerState, settings: Settings, db: Database, accounts: Accounts, rooms: Rooms
) -> list[tuple[str, type[ApiHandler], dict[str, Any]]]:
    deps = {"state": state, "settings": settings, "db": db, "accounts": accounts, "rooms": rooms}
    prefix = "/api/v1"
    return [
        (prefix + r"/auth/register", RegisterHandler, deps),
        (prefix + r"/auth/login", LoginHandler, deps),
        (prefix + r"/auth/refresh", RefreshHandler, deps),
        (prefix + r"/auth/logout", LogoutHandler, deps),
        (prefix + r"/me", MeHandler, deps),
        (prefix + r"/admin/users/([^/]+)/ban", BanHandler, deps),
        (prefix + r"/rooms", RoomsHandler, deps),
        (prefix + r"/rooms/([^/]+)", RoomHandler, deps),
        (prefix + r"/rooms/([^/]+)/members", MembersHandler, deps),
        (prefix + r"/rooms/([^/]+)/members/([^/]+)", MemberHandler, deps),
        (prefix + r"/rooms/([^/]+)/messages", MessagesHandler, deps),
        (prefix + r"/rooms/([^/]+)/messages/stream", StreamingSendHandler, deps),
    ]
