"""The server's assistants (``/assistants``; admins: ``/admin/assistants``, audited) and a room's picks of
them (``/rooms/{id}/assistants``: members read, the owner or an admin picks and drops)."""

from __future__ import annotations

from typing import Any

from chatd.api.admin import AdminHandler
from chatd.api.base import ApiHandler, RoomAccess
from chatd.api.bodies import AssistantChange, AssistantCreate, RoomAssistantPick
from chatd.api.openapi import Param, op
from chatd.api.responses import (
    AssistantDefinition,
    AssistantDefinitionList,
    AssistantList,
    AssistantUsage,
    RoomAssistantList,
)
from chatd.core import errors
from chatd.process.config import AssistantSettings
from chatd.storage import assistants as assistants_db
from chatd.storage.db import iso

_OFFERED = ("id", "name", "provider", "model", "mode")


def offered_json(row: dict[str, Any]) -> dict[str, Any]:
    """What every user may see of an assistant: not its system prompt."""
    return {k: row[k] for k in _OFFERED}


def definition_json(row: dict[str, Any]) -> dict[str, Any]:
    return offered_json(row) | {
        "system_prompt": row["system_prompt"],
        "status": row["status"],
        "created_at": iso(row["created_at"]),
        "updated_at": iso(row["updated_at"]),
    }


def check_provider(settings: AssistantSettings, provider: str) -> None:
    """An assistant may only use a provider this server can reach: its answers would all fail otherwise.

    409, not 400: the body is valid, the server's configuration is what it conflicts with."""
    if provider == "anthropic" and not settings.anthropic_api_key:
        raise errors.Conflict("provider anthropic is not configured on this server (assistant.anthropic_api_key)")
    if provider == "openai" and not settings.openai_base_url:
        raise errors.Conflict("provider openai is not configured on this server (assistant.openai_base_url)")


class AssistantsHandler(ApiHandler):
    @op(
        summary="The assistants this server offers (active ones), for room owners to pick from",
        tag="assistants",
        responses={200: ("Assistants", AssistantList)},
    )
    async def get(self) -> None:
        await self.auth()
        rows = await assistants_db.list_assistants(self.db, active_only=True)
        self.send_json({"assistants": [offered_json(r) for r in rows]})


class AdminAssistantsHandler(AdminHandler):
    @op(
        summary="Every assistant defined on this server, retired ones too",
        tag="admin",
        responses={200: ("Assistants", AssistantDefinitionList)},
    )
    async def get(self) -> None:
        await self.admin_auth()
        rows = await assistants_db.list_assistants(self.db, active_only=False)
        self.send_json({"assistants": [definition_json(r) for r in rows]})

    @op(
        summary="Define an assistant (name, provider, model, system prompt, default mode)",
        tag="admin",
        body=AssistantCreate,
        responses={201: ("The assistant", AssistantDefinition)},
    )
    async def post(self) -> None:
        await self.admin_auth()
        body = self.body(AssistantCreate)
        self.audit_target = f"assistant:{body.name}"
        self.audit_details = {"provider": body.provider, "model": body.model, "mode": body.mode}
        check_provider(self.config.assistant, body.provider)
        fields = {
            "name": body.name,
            "provider": body.provider,
            "model": body.model.strip(),
            "system_prompt": body.system_prompt,
            "mode": body.mode,
        }
        row = await assistants_db.create_assistant(self.db, fields)
        self.send_json(definition_json(row), 201)


class AdminAssistantHandler(AdminHandler):
    @op(
        summary="Change an assistant; status retired: it stops answering everywhere (its answers stay)",
        tag="admin",
        body=AssistantChange,
        responses={200: ("The assistant", AssistantDefinition)},
    )
    async def patch(self, assistant_id: str) -> None:
        await self.admin_auth()
        target = self.path_id(assistant_id, "assistant")
        self.audit_target = f"assistant:{target}"
        changes = self.body(AssistantChange).given()
        self.audit_details = {k: v for k, v in changes.items() if k != "system_prompt"}
        if "provider" in changes:
            check_provider(self.config.assistant, changes["provider"])
        if "model" in changes:
            changes["model"] = changes["model"].strip()
        row = await assistants_db.update_assistant(self.db, target, changes)
        if row is None:
            raise errors.NotFound("assistant not found")
        self.send_json(definition_json(row))


class AdminAssistantUsageHandler(AdminHandler):
    @op(
        summary="Answers and tokens per UTC day, assistant, model and user (at most 1000 rows, newest first)",
        tag="admin",
        query=(Param("days", {"type": "integer", "minimum": 1, "maximum": 366, "default": 7}),),
        responses={200: ("Usage", AssistantUsage)},
    )
    async def get(self) -> None:
        await self.admin_auth()
        rows = await assistants_db.usage_by_assistant(self.db, self.arg("days"))
        self.send_json({"usage": rows})


class RoomAssistantsHandler(RoomAccess):
    @op(
        summary="The room's assistants (members); none: the server's default assistant by the room's settings",
        tag="rooms",
        responses={200: ("Assistants", RoomAssistantList)},
    )
    async def get(self, room_id: str) -> None:
        _, room = await self._room(room_id)
        rows = await assistants_db.room_assistants(self.db, room["id"])
        self.send_json(
            {"assistants": [offered_json(r) | {"mode": r["room_mode"], "added_by": r["added_by"]} for r in rows]}
        )


class RoomAssistantHandler(RoomAccess):
    @op(
        summary="Pick one of the server's assistants for the room, or change its mode (owner/admin)",
        tag="rooms",
        body=RoomAssistantPick,
        body_required=False,
        responses={201: ("Added", RoomAssistantList), 200: ("Mode changed", RoomAssistantList)},
    )
    async def put(self, room_id: str, assistant_id: str) -> None:
        principal, room = await self._room(room_id)
        self._manage(principal, room)
        target = self.path_id(assistant_id, "assistant")
        mode = self.body(RoomAssistantPick).mode
        added = await assistants_db.pick_assistant(
            self.db, room["id"], target, mode, principal.user_id, self.config.assistant.max_per_room
        )
        rows = await assistants_db.room_assistants(self.db, room["id"])
        self.send_json(
            {"assistants": [offered_json(r) | {"mode": r["room_mode"], "added_by": r["added_by"]} for r in rows]},
            201 if added else 200,
        )

    @op(
        summary="Drop an assistant from the room (owner/admin)",
        tag="rooms",
        responses={204: ("Dropped", None)},
    )
    async def delete(self, room_id: str, assistant_id: str) -> None:
        principal, room = await self._room(room_id)
        self._manage(principal, room)
        if not await assistants_db.drop_assistant(self.db, room["id"], self.path_id(assistant_id, "assistant")):
            raise errors.NotFound("the room has no such assistant")
        self.set_status(204)
        self.finish()
