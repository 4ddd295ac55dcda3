"""Rooms and messages: the one path every send takes (socket or REST).

``MessageWriter`` group-commits: a send commits at once when the writer is
idle; sends arriving while a transaction runs wait and form the next batch
(up to ``batch_max_messages``, plus an optional ``batch_max_delay_ms``), so a
loaded database sees few large transactions and an idle one adds no delay.
Each batch is acked, then published.  A send is acked only
after its transaction committed; if Postgres is down the caller gets
``unavailable`` and nothing is published.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from redis.exceptions import RedisError

from chatd import errors, metrics, protocol, store
from chatd.assistant import wants_answer
from chatd.fanout import Conn, Event, Hub, message_frame
from chatd.logs import app_log, fields
from chatd.ratelimit import RedisLimiter
from chatd.state import ServerState
from chatd.store import Committed, PendingMessage

if TYPE_CHECKING:
    from chatd.assistant import Assistant

ROOM_KINDS = ("group", "assistant")

# KEYS: presence hash, leaving marker   ARGV: user id, marker ttl ms
_PRESENCE_LEAVE = """
local n = redis.call('HINCRBY', KEYS[1], ARGV[1], -1)
if n <= 0 then redis.call('SET', KEYS[2], '1', 'PX', ARGV[2]) end
return n
"""
ASSISTANT_MODES = ("always", "mention")


class MessageWriter:
    """Per-worker group commit of new messages."""

    def __init__(self, state: ServerState, hub: Hub) -> None:
        self.state = state
        self.hub = hub
        self.max_batch = state.settings.ws.batch_max_messages
        self.max_delay_s = state.settings.ws.batch_max_delay_ms / 1000
        self._queue: asyncio.Queue[tuple[PendingMessage, asyncio.Future[Committed]]] = asyncio.Queue()
        self.batches = 0
        self.committed = 0
        self._flushing = False

    def start(self) -> None:
        self.state.tasks.spawn(self._run(), "message-writer")
        self.state.drainers.append(self.drain)

    async def drain(self) -> None:
        """Shutdown: let queued sends commit (and be acked) before the pools close."""
        while not self._queue.empty() or self._flushing:  # noqa: ASYNC110  # shutdown only
            await asyncio.sleep(0.01)

    def submit(self, message: PendingMessage) -> asyncio.Future[Committed]:
        """Queue a message for the next batch; the future resolves once it is durable.

        Synchronous on purpose: callers enqueue in the order their frames arrived, so a
        socket's pipelined sends get increasing seqs without waiting for each commit.
        """
        fut: asyncio.Future[Committed] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait((message, fut))
        return fut

    async def _run(self) -> None:
        while True:
            batch = [await self._queue.get()]
            deadline = time.monotonic() + self.max_delay_s
            while len(batch) < self.max_batch:
                try:
                    batch.append(self._queue.get_nowait())
                    continue
                except asyncio.QueueEmpty:
                    pass
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(self._queue.get(), remaining))
                except TimeoutError:
                    break
            self._flushing = True
            try:
                await self._flush(batch)
            finally:
                self._flushing = False

    async def _flush(self, batch: list[tuple[PendingMessage, asyncio.Future[Committed]]]) -> None:
        started = time.monotonic()
        try:
            results = await store.commit_batch(self.state.pg, [m for m, _ in batch])
        except errors.ChatdError as exc:
            for _, fut in batch:
                if not fut.done():
                    fut.set_exception(type(exc)(exc.message))
            return
        except Exception as exc:
            app_log.error("commit_failed", exc_info=exc, extra=fields(batch=len(batch)))
            for _, fut in batch:
                if not fut.done():
                    fut.set_exception(errors.Internal())
            return
        self.batches += 1
        metrics.commit_batch.observe(len(batch))
        metrics.commit_duration.observe(time.monotonic() - started)
        fresh: list[tuple[int, int, dict[str, Any]]] = []
        for (_, fut), result in zip(batch, results, strict=True):
            if not fut.done():
                fut.set_result(result)
            if result.row is not None and not result.duplicate and result.error is None:
                fresh.append((result.row["room_id"], result.row["seq"], message_frame(result.row)))
        self.committed += len(fresh)
        metrics.messages_committed.inc(len(fresh))
        if fresh:
            await self.hub.publish_messages(fresh)


@dataclass(frozen=True, slots=True)
class SendResult:
    committed: Committed
    queued_position: int | None = None  # an assistant answer was queued
    assistant_error: errors.ChatdError | None = None  # busy / quota_exceeded / unavailable

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


class Rooms:
    """Room operations shared by the socket and REST handlers."""

    def __init__(self, state: ServerState, hub: Hub, writer: MessageWriter) -> None:
        self.state = state
        self.hub = hub
        self.writer = writer
        self.assistant: Assistant | None = None  # set by the app when the assistant runs
        ws = state.settings.ws
        self.send_limiter = RedisLimiter(
            state.redis, lambda s: state.keys.rate("send", s), ws.send_rate_count, ws.send_rate_window_s
        )

    async def member_room(self, room_id: int, user_id: int) -> dict[str, Any]:
        room = await store.room_for_member(self.state.pg, room_id, user_id)
        if room is None:
            raise errors.NotFound("room not found")
        return room

    # -- send -------------------------------------------------------------------

    async def submit(
        self, user_id: int, room_id: int, content: str, client_msg_id: str | None
    ) -> asyncio.Future[Committed]:
        """Check the limits and queue the message; the future resolves when it is durable."""
        ws = self.state.settings.ws
        if len(content) > ws.max_message_chars:
            raise errors.TooLarge(f"content over {ws.max_message_chars} characters")
        decision = await self.send_limiter.hit(str(user_id))
        if not decision.allowed:
            raise errors.RateLimited(
                f"at most {ws.send_rate_count} messages per {ws.send_rate_window_s:g} s",
                retry_after_ms=decision.retry_after_ms,
            )
        return self.writer.submit(PendingMessage(room_id, user_id, "user", "text", content, client_msg_id))

    async def send(self, user_id: int, room_id: int, content: str, client_msg_id: str | None) -> SendResult:
        """Submit, wait until durable, then queue the assistant's answer if the room wants one."""
        result = await (await self.submit(user_id, room_id, content, client_msg_id))
        return await self.after_commit(user_id, room_id, content, result)

    async def after_commit(self, user_id: int, room_id: int, content: str, result: Committed) -> SendResult:
        if result.error is not None:
            raise result.error
        queued: int | None = None
        refused: errors.ChatdError | None = None
        if self.assistant is not None and result.room is not None and not result.duplicate:
            if wants_answer(result.room, content):
                assert result.row is not None
                try:
                    queued = await self.assistant.enqueue(room_id, result.row["id"], user_id)
                except errors.ChatdError as err:
                    refused = err  # the message is stored and acked; only the answer is refused
        return SendResult(result, queued, refused)

    # -- join / leave -------------------------------------------------------------

    async def join(
        self, conn: Conn, room_id: int, since_seq: int | None, request_id: Any, rejoin: bool = False
    ) -> JoinResult:
        await self.member_room(room_id, conn.user_id)
        try:
            await self.hub.join_room(conn, room_id)
        except (TimeoutError, RedisError) as exc:
            raise errors.Unavailable("fan-out unavailable, try again") from exc
        try:
            # Subscribed (confirmed) before this read: nothing falls between history and live.
            row = await store.fetch_one(self.state.pg, "SELECT last_seq FROM rooms WHERE id = %s", (room_id,))
            last_seq = int(row["last_seq"]) if row else 0
            history: list[tuple[int, Event]] = []
            resync = None
            baseline_seq = last_seq
            limit = self.state.settings.ws.replay_limit
            if since_seq is not None and since_seq < last_seq:
                if last_seq - since_seq > limit:
                    resync = protocol.resync_required(room_id=room_id, last_seq=last_seq, reply_to=request_id)
                else:
                    rows = await store.messages_after(self.state.pg, room_id, since_seq, limit)
                    for r in rows:
                        frame = protocol.ws_text_frame(protocol.encode_bytes(message_frame(r)))
                        history.append((int(r["seq"]), Event(frame, int(r["seq"]), None)))
                    if rows:
                        last_seq = max(last_seq, int(rows[-1]["seq"]))
                    baseline_seq = since_seq
        except BaseException:
            await self.hub.leave_room(conn, room_id)
            raise
        online = await self._presence_join(room_id, conn.user_id, count=not rejoin)
        catch_up: list[tuple[int, int, list[bytes]]] = []
        if self.assistant is not None:
            for message_id, index, frames in await self.assistant.live_streams(room_id):
                encoded = [protocol.ws_text_frame(protocol.encode_bytes(f)) for f in frames]
                catch_up.append((message_id, index, encoded))
        joined = protocol.joined(room_id=room_id, last_seq=last_seq, online=online, reply_to=request_id)
        return JoinResult(joined, resync, history, baseline_seq, catch_up)

    async def leave(self, conn: Conn, room_id: int) -> None:
        if room_id in conn.room_seq or room_id in self.hub.rooms:
            await self.hub.leave_room(conn, room_id)
            await self._presence_leave(room_id, conn.user_id)

    # -- presence ---------------------------------------------------------------

    async def _presence_join(self, room_id: int, user_id: int, count: bool = True) -> list[int]:
        key = self.state.keys.presence(room_id)
        try:
            pipe = self.state.redis.pipeline(transaction=True)
            pipe.hincrby(key, str(user_id), 1 if count else 0)
            pipe.delete(self.state.keys.presence_leaving(room_id, user_id))
            pipe.hgetall(key)
            sockets, was_leaving, members = await pipe.execute()
        except RedisError as exc:
            app_log.warning("presence_unavailable", extra=fields(error=str(exc)[:200]))
            return [user_id]
        # Back within the grace period (on any worker or instance): no offline/online flap.
        if count and int(sockets) == 1 and not was_leaving:
            await self.hub.publish_room(room_id, protocol.presence(room_id=room_id, user_id=user_id, status="online"))
        return sorted(int(u) for u, c in members.items() if int(c) > 0)

    async def _presence_leave(self, room_id: int, user_id: int) -> None:
        grace_s = self.state.settings.ws.presence_grace_s
        try:
            # One script: the count reaching 0 and the "leaving" marker are set together, so two
            # sockets of the same user leaving at once cannot erase each other's marker.
            remaining = await self.state.redis.eval(
                _PRESENCE_LEAVE,
                2,
                self.state.keys.presence(room_id),
                self.state.keys.presence_leaving(room_id, user_id),
                str(user_id),
                int(grace_s * 1000) + 5000,
            )
        except RedisError:
            return
        if int(remaining) > 0:
            return
        loop = asyncio.get_running_loop()
        loop.call_later(
            grace_s,
            lambda: self.state.tasks.spawn(self._offline_if_still_gone(room_id, user_id), "presence-offline"),
        )

    async def _offline_if_still_gone(self, room_id: int, user_id: int) -> None:
        key = self.state.keys.presence(room_id)
        try:
            raw = await self.state.redis.hget(key, str(user_id))
            if raw is not None and int(raw) > 0:
                return  # came back on another worker or instance
            # Only the worker whose marker is still there announces: a rejoin deleted it.
            if not await self.state.redis.delete(self.state.keys.presence_leaving(room_id, user_id)):
                return
            await self.state.redis.hdel(key, str(user_id))
        except RedisError:
            return
        await self.hub.publish_room(room_id, protocol.presence(room_id=room_id, user_id=user_id, status="offline"))

    async def kick(self, room_id: int, user_id: int) -> None:
        """A removed member's sockets leave the room on every worker and instance."""
        await self.hub.kick(user_id, room_id)

    # -- typing, read, edit, delete -------------------------------------------------

    async def typing(self, conn: Conn, room_id: int, is_typing: bool) -> None:
        if room_id not in conn.room_seq:
            await self.member_room(room_id, conn.user_id)
        ws = self.state.settings.ws
        if is_typing:
            try:
                relay = await self.state.redis.set(
                    self.state.keys.typing(room_id, conn.user_id), b"1", nx=True, px=int(ws.typing_interval_s * 1000)
                )
            except RedisError:
                relay = True
            if not relay:
                return  # throttled: at most one per user per room per interval
        frame = protocol.typing(room_id=room_id, user_id=conn.user_id, is_typing=is_typing)
        await self.hub.publish_room(room_id, frame, exclude=conn.connection_id)

    async def read(self, conn: Conn, room_id: int, seq: int) -> int:
        stored = await store.set_read(self.state.pg, room_id, conn.user_id, seq)
        if stored is None:
            raise errors.NotFound("room not found")
        frame = protocol.read(room_id=room_id, user_id=conn.user_id, seq=stored)
        await self.hub.publish_user(conn.user_id, frame, exclude=conn.connection_id)
        return stored

    async def _own_message(self, user_id: int, is_admin: bool, message_id: int) -> dict[str, Any]:
        msg = await store.message_by_id(self.state.pg, message_id)
        if msg is None or await store.room_for_member(self.state.pg, msg["room_id"], user_id) is None:
            raise errors.NotFound("message not found")
        if msg["sender_id"] != user_id and not is_admin:
            raise errors.Forbidden("only the author or an admin may change a message")
        if msg["deleted_at"] is not None:
            raise errors.Conflict("message was deleted")
        return msg

    async def edit(self, user_id: int, is_admin: bool, message_id: int, content: str) -> dict[str, Any]:
        ws = self.state.settings.ws
        if len(content) > ws.max_message_chars:
            raise errors.TooLarge(f"content over {ws.max_message_chars} characters")
        await self._own_message(user_id, is_admin, message_id)
        row = await store.edit_message(self.state.pg, message_id, content)
        if row is None:
            raise errors.Conflict("message was deleted")
        frame = protocol.message_updated(
            room_id=row["room_id"],
            message_id=row["id"],
            seq=row["seq"],
            content=row["content"],
            edited_at=store.iso(row["edited_at"]) or "",
        )
        await self.hub.publish_room(row["room_id"], frame)
        return row

    async def delete(self, user_id: int, is_admin: bool, message_id: int) -> dict[str, Any]:
        await self._own_message(user_id, is_admin, message_id)
        row = await store.delete_message(self.state.pg, message_id)
        if row is None:
            raise errors.Conflict("message was deleted")
        frame = protocol.message_deleted(room_id=row["room_id"], message_id=row["id"], seq=row["seq"])
        await self.hub.publish_room(row["room_id"], frame)
        return row
