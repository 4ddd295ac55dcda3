"""A room's messages: history, send, reactions, and send-then-stream the assistant's answer as Server-Sent Events."""

from __future__ import annotations

import asyncio
import json
import secrets
from typing import Any

from chatd.api.base import LIMIT, RoomAccess, message_json
from chatd.api.bodies import MessageSend
from chatd.api.openapi import Param, obj, op
from chatd.api.responses import Message, MessagePage
from chatd.core import client_frames, wsframe
from chatd.storage import messages as messages_db


def send_frame(body: MessageSend, room_id: int, max_message_chars: int) -> client_frames.Send:
    """The body as the socket's ``send`` frame, through the same rules (content over ``ws.max_message_chars``:
    413 too_large, which no static schema can state)."""
    try:
        frame = client_frames.parse_client_frame(
            {"type": "send", "room_id": room_id, "content": body.content, "client_msg_id": body.client_msg_id},
            max_message_chars=max_message_chars,
        )
    except client_frames.FrameError as exc:
        raise exc.error from None
    assert isinstance(frame, client_frames.Send)
    return frame


class MessagesHandler(RoomAccess):
    @op(
        summary="A page of the room's messages, ascending by seq",
        tag="messages",
        query=(
            LIMIT,
            Param("after_seq", {"type": "integer", "minimum": 0}),
            Param("before_seq", {"type": "integer", "minimum": 0}),
        ),
        responses={200: ("Page", MessagePage)},
    )
    async def get(self, room_id: str) -> None:
        principal, room = await self._room(room_id)
        limit = self.arg("limit")
        rows, has_more = await messages_db.messages_page(
            self.db, room["id"], self.arg("after_seq"), self.arg("before_seq"), limit
        )
        viewer = principal.user_id
        self.send_json({"messages": [message_json(r, viewer) for r in rows], "has_more": has_more})

    @op(
        summary="Send a message (idempotent by client_msg_id)",
        tag="messages",
        body=MessageSend,
        responses={201: ("Stored", Message), 200: ("Duplicate of a stored message", Message)},
    )
    async def post(self, room_id: str) -> None:
        principal = await self.auth()
        frame = send_frame(self.body(MessageSend), self.path_id(room_id, "room"), self.config.ws.max_message_chars)
        result = await self.rooms.send(principal.user_id, frame.room_id, frame.content, frame.client_msg_id)
        body = message_json(result.row) | {"duplicate": result.duplicate}
        if result.queued_position is not None:
            body["assistant"] = {"status": "queued", "position": result.queued_position}
        elif result.assistant_error is not None:
            body["assistant"] = {"status": "refused", "error": result.assistant_error.to_dict()}
        elif result.answer_pending:  # owed; the sweeper queues it once the queue answers
            body["assistant"] = {"status": "pending"}
        self.send_json(body, 200 if result.duplicate else 201)


class ReactionHandler(RoomAccess):
    """``/rooms/{id}/messages/{message_id}/reactions/{emoji}``: the caller's reaction (emoji URL-encoded).

    Idempotent: putting a reaction that is there, or deleting one that is not, answers the message as it is.
    """

    @op(
        summary="Add your reaction to a message (the room gets message_updated)",
        tag="messages",
        responses={200: ("The message with its reactions", Message)},
    )
    async def put(self, room_id: str, message_id: str, emoji: str) -> None:
        await self._react(room_id, message_id, emoji, True)

    @op(
        summary="Remove your reaction from a message (the room gets message_updated)",
        tag="messages",
        responses={200: ("The message with its reactions", Message)},
    )
    async def delete(self, room_id: str, message_id: str, emoji: str) -> None:
        await self._react(room_id, message_id, emoji, False)

    async def _react(self, room_id: str, message_id: str, emoji: str, add: bool) -> None:
        principal = await self.auth()
        room = self.path_id(room_id, "room")
        raw = {"type": "react", "message_id": self.path_id(message_id, "message"), "emoji": emoji, "add": add}
        try:  # the socket's rules and words (react.emoji must be ...)
            frame = client_frames.parse_client_frame(raw)
        except client_frames.FrameError as exc:
            raise exc.error from None
        assert isinstance(frame, client_frames.React)
        row, _ = await self.rooms.react(principal.user_id, frame.message_id, frame.emoji, add, room_id=room)
        self.send_json(message_json(row, principal.user_id))


# One event of the stream (OpenAPI 3.2's reading of an event-stream schema: each event, not the whole text).
SSE_EVENT = obj(
    {
        "event": {"enum": ["message", "queued", "stream_start", "stream_chunk", "stream_end", "error"]},
        "data": {"type": "string", "contentMediaType": "application/json"},
    },
    extra=True,  # id, retry: never sent, but allowed by the format
)


class StreamingSendHandler(RoomAccess):
    """``POST /rooms/{id}/messages/stream``: send, then the answer as Server-Sent Events.

    The same JSON as the socket's ``queued`` / ``stream_start`` / ``stream_chunk``
    / ``stream_end`` frames, as SSE events of those names; the room's sockets
    see the same stream.  Ends after ``stream_end`` (or at once when no answer
    is coming: ``error`` event).
    """

    @op(
        summary="Send, then the assistant's answer as Server-Sent Events",
        tag="messages",
        body=MessageSend,
        content_type="text/event-stream",
        responses={200: ("message, queued, stream_start, stream_chunk, stream_end or error events", SSE_EVENT)},
    )
    async def post(self, room_id: str) -> None:
        principal = await self.auth()
        room = await self.rooms.member_room(self.path_id(room_id, "room"), principal.user_id)
        frame = send_frame(self.body(MessageSend), room["id"], self.config.ws.max_message_chars)
        listener = self._listener = SseListener(self, principal.user_id, self.config.ws.max_held_frames)
        hub = self.rooms.hub
        await hub.join_room(listener, room["id"])  # listening before the message exists: nothing missed
        try:
            hub.finish_join(listener, room["id"], [], room["last_seq"])
            result = await self.rooms.send(principal.user_id, room["id"], frame.content, frame.client_msg_id)
            self.set_header("Content-Type", "text/event-stream; charset=utf-8")
            self.set_header("X-Accel-Buffering", "no")  # nginx: do not buffer the stream
            self.sse("message", message_json(result.row))
            prompt_id = int(result.row["id"])
            assistant = self.rooms.assistant
            # A retried request (same client_msg_id): re-attach to its answer, running or stored.
            attach = await assistant.attach(room["id"], prompt_id) if result.duplicate and assistant else None
            listener.set_prompt(prompt_id, attach)  # then replays what arrived before the id was known
            coming = attach is not None or result.queued_position is not None or result.answer_pending
            if result.assistant_error is not None:
                self.sse("error", result.assistant_error.to_dict())
            elif not coming:
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
        self.prompt_id: int | None = None
        self.message_id: int | None = None
        self.mark = -1  # chunks up to this index were sent by a catch-up
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._early: list[dict[str, Any]] = []  # frames before the prompt's id is known

    def set_prompt(self, prompt_id: int, catch_up: tuple[list[dict[str, Any]], int] | None = None) -> None:
        self.prompt_id = prompt_id
        if catch_up is not None:
            frames, index = catch_up
            for frame_json in frames:
                self._forward(dict(frame_json))
            self.mark = index  # live chunks up to it are in the catch-up chunk
        early, self._early = self._early, []
        for frame_json in early:
            self._forward(frame_json)

    def write_frame(self, frame: bytes) -> None:
        for payload in wsframe.ws_frame_payloads(frame):
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
                if frame_json["message_id"] == self.message_id:
                    return  # announced by the catch-up already
                if self.message_id is not None and frame_json.get("supersedes") != self.message_id:
                    return  # another room assistant's answer to this prompt: the response follows the first
                self.message_id = frame_json["message_id"]
        elif kind in ("stream_chunk", "stream_end") and frame_json.get("message_id") == self.message_id:
            if kind == "stream_chunk" and frame_json.get("index", 0) <= self.mark:
                return  # covered by the catch-up chunk
        else:
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
