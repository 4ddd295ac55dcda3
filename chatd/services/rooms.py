"""Room operations shared by the socket and REST handlers: send, join/leave, typing, read, edit, delete, react.

Thin: the rules live here, the mechanisms in their own modules (group commit
``writer``, delivery ``fanout``, presence ``presence``, SQL ``chatd.storage``).
"""

from __future__ import annotations

import asyncio
import dataclasses
from dataclasses import dataclass
from typing import Any, Protocol

from chatd.assistant.context import mentions_assistant
from chatd.core import client_frames, errors, server_frames, wsframe
from chatd.core.presence_view import UNKNOWN
from chatd.process import metrics
from chatd.process.config import WebSocketSettings
from chatd.realtime.batching import Batched
from chatd.realtime.fanout import Conn, Event, Hub
from chatd.realtime.presence import Presence
from chatd.realtime.receipts import Receipts
from chatd.realtime.writer import MessageWriter
from chatd.services.content_rules import ContentRules
from chatd.services.ratelimit import SendLimiter
from chatd.storage import messages as messages_db
from chatd.storage import rooms as rooms_db
from chatd.storage import users as users_db
from chatd.storage.db import Database
from chatd.storage.kv import KV
from chatd.storage.messages import Committed, PendingMessage

ROOM_KINDS = ("group", "assistant")
ASSISTANT_MODES = ("always", "mention")


class AssistantPort(Protocol):
    """What rooms need of the assistant (``chatd.assistant.answers.Assistant``)."""

    def answers_in(self, room: dict[str, Any]) -> bool: ...

    async def enqueue(
        self,
        room_id: int,
        prompt_id: int,
        requester_id: int,
        supersede_id: int | None = None,
        assistant_id: int = 0,
    ) -> int: ...

    async def settle(self, prompt_id: int, assistant_id: int | None = None) -> None: ...

    async def live_streams(self, room_id: int) -> list[tuple[int, int, list[dict[str, Any]]]]: ...

    async def attach(self, room_id: int, prompt_id: int) -> tuple[list[dict[str, Any]], int] | None: ...

    async def control(
        self, user_id: int, is_admin: bool, frame: client_frames.Cancel | client_frames.Regenerate
    ) -> None: ...


@dataclass(frozen=True, slots=True)
class SendResult:
    committed: Committed
    queued_position: int | None = None  # an assistant answer was queued
    assistant_error: errors.ChatdError | None = None  # busy / quota_exceeded: no answer comes
    answer_pending: bool = False  # owed but not queued yet (queue unreachable): the sweeper queues it

    @property
    def row(self) -> dict[str, Any]:
        assert self.committed.row is not None
        return self.committed.row

    @property
    def duplicate(self) -> bool:
        return self.committed.duplicate


@dataclass(frozen=True, slots=True)
class JoinResult:
    joined: dict[str, Any]  # the `joined` frame, written first
    resync: dict[str, Any] | None  # `resync_required` when the replay would be too long
    history: list[tuple[int, Event]]  # replayed messages, merged with held live frames by hub.finish_join
    baseline_seq: int  # the socket is considered to have every seq up to this one
    catch_up: list[tuple[int, int, list[bytes]]]  # running answers: (message id, chunk index, frames)
    changes: list[dict[str, Any]] = dataclasses.field(default_factory=list)  # since_rev: changes missed, oldest first


class Rooms:
    def __init__(
        self,
        db: Database,
        kv: KV,
        hub: Hub,
        writer: MessageWriter,
        presence: Presence,
        limiter: SendLimiter,
        settings: WebSocketSettings,
    ) -> None:
        self.db = db
        self.kv = kv
        self.hub = hub
        self.writer = writer
        self.presence = presence
        self.limiter = limiter
        self.settings = settings
        self.assistant: AssistantPort | None = None  # set when the assistant runs
        self.content_rules: ContentRules | None = None  # the admin's rules, applied before anything is stored
        self.receipts = Receipts(hub, settings.receipts_interval_s)
        # Membership, last_seq and replay of concurrent joins (a reconnect storm) in one round of queries.
        self.join_reads: Batched[tuple[int, int, int | None], messages_db.JoinRead] = Batched(
            lambda joins: messages_db.join_reads(db, joins, settings.replay_limit)
        )

    async def member_room(self, room_id: int, user_id: int) -> dict[str, Any]:
        room = await rooms_db.room_for_member(self.db, room_id, user_id)
        if room is None:
            raise errors.NotFound("room not found")
        return room

    # -- send -------------------------------------------------------------------

    def submit(self, user_id: int, room_id: int, content: str, client_msg_id: str | None) -> asyncio.Future[Committed]:
        """Check the limits and queue the message; the future resolves when it is durable.

        Synchronous: no round trip before the message is queued, so a socket's
        sends are queued in the order its frames arrived.
        """
        if len(content) > self.settings.max_message_chars:
            raise errors.TooLarge(f"content over {self.settings.max_message_chars} characters")
        decision = self.limiter.hit(user_id)
        if not decision.allowed:
            raise errors.RateLimited(
                f"at most {self.settings.send_rate_count} messages per {self.settings.send_rate_window_s:g} s",
                retry_after_ms=decision.retry_after_ms,
            )
        flagged: tuple[int, ...] = ()
        rules = self.content_rules
        if rules is not None and not rules.current.empty:  # without rules: this test is all it costs
            # Before the message is queued: a block stores nothing and uses no seq; a masked message is stored
            # (and later read by the assistant) masked.  A blocked attempt still counted against the quota.
            screened = rules.screen(content)
            content, flagged = screened.content, screened.flagged
        message = PendingMessage(
            room_id, user_id, "user", "text", content, client_msg_id, mentions_assistant=mentions_assistant(content)
        )
        durable = self.writer.submit(message)
        if flagged and rules is not None:
            durable.add_done_callback(rules.flag_when_durable(flagged))
        return durable

    async def send(self, user_id: int, room_id: int, content: str, client_msg_id: str | None) -> SendResult:
        """Submit, wait until durable, then queue the assistant's answer if the room wants one."""
        result = await self.submit(user_id, room_id, content, client_msg_id)
        return await self.after_commit(user_id, room_id, result)

    def wants_answer(self, committed: Committed) -> bool:
        """The commit recorded an owed answer (decided in its transaction): enqueue it.

        Also true for a duplicate whose answer is still owed: a client's retry re-enqueues
        (the queue refuses a second job for the same prompt).
        """
        return self.assistant is not None and committed.error is None and committed.answer_owed

    async def after_commit(self, user_id: int, room_id: int, result: Committed) -> SendResult:
        if result.error is not None:
            raise result.error
        queued: int | None = None
        refused: errors.ChatdError | None = None
        pending = False
        if self.assistant is not None and self.wants_answer(result):
            assert result.row is not None
            prompt_id = int(result.row["id"])
            # One answer per assistant that owes one (several in a room that picked assistants, sql/0016):
            # the send reports the first one queued, or the refusal when none was.
            for assistant_id in result.owed_by or (0,):
                try:
                    position = await self.assistant.enqueue(room_id, prompt_id, user_id, assistant_id=assistant_id)
                    queued = position if queued is None else min(queued, position)
                except errors.Unavailable:
                    pending = True  # still owed (answers_owed): the sweeper queues it once Redis/Postgres answer
                except errors.ChatdError as err:
                    refused = refused or err  # the message is stored and acked; only this answer is refused
                    await self.assistant.settle(prompt_id, assistant_id)
            if queued is not None or pending:
                refused = None
        return SendResult(result, queued, refused, pending)

    # -- join / leave -------------------------------------------------------------

    async def join(
        self,
        conn: Conn,
        room_id: int,
        since_seq: int | None,
        request_id: Any,
        rejoin: bool = False,
        epoch: str | None = None,
        since_rev: int | None = None,
    ) -> JoinResult:
        await self.hub.join_room(conn, room_id)
        try:
            # Subscribed (confirmed) before this read: nothing falls between history and live.
            read = await self.join_reads((room_id, conn.user_id, since_seq))
            if read.room is None:
                raise errors.NotFound("room not found")
            room = read.room
            last_seq = int(room["last_seq"])
            self.hub.set_epoch(room_id, read.epoch, last_seq)
            resync = None
            baseline_seq = last_seq
            replay = read.history
            # since_seq from another history of the room (a restore, a failover that lost commits): its
            # seqs mean other messages here, so nothing is replayed and the client refetches.
            foreign = since_seq is not None and ((epoch is not None and epoch != read.epoch) or since_seq > last_seq)
            if read.resync or foreign:
                metrics.resyncs.labels("epoch" if foreign else "replay_limit").inc()
                resync = server_frames.resync_required(
                    room_id=room_id, last_seq=last_seq, epoch=read.epoch, reply_to=request_id
                )
                replay = []
            elif since_seq is not None and since_seq < last_seq:
                baseline_seq = since_seq
            changes: list[dict[str, Any]] = []
            if since_rev is not None and resync is None and since_rev < read.edit_rev:
                # Edits, deletes and reactions since the client's last join, of the messages it holds (the replay
                # carries the newer ones as they are now).  More than a replay's worth: it refetches instead.
                limit = self.settings.replay_limit
                rows = await messages_db.changes_after(self.db, [(room_id, since_rev)], limit + 1)
                if len(rows) > limit:
                    metrics.resyncs.labels("replay_limit").inc()
                    resync = server_frames.resync_required(
                        room_id=room_id, last_seq=last_seq, epoch=read.epoch, reply_to=request_id
                    )
                    replay, baseline_seq = [], last_seq
                else:
                    changes = [server_frames.change_from_row(r) for r in rows if r["seq"] <= baseline_seq]
            history: list[tuple[int, Event]] = []
            for r in replay:
                frame = wsframe.ws_text_frame(server_frames.encode_bytes(server_frames.message_from_row(r)))
                history.append((int(r["seq"]), Event(frame, int(r["seq"]))))
            catch_up: list[tuple[int, int, list[bytes]]] = []
            if self.assistant is not None and self.assistant.answers_in(room):
                for message_id, index, frames in await self.assistant.live_streams(room_id):
                    encoded = [wsframe.ws_text_frame(server_frames.encode_bytes(f)) for f in frames]
                    catch_up.append((message_id, index, encoded))
        except BaseException:
            await self.hub.leave_room(conn, room_id)
            raise
        if not rejoin:
            self.presence.joined(room_id, conn.user_id)
        online = sorted(self.hub.online(room_id) | {conn.user_id})
        joined = server_frames.joined(
            room_id=room_id,
            last_seq=last_seq,
            epoch=read.epoch,
            online=online,
            reply_to=request_id,
            edit_rev=read.edit_rev,
        )
        return JoinResult(joined, resync, history, baseline_seq, catch_up, changes)

    async def leave(self, conn: Conn, room_id: int, *, detached: bool = False) -> None:
        """``detached``: the socket was in the room and ``Hub.detach`` already took it out of the delivery."""
        if detached or self.hub.delivered_seq(conn, room_id) is not None or room_id in self.hub.rooms:
            await self.hub.leave_room(conn, room_id)
            self.presence.left(room_id, conn.user_id)

    async def kick(self, room_id: int, user_id: int) -> None:
        """A removed member's sockets leave the room on every worker and instance."""
        await self.hub.kick(user_id, room_id)

    # -- membership and room events (to every device of the users concerned) ---------------

    async def system_message(self, room_id: int, content: str, data: dict[str, Any]) -> dict[str, Any]:
        """A durable ``kind: system`` message: through the group commit like any other (seq, repair, resume)."""
        result = await self.writer.submit(PendingMessage(room_id, None, "system", "system", content, None, data=data))
        if result.error is not None:
            raise result.error
        assert result.row is not None
        return result.row

    async def online_now(self, room_id: int) -> set[int]:
        """Who is online in the room, as announced (Redis presence; this worker's view while Redis is down)."""
        try:
            _, online = (await self.kv.presence_views([(room_id, UNKNOWN)]))[room_id]
        except errors.Unavailable:
            return self.hub.online(room_id)
        return set(online)

    async def created(self, room: dict[str, Any], member_ids: list[int]) -> None:
        frame = server_frames.room_added(room=server_frames.room_object(room | {"read_seq": 0}))
        await self.hub.publish_users(member_ids, frame)

    async def add_member(self, room: dict[str, Any], user_id: int, by: int) -> bool:
        """Add, say so in the room (``member_joined``), then tell the new member's devices (``room_added``)."""
        if not await rooms_db.add_member(self.db, room["id"], user_id):
            return False
        name = (await users_db.user_names(self.db, [user_id])).get(user_id, "")
        row = await self.system_message(
            room["id"], f"{name} joined", {"event": "member_joined", "user_id": user_id, "name": name, "by": by}
        )
        read = await rooms_db.set_read(self.db, room["id"], user_id, int(row["seq"]))  # "X joined" is not news to X
        if read is not None:
            self.receipts.add(room["id"], user_id, read.shared_seq)
        fresh = await rooms_db.room_for_member(self.db, room["id"], user_id)
        if fresh is not None:
            await self.hub.publish_users([user_id], server_frames.room_added(room=server_frames.room_object(fresh)))
        return True

    async def remove_member(self, room: dict[str, Any], user_id: int, by: int) -> None:
        """Remove (its sockets leave the room, ``room_removed`` to its devices), then ``member_left`` in the room."""
        if not await rooms_db.remove_member(self.db, room["id"], user_id):
            raise errors.NotFound("member not found")
        await self.kick(room["id"], user_id)
        reason = "left" if by == user_id else "removed"
        await self.hub.publish_users([user_id], server_frames.room_removed(room_id=room["id"], reason=reason))
        name = (await users_db.user_names(self.db, [user_id])).get(user_id, "")
        await self.system_message(
            room["id"], f"{name} left", {"event": "member_left", "user_id": user_id, "name": name, "by": by}
        )

    async def updated(self, room: dict[str, Any]) -> None:
        """Renamed, reconfigured or archived: ``room_updated`` to every member's devices."""
        members = await rooms_db.room_member_ids(self.db, room["id"])
        await self.hub.publish_users(members, server_frames.room_updated(room=server_frames.room_object(room)))

    # -- typing, read, edit, delete -------------------------------------------------

    async def typing(self, conn: Conn, room_id: int, is_typing: bool) -> None:
        if self.hub.delivered_seq(conn, room_id) is None:  # not live in the room on this worker
            await self.member_room(room_id, conn.user_id)
        if is_typing:
            try:
                relay = await self.kv.typing_relay(room_id, conn.user_id, self.settings.typing_interval_s)
            except errors.Unavailable:
                relay = True  # without Redis, typing is relayed unthrottled rather than not at all
            if not relay:
                return  # throttled: at most one per user per room per interval
        frame = server_frames.typing(room_id=room_id, user_id=conn.user_id, is_typing=is_typing)
        await self.hub.publish_room(room_id, frame, exclude=conn.connection_id)

    async def read(self, conn: Conn, room_id: int, seq: int, private: bool = False) -> int:
        """Move the read marker: ``read`` (with the mention count) to the user's other devices, and unless
        private, the receipt to the room in the next batched ``receipts`` frame."""
        stored = await rooms_db.set_read(self.db, room_id, conn.user_id, seq, private)
        if stored is None:
            raise errors.NotFound("room not found")
        frame = server_frames.read(
            room_id=room_id, user_id=conn.user_id, seq=stored.read_seq, mention_count=stored.mention_count
        )
        await self.hub.publish_user(conn.user_id, frame, exclude=conn.connection_id)
        if not private:
            self.receipts.add(room_id, conn.user_id, stored.shared_seq)
        return stored.read_seq

    async def _own_message(self, user_id: int, is_admin: bool, message_id: int) -> dict[str, Any]:
        msg = await messages_db.message_by_id(self.db, message_id)
        if msg is None or await rooms_db.room_for_member(self.db, msg["room_id"], user_id) is None:
            raise errors.NotFound("message not found")
        if msg["sender_id"] != user_id and not is_admin:
            raise errors.Forbidden("only the author or an admin may change a message")
        if msg["deleted_at"] is not None:
            raise errors.Conflict("message was deleted")
        return msg

    async def edit(self, user_id: int, is_admin: bool, message_id: int, content: str) -> dict[str, Any]:
        if len(content) > self.settings.max_message_chars:
            raise errors.TooLarge(f"content over {self.settings.max_message_chars} characters")
        await self._own_message(user_id, is_admin, message_id)
        flagged: tuple[int, ...] = ()
        rules = self.content_rules
        if rules is not None and not rules.current.empty:  # an edit follows the send's rules
            screened = rules.screen(content)
            content, flagged = screened.content, screened.flagged
        row = await messages_db.edit_message(self.db, message_id, content)
        if row is None:
            raise errors.Conflict("message was deleted")
        await self.hub.publish_change(row["room_id"], int(row["edit_rev"]), server_frames.change_from_row(row))
        if flagged and rules is not None:
            await rules.flag(message_id, flagged)
        return row

    async def delete(self, user_id: int, is_admin: bool, message_id: int) -> dict[str, Any]:
        await self._own_message(user_id, is_admin, message_id)
        row = await messages_db.delete_message(self.db, message_id, user_id)
        if row is None:
            raise errors.Conflict("message was deleted")
        await self.hub.publish_change(row["room_id"], int(row["edit_rev"]), server_frames.change_from_row(row))
        return row

    async def react(
        self, user_id: int, message_id: int, emoji: str, add: bool, room_id: int | None = None
    ) -> tuple[dict[str, Any], bool]:
        """Add or remove the user's reaction; ``(message, changed)``.  A change rides the edit path: the
        message takes the room's next edit revision and the room gets ``message_updated`` with the counts,
        which repair re-reads from Postgres if this publish is lost.  Adding a reaction already there, or
        removing one that is not, changes nothing and announces nothing."""
        msg = await messages_db.message_by_id(self.db, message_id)
        if (
            msg is None
            or room_id not in (None, msg["room_id"])  # REST names the room too
            or await rooms_db.room_for_member(self.db, msg["room_id"], user_id) is None
        ):
            raise errors.NotFound("message not found")
        if msg["deleted_at"] is not None:
            raise errors.Conflict("message was deleted")
        per_message, per_user = self.settings.reactions_per_message, self.settings.reactions_per_user
        result = await messages_db.react(self.db, message_id, user_id, emoji, add, per_message, per_user)
        if result.row is None:
            raise errors.Conflict("message was deleted")
        if result.changed:
            row = result.row
            await self.hub.publish_change(row["room_id"], int(row["edit_rev"]), server_frames.change_from_row(row))
        return result.row, result.changed
