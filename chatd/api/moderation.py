"""Moderation routes: a member reports a message; admins and room owners work the report queue; admins
redact a user's messages in bulk and keep the content rules (``/admin/*``: audited like every admin call)."""

from __future__ import annotations

from typing import Any

from msgspec import UNSET

from chatd.api.admin import AdminHandler
from chatd.api.base import LIMIT, ApiHandler
from chatd.api.bodies import ContentRuleCreate, Redact, ReportAction, ReportFile
from chatd.api.openapi import Param, op
from chatd.api.responses import ContentRule, ContentRuleDeleted, ContentRules, Redacted, Report, ReportPage
from chatd.services.moderation import REPORT_STATUSES, Moderation


class ReportHandler(ApiHandler):
    """``/rooms/{id}/messages/{message_id}/reports``: a member reports a message (not their own)."""

    def initialize(self, moderation: Moderation, **deps: Any) -> None:  # type: ignore[override]
        super().initialize(**deps)
        self.moderation = moderation

    @op(
        summary="Report a message to the room's owner and the admins (once per user and message)",
        tag="moderation",
        body=ReportFile,
        responses={201: ("Filed", Report), 200: ("You had reported it already: that report", Report)},
        description="Errors: 400 `bad_request` (blank reason, over moderation.max_reason_chars, your own message),"
        " 404 `not_found` (no such message in a room you are in), 409 `conflict` (message deleted), 429"
        " `rate_limited` (over moderation.reports_per_window per moderation.reports_window_s).",
    )
    async def post(self, room_id: str, message_id: str) -> None:
        principal = await self.auth()
        room, message = self.path_id(room_id, "room"), self.path_id(message_id, "message")
        reason = self.body(ReportFile).reason
        report, created = await self.moderation.report(principal.user_id, room, message, reason)
        self.send_json(report, 201 if created else 200)


class ModerationHandler(ApiHandler):
    def initialize(self, moderation: Moderation, **deps: Any) -> None:  # type: ignore[override]
        super().initialize(**deps)
        self.moderation = moderation


class ReportQueueHandler(ModerationHandler):
    @op(
        summary="The report queue, newest first: every report for admins, the reports of your rooms for owners",
        tag="moderation",
        query=(
            Param("status", {"type": "string", "enum": list(REPORT_STATUSES)}),
            Param("room_id", {"type": "integer", "minimum": 1}),
            LIMIT,
            Param("cursor", {"type": "integer", "minimum": 1}),
        ),
        responses={200: ("Page of reports", ReportPage)},
    )
    async def get(self) -> None:
        principal = await self.auth()
        self.send_json(
            await self.moderation.queue(
                principal, self.arg("status"), self.arg("room_id"), self.arg("cursor"), self.arg("limit")
            )
        )


class ReportActionHandler(ModerationHandler):
    @op(
        summary="Act on an open report: resolve, dismiss, delete the message, or ban its sender (audited)",
        tag="moderation",
        body=ReportAction,
        responses={200: ("The report, closed", Report)},
        description="An admin's ban bans the account (sessions revoked, sockets closed); a room owner's removes"
        " the sender from the room. delete and ban close every open report of the message. Errors: 404"
        " `not_found` (no such report, or not one of your rooms), 409 `conflict` (already handled; the message"
        " has no user sender), 400 `bad_request` (banning yourself).",
    )
    async def post(self, report_id: str) -> None:
        principal = await self.auth()
        target = self.path_id(report_id, "report")
        action = self.body(ReportAction).action
        self.send_json(await self.moderation.act(principal, target, action, self.request.remote_ip or ""))


class RedactHandler(AdminHandler):
    def initialize(self, moderation: Moderation, **deps: Any) -> None:  # type: ignore[override]
        super().initialize(**deps)
        self.moderation = moderation

    @op(
        summary="Redact a user's messages: tombstone all of them in one room (room_id) or everywhere",
        tag="admin",
        body=Redact,
        body_required=False,
        responses={200: ("Done", Redacted)},
        description="One audit row for the whole redaction. Batches of moderation.redact_batch messages, one"
        " transaction each; every message takes its room's next edit revision and goes out as message_deleted"
        " (repaired and resumed like any delete). Answers once every batch is done.",
    )
    async def post(self, user_id: str) -> None:
        principal = await self.admin_auth()
        target = self.path_id(user_id, "user")
        body = self.body(Redact)
        room_id = None if body.room_id is UNSET else int(body.room_id)
        self.audit_target = f"user:{target}"
        self.audit_details = {"room_id": room_id}
        done = await self.moderation.redact(principal.user_id, target, room_id)
        self.audit_details = {"room_id": room_id, "messages": done["messages"], "rooms": done["rooms"]}
        self.send_json(done)


class ContentRulesHandler(AdminHandler):
    def initialize(self, moderation: Moderation, **deps: Any) -> None:  # type: ignore[override]
        super().initialize(**deps)
        self.moderation = moderation

    @op(summary="The content rules and their version", tag="admin", responses={200: ("Rules", ContentRules)})
    async def get(self) -> None:
        await self.admin_auth()
        self.send_json(await self.moderation.list_rules())

    @op(
        summary="Add a content rule (applies to every send and edit on every worker within moments)",
        tag="admin",
        body=ContentRuleCreate,
        responses={201: ("The rule, with the list's new version", ContentRule)},
        description="kind word: literal, case-insensitive, whole word at an ASCII word-character end; kind regex:"
        " RE2 syntax (no backreferences or lookaround), case-insensitive. Errors: 400 `bad_request` (not a valid"
        " RE2 regex, over 200 characters, matches the empty string), 409 `conflict` (moderation.max_rules).",
    )
    async def post(self) -> None:
        principal = await self.admin_auth()
        body = self.body(ContentRuleCreate)
        self.audit_details = {"kind": body.kind, "pattern": body.pattern, "action": body.action}
        rule = await self.moderation.add_rule(principal.user_id, body.kind, body.pattern, body.action)
        self.audit_target = f"content_rule:{rule['id']}"
        self.send_json(rule, 201)


class ContentRuleHandler(AdminHandler):
    def initialize(self, moderation: Moderation, **deps: Any) -> None:  # type: ignore[override]
        super().initialize(**deps)
        self.moderation = moderation

    @op(summary="Remove a content rule", tag="admin", responses={200: ("Removed", ContentRuleDeleted)})
    async def delete(self, rule_id: str) -> None:
        await self.admin_auth()
        target = self.path_id(rule_id, "rule")
        self.audit_target = f"content_rule:{target}"
        self.send_json(await self.moderation.delete_rule(target))
