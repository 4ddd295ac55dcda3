"""The content rules a worker applies to sends and edits: compiled once per version, refreshed on change.

``ContentRules.current`` is read synchronously on the send path (``Rooms.submit`` queues a message
without any round trip).  It changes when the list does: the admin route that changes it publishes a
``content_rules`` control message to every worker (``Hub.control``), whose handler reloads when the
version it names is newer; a poll of ``content_rules_version`` every ``moderation.rules_poll_s`` catches
a control message lost while Redis was away.  A flag match files a report once the message is durable.
"""

from __future__ import annotations

import asyncio
from typing import Any

from chatd.core import errors
from chatd.core.content_rules import EMPTY, Rule, RuleSet, Screened
from chatd.process import metrics
from chatd.process.logs import app_log, fields
from chatd.process.state import Tasks
from chatd.realtime.fanout import Hub
from chatd.storage import moderation as moderation_db
from chatd.storage.db import Database
from chatd.storage.messages import Committed

CONTROL_OP = "content_rules"


class ContentRules:
    def __init__(self, db: Database, hub: Hub, tasks: Tasks, poll_s: float) -> None:
        self.db = db
        self.hub = hub
        self.tasks = tasks
        self.poll_s = poll_s
        self.current: RuleSet = EMPTY
        self._reloading: asyncio.Lock = asyncio.Lock()
        hub.control_handlers[CONTROL_OP] = self._on_control

    async def run(self) -> None:
        """Load now, then check the version every ``poll_s`` (a supervised task of every worker)."""
        while True:
            try:
                if await moderation_db.rules_version(self.db) != self.current.version:
                    await self.reload()
            except errors.Unavailable:
                pass  # Postgres away: the rules compiled last stay in force
            await asyncio.sleep(self.poll_s)

    async def reload(self) -> RuleSet:
        async with self._reloading:
            version, rows = await moderation_db.rules(self.db)
            if version != self.current.version:
                rules = [Rule(int(r["id"]), r["kind"], r["pattern"], r["action"]) for r in rows]
                self.current = RuleSet.compile(version, rules)
                metrics.content_rules_version.set(version)
                app_log.info("content_rules_loaded", extra=fields(version=version, rules=len(rules)))
        return self.current

    def _on_control(self, head: dict[str, Any]) -> None:
        version = head.get("version")
        if isinstance(version, int) and version > self.current.version:
            self.tasks.spawn(self.reload(), "content-rules-reload")

    async def changed(self, version: int) -> None:
        """The list changed (this worker's admin route): apply here now, tell every other worker."""
        await self.reload()
        try:
            await self.hub.control(CONTROL_OP, version=version)
        except errors.Unavailable:
            pass  # the other workers see the new version at their next poll

    def screen(self, content: str) -> Screened:
        """Apply the rules (``errors.ContentBlocked`` for a block match).  The caller tests ``current.empty``
        first when it can: the hot path without rules is one attribute test."""
        try:
            screened = self.current.screen(content)
        except errors.ContentBlocked:
            metrics.content_rule_hits.labels("block").inc()
            raise
        if screened.masked:
            metrics.content_rule_hits.labels("mask").inc()
        if screened.flagged:
            metrics.content_rule_hits.labels("flag").inc()
        return screened

    def flag_when_durable(self, rule_ids: tuple[int, ...]) -> Any:
        """A done-callback for the commit's future: file the rule's report once the message has its id."""

        def done(fut: asyncio.Future[Committed]) -> None:
            if fut.cancelled() or fut.exception() is not None:
                return
            committed = fut.result()
            if committed.error is None and committed.row is not None and not committed.duplicate:
                self.tasks.spawn(self.flag(int(committed.row["id"]), rule_ids), "content-rules-flag")

        return done

    async def flag(self, message_id: int, rule_ids: tuple[int, ...]) -> None:
        reason = "content rule " + ", ".join(f"#{i}" for i in rule_ids) + " (flag)"
        try:
            filed = await moderation_db.file_report(self.db, message_id, None, reason)
        except errors.ChatdError as err:  # the message is stored; only its report is missing: say so loudly
            app_log.error("flag_report_failed", extra=fields(message_id=message_id, error=err.message))
            return
        if filed is not None and filed.created:
            metrics.reports_filed.labels("rule").inc()


__all__ = ["CONTROL_OP", "ContentRules"]
