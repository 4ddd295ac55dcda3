"""The REST response bodies, declared as msgspec models for their OpenAPI schema (``components.schemas``): the
``@op`` declarations name them (``responses={200: ("Room", Room)}``) and ``openapi.document`` refers to them.

The handlers and services build these objects as plain dicts (``server_frames.room_object``, ``message_from_row``,
``accounts.user_json`` ...) and do not validate them; the integration tests validate real responses against the
published schema (``tests/openapi_check.py``).  A member with ``UNSET`` as its default is optional (absent when it
does not apply); every object refuses members it does not declare, so the schema lists all of them.
"""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Any, Literal

import msgspec
from msgspec import UNSET, Meta, UnsetType

from chatd.api.bodies import Id


class Reply(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """A response object (schema only)."""


ErrorCode = Literal[
    "bad_request",
    "unauthorized",
    "forbidden",
    "not_found",
    "method_not_allowed",
    "conflict",
    "too_large",
    "unsupported_type",
    "content_blocked",
    "range_not_satisfiable",
    "headers_too_large",
    "rate_limited",
    "quota_exceeded",
    "busy",
    "unavailable",
    "llm_unavailable",
    "unknown_assistant",
    "internal",
]
UserStatus = Literal["active", "banned", "deleted"]
Role = Literal["user", "assistant", "system"]
MessageKind = Literal["text", "file", "system"]
Time = Annotated[dt.datetime, Meta(tz=True)]  # RFC 3339 with its offset ("format": "date-time")


class ErrorDetail(Reply):
    code: ErrorCode
    message: str
    retry_after_ms: int | UnsetType = UNSET
    details: dict[str, Any] | UnsetType = UNSET


class Error(Reply):
    """Every error (docs/API.md, error shape)."""

    error: ErrorDetail


class User(Reply):
    id: Id
    email: str
    name: str
    role: Literal["user", "admin"]
    status: UserStatus
    created_at: Time


class UserRef(Reply):
    id: Id
    name: str


class Tokens(Reply):
    user: User
    access_token: str
    refresh_token: str
    token_type: Literal["Bearer"]
    expires_in: int


class Room(Reply):
    id: Id
    name: str
    kind: Literal["group", "assistant"]
    owner_id: Id
    status: Literal["active", "archived"]
    assistant: dict[str, Any] | None
    last_seq: int
    created_at: Time
    updated_at: Time
    read_seq: int | UnsetType = UNSET
    unread_count: int | UnsetType = UNSET
    mention_count: (
        Annotated[
            int, Meta(description="rooms list: mentions of you (@name, @room) after read_seq, in messages not deleted")
        ]
        | UnsetType
    ) = UNSET
    last_message: dict[str, Any] | UnsetType | None = UNSET


class FileInfo(Reply):
    file_id: Id
    name: str
    content_type: str
    size: int
    sha256: Annotated[str, Meta(pattern="^[0-9a-f]{64}$")]
    width: int | None
    height: int | None


class Reaction(Reply):
    emoji: str
    count: int
    users: Annotated[list[Id], Meta(description="who reacted, in reaction order (count of them)")]
    me: Annotated[bool, Meta(description="the caller reacted with it")] | UnsetType = UNSET


class AnsweredBy(Reply):
    id: Id
    name: str
    model: str


class Message(Reply):
    room_id: Id
    message_id: Id
    seq: int
    sender_id: Id | None
    role: Role
    kind: MessageKind
    content: str
    client_msg_id: str | None
    created_at: Time
    edited_at: Time | None
    deleted: bool
    reply_to_message_id: Id | UnsetType = UNSET
    status: Literal["cancelled", "error"] | UnsetType = UNSET
    superseded: bool | UnsetType = UNSET
    data: Annotated[dict[str, Any], Meta(description="kind file: FileInfo; kind system: {event, user_id, ...}")] | (
        UnsetType
    ) = UNSET
    reactions: Annotated[list[Reaction], Meta(description="omitted when none; emoji in first-reaction order")] | (
        UnsetType
    ) = UNSET
    duplicate: bool | UnsetType = UNSET
    assistant: dict[str, Any] | UnsetType = UNSET
    answered_by: Annotated[AnsweredBy, Meta(description="a room assistant's answer: who answered")] | UnsetType = UNSET
    error: Annotated[ErrorDetail, Meta(description="why a room assistant's answer ended with error")] | (
        UnsetType
    ) = UNSET


class Member(Reply):
    id: Id
    name: str
    status: UserStatus
    role: Literal["owner", "member"]
    online: bool
    read_seq: int
    joined_at: Time


class SearchHit(Reply):
    room_id: Id
    message_id: Id
    seq: int
    sender_id: Id | None
    role: Role
    kind: MessageKind
    created_at: Time
    score: float
    snippet: str
    highlights: list[tuple[int, int]]


class AuditEntry(Reply):
    id: Id
    actor_id: Id
    action: str
    target: str | None
    details: dict[str, Any] | None
    ip: str | None
    status: int
    created_at: Time


class AdminMessage(Reply):
    message: Message
    deleted_at: Time | None
    deleted_by: Id | None


class ReportedMessage(Reply):
    seq: int
    content: str
    deleted: bool


class Report(Reply):
    id: Id
    message_id: Id
    room_id: Id
    sender_id: Id | None
    reporter_id: Annotated[Id | None, Meta(description="null: raised by a content rule with action flag")]
    reason: str
    status: Literal["open", "resolved", "dismissed", "deleted", "banned"]
    handled_by: Id | None
    handled_at: Time | None
    created_at: Time
    message: ReportedMessage | UnsetType = UNSET  # in the queue: the message as it is now


class ContentRule(Reply):
    id: Id
    kind: Literal["word", "regex"]
    pattern: str
    action: Literal["block", "flag", "mask"]
    created_by: Id | None
    created_at: Time
    version: int | UnsetType = UNSET  # on create: the list's new version


class UsageDay(Reply):
    day: str
    answers: int
    input_tokens: int
    output_tokens: int


class Usage(Reply):
    daily_token_budget: int
    tokens_today: int
    remaining_today: int | None
    days: list[UsageDay]


# -- whole responses of one route ----------------------------------------------------------------------------


class RoomPage(Reply):
    rooms: list[Room]
    next_cursor: int | None


class MemberPage(Reply):
    members: list[Member]
    next_cursor: int | None


class Receipt(Reply):
    user_id: Id
    read_seq: Annotated[int, Meta(description="read up to this seq (your own marker on your row)")]


class ReceiptPage(Reply):
    receipts: list[Receipt]
    next_cursor: int | None


class MessagePage(Reply):
    messages: list[Message]
    has_more: bool


class MemberAdded(Reply):
    room_id: Id
    user_id: Id
    added: bool


class UserMatches(Reply):
    users: list[UserRef]


class SearchResults(Reply):
    hits: list[SearchHit]
    mode: Literal["text", "semantic", "hybrid"]  # services.search.MODES
    next_cursor: int | None


class UserPage(Reply):
    users: list[User]
    next_cursor: int | None


class AdminMessagePage(Reply):
    messages: list[AdminMessage]
    next_cursor: int | None


class AuditPage(Reply):
    entries: list[AuditEntry]
    next_cursor: int | None


class LoadTestUser(Reply):
    user: User
    access_token: str


class LoadTestUsersMade(Reply):
    users: list[LoadTestUser]
    token_type: Literal["Bearer"]
    expires_in: int


class ReportPage(Reply):
    reports: list[Report]
    next_cursor: int | None


class ContentRules(Reply):
    version: int
    rules: list[ContentRule]


class ContentRuleDeleted(Reply):
    id: Id
    version: int


class Redacted(Reply):
    user_id: Id
    room_id: Id | None
    messages: int
    rooms: list[Id]


class BroadcastDone(Reply):
    target: Literal["rooms", "users"]
    count: int


AssistantMode = Literal["always", "mention"]
AssistantProvider = Literal["anthropic", "openai", "offline"]


class AssistantOffered(Reply):
    """An assistant the server offers, as every user sees it (GET /assistants)."""

    id: Id
    name: str
    provider: AssistantProvider
    model: str
    mode: AssistantMode


class AssistantDefinition(AssistantOffered):
    """An assistant as admins see it."""

    system_prompt: str
    status: Literal["active", "retired"]
    created_at: Time
    updated_at: Time


class RoomAssistant(AssistantOffered):
    """One of a room's assistants; ``mode`` is how it answers in this room."""

    added_by: Id | None


class AssistantList(Reply):
    assistants: list[AssistantOffered]


class AssistantDefinitionList(Reply):
    assistants: list[AssistantDefinition]


class RoomAssistantList(Reply):
    assistants: list[RoomAssistant]


class AssistantUsageRow(Reply):
    day: str
    assistant_id: int
    assistant: str | None
    model: str
    user_id: Id
    answers: int
    input_tokens: int
    output_tokens: int


class AssistantUsage(Reply):
    usage: list[AssistantUsageRow]


MODELS: tuple[type[Reply], ...] = (
    Error,
    User,
    UserRef,
    Tokens,
    Room,
    FileInfo,
    Message,
    Member,
    SearchHit,
    AuditEntry,
    AdminMessage,
    Usage,
    Report,
    ContentRule,
)
