"""Moderation: users report messages; admins, and room owners for their rooms, work the queue; admins
redact a user's messages in bulk and keep the content rules.  Every queue action, redaction and rule change
is written to the audit log.

The rules that decide who may do what live here; SQL is ``chatd.storage.moderation``; the compiled
content rules are ``chatd.services.content_rules``.
"""

from __future__ import annotations

import asyncio
from typing import Any

from chatd.core import content_rules, errors, server_frames
from chatd.process import metrics
from chatd.process.config import ModerationSettings
from chatd.realtime.fanout import Hub
from chatd.services.accounts import Accounts, Principal
from chatd.services.admin import Admin
from chatd.services.content_rules import ContentRules
from chatd.services.ratelimit import AuthLimiter
from chatd.services.rooms import Rooms
from chatd.storage import messages as messages_db
from chatd.storage import moderation as moderation_db
from chatd.storage import rooms as rooms_db
from chatd.storage import users as users_db
from chatd.storage.db import Database, Row
from chatd.storage.kv import KV

REPORT_ACTIONS = ("resolve", "dismiss", "delete", "ban")
REPORT_STATUSES = ("open", "resolved", "dismissed", "deleted", "banned")
_STATUS_OF = {"resolve": "resolved", "dismiss": "dismissed", "delete": "deleted", "ban": "banned"}


def report_json(row: Row) -> dict[str, Any]:
    out = {
        "id": row["id"],
        "message_id": row["message_id"],
        "room_id": row["room_id"],
        "sender_id": row["sender_id"],
        "reporter_id": row["reporter_id"],  # null: raised by a content rule with action flag
        "reason": row["reason"],
        "status": row["status"],
        "handled_by": row["handled_by"],
        "handled_at": server_frames.iso(row["handled_at"]),
        "created_at": server_frames.iso(row["created_at"]) or "",
    }
    if "message_seq" in row:  # the queue shows the message as it is now
        out["message"] = {
            "seq": row["message_seq"],
            "content": row["message_content"],
            "deleted": row["message_deleted_at"] is not None,
        }
    return out


def rule_json(row: Row) -> dict[str, Any]:
    return {
        "id": row["id"],
        "kind": row["kind"],
        "pattern": row["pattern"],
        "action": row["action"],
        "created_by": row["created_by"],
        "created_at": server_frames.iso(row["created_at"]) or "",
    }


class Moderation:
    def __init__(
        self,
        db: Database,
        kv: KV,
        hub: Hub,
        rooms: Rooms,
        accounts: Accounts,
        admin: Admin,
        rules: ContentRules,
        settings: ModerationSettings,
    ) -> None:
        self.db = db
        self.hub = hub
        self.rooms = rooms
        self.accounts = accounts
        self.admin = admin
        self.rules = rules
        self.settings = settings
        # Exact across workers and instances (one Redis script call per report: reports are rare).
        self.limiter = AuthLimiter(kv, "report", settings.reports_per_window, settings.reports_window_s)

    # -- reports -----------------------------------------------------------------------------

    async def report(self, user_id: int, room_id: int, message_id: int, reason: str) -> tuple[dict[str, Any], bool]:
        """``(report, created)``; the same user reporting the same message again gets the first report back."""
        reason = reason.strip()
        if not reason or len(reason) > self.settings.max_reason_chars:
            raise errors.BadRequest(f"reason must be 1 to {self.settings.max_reason_chars} characters")
        msg = await messages_db.message_by_id(self.db, message_id)
        if (
            msg is None
            or msg["room_id"] != room_id
            or await rooms_db.room_for_member(self.db, room_id, user_id) is None
        ):
            raise errors.NotFound("message not found")
        if msg["deleted_at"] is not None:
            raise errors.Conflict("message was deleted")
        if msg["sender_id"] == user_id:
            raise errors.BadRequest("you cannot report your own message")
        decision = await self.limiter.hit(str(user_id))
        if not decision.allowed:
            raise errors.RateLimited(
                f"at most {self.settings.reports_per_window} reports per {self.settings.reports_window_s:g} s",
                retry_after_ms=decision.retry_after_ms,
            )
        filed = await moderation_db.file_report(self.db, message_id, user_id, reason)
        if filed is None:
            raise errors.Conflict("message was deleted")
        if filed.created:
            metrics.reports_filed.labels("user").inc()
        return report_json(filed.report), filed.created

    async def queue(
        self, principal: Principal, status: str | None, room_id: int | None, cursor: int | None, limit: int
    ) -> dict[str, Any]:
        """Admins see every report; anyone else the reports in the rooms they own (none: an empty queue)."""
        owner = None if principal.is_admin else principal.user_id
        rows = await moderation_db.reports_page(self.db, status, owner, room_id, cursor, limit + 1)
        page = rows[:limit]
        return {"reports": [report_json(r) for r in page], "next_cursor": page[-1]["id"] if len(rows) > limit else None}

    async def act(self, principal: Principal, report_id: int, action: str, ip: str) -> dict[str, Any]:
        """Resolve or dismiss the report; delete the message; or ban its sender (an admin bans the account, a room
        owner removes the sender from the room).  Deleting or banning closes every open report of the message."""
        report = await moderation_db.report_by_id(self.db, report_id)
        if report is None or not (principal.is_admin or report["room_owner_id"] == principal.user_id):
            raise errors.NotFound("report not found")
        if report["status"] != "open":
            raise errors.Conflict(f"report already handled ({report['status']})")
        details: dict[str, Any] = {
            "report_id": report_id,
            "message_id": report["message_id"],
            "room_id": report["room_id"],
            "sender_id": report["sender_id"],
        }
        if action == "delete":
            row = await messages_db.delete_message(self.db, int(report["message_id"]), principal.user_id)
            if row is not None:  # None: deleted already (by its author, another moderator): nothing to announce
                await self.hub.publish_change(row["room_id"], int(row["edit_rev"]), server_frames.change_from_row(row))
        elif action == "ban":
            sender = report["sender_id"]
            if sender is None:
                raise errors.Conflict("the message has no user sender to ban")
            if sender == principal.user_id:
                raise errors.BadRequest("you cannot ban yourself")
            if principal.is_admin:
                await self.accounts.ban(int(sender))
                details["scope"] = "account"
            else:
                room = await rooms_db.room_by_id(self.db, int(report["room_id"]))
                assert room is not None
                try:
                    await self.rooms.remove_member(room, int(sender), principal.user_id)
                except errors.NotFound:
                    pass  # not a member any more: the ban is done
                details["scope"] = "room"
        settled = await moderation_db.settle(
            self.db, report_id, _STATUS_OF[action], principal.user_id, action in ("delete", "ban")
        )
        if not any(r["id"] == report_id for r in settled):
            raise errors.Conflict("report already handled")  # by another moderator, after the read above
        metrics.reports_settled.labels(action).inc()
        details["reports"] = [r["id"] for r in settled]
        await self.admin.audit(principal.user_id, f"report.{action}", f"report:{report_id}", details, ip, 200)
        fresh = await moderation_db.report_by_id(self.db, report_id)
        assert fresh is not None
        return report_json(fresh)

    # -- bulk redaction ----------------------------------------------------------------------

    async def redact(self, by: int, user_id: int, room_id: int | None) -> dict[str, Any]:
        """Tombstone every live message of the user (in one room, or everywhere), a batch per transaction.

        Each message takes its own revision of its room and goes out as ``message_deleted``, as a single
        delete does: sockets in the room see it live, and one that was away gets it from ``changes_after``
        (repair) or join's ``since_rev``.  The caller writes one audit row for the whole redaction.
        """
        if await users_db.user_by_id(self.db, user_id) is None:
            raise errors.NotFound("user not found")
        if room_id is not None:
            if await rooms_db.room_by_id(self.db, room_id) is None:
                raise errors.NotFound("room not found")
            room_ids = [room_id]
        else:
            room_ids = await moderation_db.rooms_with_messages_of(self.db, user_id)
        batch = self.settings.redact_batch
        total, touched = 0, []
        for rid in room_ids:
            after = 0
            in_room = 0
            while True:
                rows = await moderation_db.redact_batch(self.db, rid, user_id, after, batch, by)
                for row in rows:
                    await self.hub.publish_change(rid, int(row["edit_rev"]), server_frames.change_from_row(row))
                in_room += len(rows)
                if len(rows) < batch:
                    break
                after = int(rows[-1]["seq"])
                await asyncio.sleep(0)  # let this worker's sockets run between batches
            if in_room:
                touched.append(rid)
            total += in_room
        metrics.messages_redacted.inc(total)
        return {"user_id": user_id, "room_id": room_id, "messages": total, "rooms": touched}

    # -- content rules -----------------------------------------------------------------------

    async def list_rules(self) -> dict[str, Any]:
        version, rows = await moderation_db.rules(self.db)
        return {"version": version, "rules": [rule_json(r) for r in rows]}

    async def add_rule(self, by: int, kind: Any, pattern: Any, action: Any) -> dict[str, Any]:
        kind, pattern, action = content_rules.validate(kind, pattern, action)
        row = await moderation_db.add_rule(self.db, kind, pattern, action, by, self.settings.max_rules)
        await self.rules.changed(int(row["version"]))
        return rule_json(row) | {"version": row["version"]}

    async def delete_rule(self, rule_id: int) -> dict[str, Any]:
        version = await moderation_db.delete_rule(self.db, rule_id)
        if version is None:
            raise errors.NotFound("rule not found")
        await self.rules.changed(version)
        return {"id": rule_id, "version": version}
