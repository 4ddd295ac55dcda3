"""Rooms (``/rooms``, ``/rooms/{id}``) and their members (``/rooms/{id}/members``)."""

from __future__ import annotations

from typing import Any

from chatd.api.base import LIMIT, MAX_PAGE, NOT_BLANK, ApiHandler, RoomAccess, body_id
from chatd.api.openapi import BOOL, ID, Param, nullable, obj, op, page, ref
from chatd.core import errors, server_frames
from chatd.services.rooms import ASSISTANT_MODES, ROOM_KINDS
from chatd.storage import rooms as rooms_db
from chatd.storage.db import iso

room_json = server_frames.room_object


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
        room = await rooms_db.create_room(
            self.db, parse_name(body.get("name")), kind, principal.user_id, members, assistant
        )
        await self.rooms.created(room, sorted({principal.user_id, *members}))
        self.send_json(room_json(room | {"read_seq": 0}), 201)

    @op(
        summary="Your rooms, newest first",
        tag="rooms",
        query=(
            Param("status", {"type": "string", "enum": ["active", "archived"], "default": "active"}),
            LIMIT,
            Param("cursor", {"type": "integer", "minimum": 1}, "next_cursor of the previous page"),
        ),
        responses={200: ("Page of rooms", page("Room", "rooms"))},
    )
    async def get(self) -> None:
        principal = await self.auth()
        status = self.arg("status")
        limit = self.arg("limit")
        cursor = self.arg("cursor")
        rows = await rooms_db.list_rooms(self.db, principal.user_id, status, limit + 1, cursor)
        page = rows[:limit]
        next_cursor = page[-1]["id"] if len(rows) > limit else None
        self.send_json({"rooms": [room_json(r) for r in page], "next_cursor": next_cursor})


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
        updated = await rooms_db.update_room(self.db, room["id"], changes)
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
        updated = await rooms_db.update_room(self.db, room["id"], {"status": "archived"})
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
        rows = await rooms_db.room_roster(self.db, room["id"], self.arg("cursor") or 0, limit + 1)
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
                "joined_at": iso(r["joined_at"]),
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
