"""The admin API's operations, and the audit log every admin call is written to.

Handlers (``api.Admin*Handler``) only parse and render; the rules are here.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from typing import Any

from chatd.core import errors, server_frames
from chatd.process.config import Settings
from chatd.process.logs import app_log, fields
from chatd.realtime.fanout import Hub
from chatd.services.accounts import Accounts, user_json
from chatd.services.rooms import Rooms
from chatd.storage import admin as admin_db
from chatd.storage import rooms as rooms_db
from chatd.storage.db import Database
from chatd.storage.kv import KV

MAX_RANGE_DAYS = 366
MAX_ANNOUNCEMENT_CHARS = 4000


def parse_day(raw: str | None, default: dt.datetime, name: str) -> dt.datetime:
    """``YYYY-MM-DD`` or an RFC 3339 time, as an aware UTC datetime."""
    if raw is None or raw == "":
        return default
    try:
        value = dt.datetime.fromisoformat(raw.replace("Z", "+00:00"))
    except ValueError:
        raise errors.BadRequest(f"{name} must be a date (YYYY-MM-DD) or an RFC 3339 time") from None
    if not 1970 <= value.year <= 9998:  # 0001-01-03 minus the default 7 days overflowed (500)
        raise errors.BadRequest(f"{name} must be between 1970 and 9998")
    return value if value.tzinfo is not None else value.replace(tzinfo=dt.UTC)


def announcement_text(value: Any) -> str:
    if not isinstance(value, str) or not value.strip() or len(value) > MAX_ANNOUNCEMENT_CHARS:
        raise errors.BadRequest(f"content must be a non-empty string of at most {MAX_ANNOUNCEMENT_CHARS} characters")
    return value.strip()


class Admin:
    def __init__(self, db: Database, kv: KV, hub: Hub, rooms: Rooms, accounts: Accounts, settings: Settings) -> None:
        self.db = db
        self.kv = kv
        self.hub = hub
        self.rooms = rooms
        self.accounts = accounts
        self.settings = settings

    async def audit(
        self, actor_id: int, action: str, target: str | None, details: dict[str, Any] | None, ip: str, status: int
    ) -> None:
        try:
            await admin_db.write_audit(self.db, actor_id, action, target, details, ip, status)
        except errors.ChatdError as err:  # logged loudly: an admin action without its audit row
            app_log.error("audit_write_failed", extra=fields(actor_id=actor_id, action=action, error=err.message))

    async def stats(self, start_raw: str | None, end_raw: str | None) -> dict[str, Any]:
        now = dt.datetime.now(dt.UTC)
        end = parse_day(end_raw, now, "to")
        start = parse_day(start_raw, end - dt.timedelta(days=7), "from")
        if start >= end or end - start > dt.timedelta(days=MAX_RANGE_DAYS):
            raise errors.BadRequest(f"from must be before to, at most {MAX_RANGE_DAYS} days apart")
        row = await admin_db.admin_stats(self.db, start, end)
        try:
            live: dict[str, int] | None = await self.kv.live_connections()
        except errors.Unavailable:
            live = None
        return {
            "from": server_frames.iso(start),
            "to": server_frames.iso(end),
            "users": {"total": row["users"], "active_accounts": row["users_active_accounts"]},
            "active_users": row["active_users"],
            "rooms": {"total": row["rooms"], "active": row["rooms_active"]},
            "messages_per_day": row["messages_per_day"],
            "live_connections": None
            if live is None
            else {
                "total": sum(live.values()),
                "per_worker": [{"worker": k, "sockets": v} for k, v in sorted(live.items())],
            },
            "assistant": {
                "answers": row["assistant_answers"],
                "first_token_ms_p50": row["first_token_p50_ms"],
                "first_token_ms_p95": row["first_token_p95_ms"],
                "tokens_by_model": row["tokens_by_model"],
                "tokens_by_user": row["tokens_by_user"],
                "tokens_by_room": row["tokens_by_room"],
                "tokens_per_day": row["tokens_per_day"],
            },
        }

    async def users(self, query: str | None, status: str | None, cursor: int | None, limit: int) -> dict[str, Any]:
        rows = await admin_db.admin_users(self.db, query, status, cursor, limit + 1)
        page = rows[:limit]
        return {"users": [user_json(r) for r in page], "next_cursor": page[-1]["id"] if len(rows) > limit else None}

    async def unban(self, user_id: int) -> dict[str, Any]:
        row = await admin_db.unban_user(self.db, user_id)
        if row is None:
            raise errors.NotFound("user not found")
        return user_json(row)

    async def set_role(self, user_id: int, role: Any) -> dict[str, Any]:
        if role not in ("user", "admin"):
            raise errors.BadRequest("role must be user or admin")
        row = await admin_db.set_user_role(self.db, user_id, role)
        if row is None:
            raise errors.NotFound("user not found")
        return user_json(row)

    async def room_messages(self, room_id: int, before_seq: int | None, limit: int) -> dict[str, Any]:
        if await rooms_db.room_by_id(self.db, room_id) is None:
            raise errors.NotFound("room not found")
        rows = await admin_db.admin_room_messages(self.db, room_id, before_seq, limit + 1)
        page = rows[:limit]
        out = []
        for r in page:
            frame = server_frames.message_from_row(r)
            frame.pop("type", None)
            out.append(
                {"message": frame, "deleted_at": server_frames.iso(r["deleted_at"]), "deleted_by": r["deleted_by"]}
            )
        return {"messages": out, "next_cursor": page[-1]["seq"] if len(rows) > limit else None}

    async def audit_page(self, cursor: int | None, limit: int) -> dict[str, Any]:
        rows = await admin_db.audit_page(self.db, cursor, limit + 1)
        page = rows[:limit]
        entries = [r | {"created_at": server_frames.iso(r["created_at"])} for r in page]
        return {"entries": entries, "next_cursor": page[-1]["id"] if len(rows) > limit else None}

    async def announce(self, admin_id: int, room_id: int, content: Any) -> dict[str, Any]:
        if await rooms_db.room_by_id(self.db, room_id) is None:
            raise errors.NotFound("room not found")
        row = await self.rooms.system_message(
            room_id, announcement_text(content), {"event": "announcement", "by": admin_id}
        )
        frame = server_frames.message_from_row(row)
        frame.pop("type", None)
        return frame

    async def broadcast(self, admin_id: int, target: Any, content: Any) -> dict[str, Any]:
        """``rooms``: a system message in every active room; ``users``: an ``announcement`` frame to every socket."""
        text = announcement_text(content)
        if target == "rooms":
            room_ids = await admin_db.active_room_ids(self.db)
            data = {"event": "announcement", "by": admin_id}
            for i in range(0, len(room_ids), 200):  # batches the group commit takes whole, below its queue bound
                await asyncio.gather(*(self.rooms.system_message(r, text, data) for r in room_ids[i : i + 200]))
            return {"target": "rooms", "count": len(room_ids)}
        if target == "users":
            users = await admin_db.active_user_ids(self.db)
            frame = server_frames.announcement(
                content=text, created_at=server_frames.iso(dt.datetime.now(dt.UTC)) or "", by=admin_id
            )
            for i in range(0, len(users), 500):
                await self.hub.publish_users(users[i : i + 500], frame)
            return {"target": "users", "count": len(users)}
        raise errors.BadRequest("target must be rooms or users")

    async def usage(self, user_id: int) -> dict[str, Any]:
        days = await admin_db.usage_of(self.db, user_id, 30)
        today = dt.datetime.now(dt.UTC).date().isoformat()
        used = next((int(d["input_tokens"]) + int(d["output_tokens"]) for d in days if d["day"] == today), 0)
        budget = self.settings.assistant.daily_token_budget
        return {
            "daily_token_budget": budget,
            "tokens_today": used,
            "remaining_today": max(0, budget - used) if budget else None,
            "days": [
                {
                    "day": d["day"],
                    "answers": int(d["answers"]),
                    "input_tokens": int(d["input_tokens"]),
                    "output_tokens": int(d["output_tokens"]),
                }
                for d in days
            ],
        }
