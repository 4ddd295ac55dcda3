"""Rooms (``/rooms``, ``/rooms/{id}``), their members (``/rooms/{id}/members``) and read receipts
(``/rooms/{id}/receipts``)."""

from __future__ import annotations

from typing import Any

from msgspec import UNSET

from chatd.api.base import LIMIT, MAX_PAGE, ApiHandler, RoomAccess
from chatd.api.bodies import AssistantSettings, MemberAdd, RoomChange, RoomCreate
from chatd.api.openapi import Param, op
from chatd.api.responses import MemberAdded, MemberPage, ReceiptPage, Room, RoomPage
from chatd.core import errors, server_frames
from chatd.storage import rooms as rooms_db
from chatd.storage.db import iso

room_json = server_frames.room_object


def assistant_settings(given: AssistantSettings | None, base: dict[str, Any] | None) -> dict[str, Any] | None:
    """``base`` (the kind's defaults, or the room's current settings) with what the body gives replacing it."""
    return base if given is None else (base or {}) | given.given()


class RoomsHandler(ApiHandler):
    @op(
        summary="Create a room (room_added to every member)",
        tag="rooms",
        body=RoomCreate,
        responses={201: ("Room", Room)},
    )
    async def post(self) -> None:
        principal = await self.auth()
        body = self.body(RoomCreate)
        members = [int(m) for m in body.members]
        assistant = assistant_settings(body.assistant, {"mode": "always"} if body.kind == "assistant" else None)
        room = await rooms_db.create_room(self.db, body.name.strip(), body.kind, principal.user_id, members, assistant)
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
        responses={200: ("Page of rooms", RoomPage)},
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
    @op(summary="A room of yours", tag="rooms", responses={200: ("Room", Room)})
    async def get(self, room_id: str) -> None:
        _, room = await self._room(room_id)
        self.send_json(room_json(room))

    @op(
        summary="Rename or reconfigure (owner/admin; room_updated to every member)",
        tag="rooms",
        body=RoomChange,
        responses={200: ("Room", Room)},
    )
    async def patch(self, room_id: str) -> None:
        principal, room = await self._room(room_id)
        self._manage(principal, room)
        body = self.body(RoomChange)
        changes: dict[str, Any] = {}
        if body.name is not UNSET:
            changes["name"] = body.name.strip()
        if body.assistant is not UNSET:
            changes["assistant"] = assistant_settings(body.assistant, room["assistant"] or {})
        updated = await rooms_db.update_room(self.db, room["id"], changes)
        await self.rooms.updated(updated)
        self.send_json(room_json(updated | {"read_seq": room["read_seq"]}))

    @op(
        summary="Archive (owner/admin; room_updated to every member)",
        tag="rooms",
        responses={200: ("Room", Room)},
    )
    async def delete(self, room_id: str) -> None:
        principal, room = await self._room(room_id)
        self._manage(principal, room)
        updated = await rooms_db.update_room(self.db, room["id"], {"status": "archived"})
        await self.rooms.updated(updated)
        self.send_json(room_json(updated | {"read_seq": room["read_seq"]}))


class MembersHandler(RoomAccess):
    @op(
        summary="Add a member (owner/admin): member_joined in the room, room_added to the new member",
        tag="rooms",
        body=MemberAdd,
        responses={201: ("Added", MemberAdded), 200: ("Already a member", MemberAdded)},
    )
    async def post(self, room_id: str) -> None:
        principal, room = await self._room(room_id)
        self._manage(principal, room)
        user_id = int(self.body(MemberAdd).user_id)
        added = await self.rooms.add_member(room, user_id, principal.user_id)
        self.send_json({"room_id": room["id"], "user_id": user_id, "added": added}, 201 if added else 200)

    @op(
        summary="The room's members with presence and read position (members only), by user id",
        tag="rooms",
        query=(
            Param("limit", {"type": "integer", "minimum": 1, "maximum": MAX_PAGE, "default": 100}),
            Param("cursor", {"type": "integer", "minimum": 1}, "next_cursor of the previous page"),
        ),
        responses={200: ("Page of members", MemberPage)},
    )
    async def get(self, room_id: str) -> None:
        principal, room = await self._room(room_id)
        limit = self.arg("limit")
        rows = await rooms_db.room_roster(self.db, room["id"], principal.user_id, self.arg("cursor") or 0, limit + 1)
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


class ReceiptsHandler(RoomAccess):
    @op(
        summary="Who read up to which message (members only), by user id: each member's shared read marker",
        tag="rooms",
        query=(
            Param("limit", {"type": "integer", "minimum": 1, "maximum": MAX_PAGE, "default": 100}),
            Param("cursor", {"type": "integer", "minimum": 1}, "next_cursor of the previous page"),
        ),
        responses={200: ("Page of receipts", ReceiptPage)},
    )
    async def get(self, room_id: str) -> None:
        principal, room = await self._room(room_id)
        limit = self.arg("limit")
        rows = await rooms_db.room_receipts(self.db, room["id"], principal.user_id, self.arg("cursor") or 0, limit + 1)
        items = rows[:limit]
        receipts = [{"user_id": r["user_id"], "read_seq": r["read_seq"]} for r in items]
        self.send_json({"receipts": receipts, "next_cursor": items[-1]["user_id"] if len(rows) > limit else None})


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
