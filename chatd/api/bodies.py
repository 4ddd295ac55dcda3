"""The REST request bodies, each declared once as a msgspec ``Struct``: ``decode`` validates a body with it
(``ApiHandler.body``) and ``openapi.document`` publishes its JSON schema, so the two cannot disagree.

A body is decoded from the raw bytes in one pass (docs/BENCHMARKS.md, "Request bodies"); what the library
reports is turned into one ``BadRequest("<field>: <what is wrong>")``.  Patterns are written so that Python's
``re.search`` (msgspec) and ECMA-262 (the schema's readers) accept the same strings: whitespace spelled out
(``\\s`` differs) and ``END`` instead of ``$`` (Python's ``$`` also matches before a final newline).
"""

from __future__ import annotations

import re
from functools import cache
from typing import Annotated, Any, ClassVar, Literal, TypeVar

import msgspec
from msgspec import UNSET, Meta, UnsetType

from chatd.core import client_frames, content_rules, errors
from chatd.core.client_frames import CLIENT_MSG_ID_PATTERN as CLIENT_MSG_ID_PATTERN  # re-exported: the socket's rules
from chatd.core.client_frames import CONTENT_PATTERN as CONTENT_PATTERN
from chatd.core.client_frames import DEFAULT_MAX_MESSAGE_CHARS as DEFAULT_MAX_MESSAGE_CHARS
from chatd.core.client_frames import END as END
from chatd.core.client_frames import WS as WS
from chatd.services import credentials
from chatd.services.admin import MAX_ANNOUNCEMENT_CHARS

MAX_SAFE_INT = 2**53 - 1
MAX_ROOM_NAME_CHARS = 200
MAX_SETTING_CHARS = 20_000
MAX_MEMBERS_AT_CREATION = 1000
MAX_LOAD_TEST_USERS = 1000  # per POST /admin/load-test-users
MAX_LOAD_TEST_TTL_S = 86_400
# DEFAULT_MAX_MESSAGE_CHARS (ws.max_message_chars' default) is the schema's bound for a content; the configured
# one is checked by the send rules (413).  WS (Python's whitespace) and END are the client frames' (core), as are
# the content and client_msg_id patterns: a REST send and a socket send follow the same rules.
CC = r"\x00-\x1f\x7f-\x9f"  # control characters (category Cc)
NOT_BLANK = rf"[^{WS}]"  # (unanchored) not only whitespace
_DOMAIN_PART = rf"[^@.{WS}\x00-\x1f\x7f]+"


# trimmed by the service: whitespace around it is allowed
EMAIL_PATTERN = rf"^[{WS}]*[^@{WS}\x00-\x1f\x7f]+@{_DOMAIN_PART}(\.{_DOMAIN_PART})+[{WS}]*{END}"
NAME_PATTERN = rf"^[^{CC}]*[^{WS}{CC}][^{CC}]*{END}"


def text(says: str, **constraints: Any) -> Meta:
    """A string's constraints, and what to say when a value breaks its pattern (a regex is no message)."""
    return Meta(**constraints, extra={"says": says})


# What credentials.validate_email / validate_password / validate_name accept (docs/API.md, register); they still
# run in the service (the CLI's create-user has no body), and accept everything these accept.
Email = Annotated[
    str,
    text(
        "must be an address like name@example.com",
        max_length=credentials.MAX_EMAIL_CHARS,
        pattern=EMAIL_PATTERN,
    ),
]
Password = Annotated[str, Meta(min_length=credentials.MIN_PASSWORD_CHARS, max_length=credentials.MAX_PASSWORD_CHARS)]
Name = Annotated[  # trimmed, 1..100 characters, no control characters
    str,
    text(
        "must not be blank nor contain control characters",
        max_length=credentials.MAX_NAME_CHARS,
        pattern=NAME_PATTERN,
    ),
]
NonEmpty = Annotated[str, Meta(min_length=1)]
RoomName = Annotated[str, text("must not be blank", max_length=MAX_ROOM_NAME_CHARS, pattern=NOT_BLANK)]
Setting = Annotated[str, Meta(max_length=MAX_SETTING_CHARS)]
Announcement = Annotated[str, text("must not be blank", max_length=MAX_ANNOUNCEMENT_CHARS, pattern=NOT_BLANK)]
# client_frames.parse_client_frame's send: not blank, no NUL; its length is the send rule's (413 too_large).
Content = Annotated[
    str,
    text(
        "must not be blank nor contain NUL",
        pattern=CONTENT_PATTERN,
        description="at most ws.max_message_chars characters (default 4000; longer: 413 too_large), not blank, no NUL",
        extra_json_schema={"maxLength": DEFAULT_MAX_MESSAGE_CHARS},
    ),
]
ClientMsgId = Annotated[
    str,
    text(
        f"must be 1..{client_frames.MAX_ID_CHARS} printable ASCII characters without spaces",
        pattern=CLIENT_MSG_ID_PATTERN,
    ),
]


class Whole(int):
    """An integer in a body, from ``LOW`` to ``HIGH``.  ``7.0`` counts: JSON Schema's integer is any number
    without a fractional part, and some JSON encoders write every number as a float (checked in
    ``_dec_hook``; msgspec's own ``int`` refuses it, so bodies use these)."""

    LOW: ClassVar[int] = 0
    HIGH: ClassVar[int] = MAX_SAFE_INT
    SCHEMA: ClassVar[dict[str, Any]] = {"type": "integer", "minimum": 0, "maximum": MAX_SAFE_INT}


class Id(Whole):
    """An id: 1..2^53-1."""

    LOW = 1
    SCHEMA: ClassVar[dict[str, Any]] = {"type": "integer", "minimum": 1, "maximum": MAX_SAFE_INT}


class LoadTestCount(Whole):
    LOW, HIGH = 1, MAX_LOAD_TEST_USERS
    SCHEMA: ClassVar[dict[str, Any]] = {"type": "integer", "minimum": 1, "maximum": MAX_LOAD_TEST_USERS}


class LoadTestTtl(Whole):
    LOW, HIGH = 60, MAX_LOAD_TEST_TTL_S
    SCHEMA: ClassVar[dict[str, Any]] = {"type": "integer", "minimum": 60, "maximum": MAX_LOAD_TEST_TTL_S}


def as_whole(value: Any, low: int = 1, high: int = MAX_SAFE_INT) -> int | None:
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, int) and not isinstance(value, bool) and low <= value <= high:
        return value
    return None


def as_id(value: Any) -> int | None:
    return as_whole(value)


def _dec_hook(kind: type, value: Any) -> Any:
    if isinstance(kind, type) and issubclass(kind, Whole):
        checked = as_whole(value, kind.LOW, kind.HIGH)
        if checked is None:
            raise ValueError(f"must be an integer from {kind.LOW} to {kind.HIGH}")
        return kind(checked)
    raise NotImplementedError(kind)


def schema_hook(kind: type) -> dict[str, Any]:
    if isinstance(kind, type) and issubclass(kind, Whole):
        return dict(kind.SCHEMA)
    raise NotImplementedError(kind)


class Body(msgspec.Struct, kw_only=True):
    """A request body; members it does not declare are ignored (``Closed``: refused)."""


class Closed(Body, forbid_unknown_fields=True):
    """A request body that refuses members it does not declare."""


# -- auth -------------------------------------------------------------------------------------------------------


class Register(Body):
    email: Email
    password: Password
    name: Name


class Login(Body):
    email: NonEmpty
    password: NonEmpty


class Refresh(Body):
    refresh_token: NonEmpty


class Logout(Body):
    all: bool = False


# -- account ----------------------------------------------------------------------------------------------------


class Rename(Closed):
    name: Name


class PasswordChange(Body):
    old_password: NonEmpty
    new_password: Password


# -- rooms ------------------------------------------------------------------------------------------------------

AssistantMode = Literal["always", "mention"]  # services.rooms.ASSISTANT_MODES
RoomKind = Literal["group", "assistant"]  # services.rooms.ROOM_KINDS


class AssistantSettings(Closed):
    """The assistant's settings: each one given replaces the default (creation) or the current one."""

    model: Setting | UnsetType = UNSET
    system_prompt: Setting | UnsetType = UNSET
    mode: AssistantMode | UnsetType = UNSET

    def given(self) -> dict[str, str]:
        return {f: v for f in self.__struct_fields__ if (v := getattr(self, f)) is not UNSET}


class RoomCreate(Body):
    name: RoomName
    kind: RoomKind = "group"
    members: Annotated[list[Id], Meta(max_length=MAX_MEMBERS_AT_CREATION)] = []
    assistant: AssistantSettings | None = None  # null: the kind's defaults


class RoomChange(Closed):
    """Only what is given changes; ``assistant: null`` keeps the current settings."""

    name: RoomName | UnsetType = UNSET
    assistant: AssistantSettings | UnsetType | None = UNSET


class MemberAdd(Body):
    user_id: Id


# -- assistants (sql/0016) -----------------------------------------------------------------------------------------

ASSISTANT_NAME_PATTERN = rf"^[a-z][a-z0-9_]{{0,31}}{END}"  # the @handle; sql/0016 checks the same
AssistantName = Annotated[
    str, text("must be a lowercase letter, then up to 31 of a-z, 0-9 and _", pattern=ASSISTANT_NAME_PATTERN)
]
AssistantProvider = Literal["anthropic", "openai", "offline"]
ModelName = Annotated[str, text("must not be blank", max_length=200, pattern=NOT_BLANK)]


class AssistantCreate(Closed):
    """An assistant the server offers (admin)."""

    name: AssistantName
    provider: AssistantProvider
    model: ModelName
    system_prompt: Setting = ""  # "": setting assistant.system_prompt
    mode: AssistantMode = "mention"  # when a room picks it without saying


class AssistantChange(Closed):
    """Only what is given changes (the name does not: answers and mentions refer to it)."""

    provider: AssistantProvider | UnsetType = UNSET
    model: ModelName | UnsetType = UNSET
    system_prompt: Setting | UnsetType = UNSET
    mode: AssistantMode | UnsetType = UNSET
    status: Literal["active", "retired"] | UnsetType = UNSET

    def given(self) -> dict[str, str]:
        return {f: v for f in self.__struct_fields__ if (v := getattr(self, f)) is not UNSET}


class RoomAssistantPick(Closed):
    mode: AssistantMode | None = None  # null or absent: the assistant's default mode


# -- messages ---------------------------------------------------------------------------------------------------


class MessageSend(Body):
    content: Content
    client_msg_id: ClientMsgId


# -- admin ------------------------------------------------------------------------------------------------------


class LoadTestUsers(Closed):
    count: LoadTestCount
    password: Password | UnsetType = UNSET  # absent: the users cannot sign in with a password (tokens only)
    access_ttl_s: LoadTestTtl | UnsetType = UNSET  # absent: auth.access_ttl_s


class RoleChange(Body):
    role: Literal["user", "admin"]


class Announce(Body):
    content: Announcement


class Broadcast(Body):
    target: Literal["rooms", "users"]
    content: Announcement


# -- moderation -------------------------------------------------------------------------------------------------

MAX_REASON_CHARS = 4000  # the schema's bound; moderation.max_reason_chars (default 500) is checked by the service
Reason = Annotated[str, text("must not be blank", max_length=MAX_REASON_CHARS, pattern=NOT_BLANK)]


class ReportFile(Body):
    reason: Reason


class ReportAction(Body):
    action: Literal["resolve", "dismiss", "delete", "ban"]  # services.moderation.REPORT_ACTIONS


class ContentRuleCreate(Closed):
    kind: Literal["word", "regex"]
    pattern: Annotated[str, text("must not be blank", max_length=content_rules.MAX_PATTERN_CHARS, pattern=NOT_BLANK)]
    action: Literal["block", "flag", "mask"]


class Redact(Closed):
    room_id: Id | UnsetType = UNSET  # absent: every room


# -- decoding ---------------------------------------------------------------------------------------------------

B = TypeVar("B", bound=Body)


@cache
def _decoder(model: type[B]) -> msgspec.json.Decoder[B]:
    return msgspec.json.Decoder(model, dec_hook=_dec_hook)


def decode(model: type[B], raw: bytes | None) -> B:
    """``raw`` as a ``model``, or ``BadRequest`` naming the field and what is wrong with it."""
    try:
        body: B = _decoder(model).decode(raw or b"")
        return body
    except msgspec.ValidationError as exc:
        raise errors.BadRequest(explain(model, str(exc))) from None
    except msgspec.DecodeError:
        if not (raw or b"").strip():
            raise errors.BadRequest("request body must be a JSON object") from None
        raise errors.BadRequest("request body is not valid JSON") from None


_AT = re.compile(r"^(?P<what>.*?)(?: - at `\$(?P<path>[^`]*)`)?$", re.S)
_PART = re.compile(r"\.([^.\[]+)|\[(\d+)\]")
_KINDS = {
    "int": "an integer",
    "str": "a string",
    "bool": "a boolean",
    "object": "an object",
    "array": "an array",
    "null": "null",
    "float": "a number",
}


def explain(model: type[Body], message: str) -> str:
    """msgspec's error text (``Expected `int`, got `str` - at `$.members[1]```) as ``members[1]: must be ...``."""
    m = _AT.match(message)
    assert m is not None  # the pattern matches any text
    what, path = m["what"], m["path"] or ""
    where = path.lstrip(".")
    if found := re.fullmatch(r"Object missing required field `(.+)`", what):
        return f"{_join(where, found[1])}: required"
    if found := re.fullmatch(r"Object contains unknown field `(.+)`", what):
        return f"{_join(where, found[1])}: unknown field"
    if not where and what.startswith("Expected `object`"):
        return "request body must be a JSON object"
    leaf, says = _leaf(msgspec.inspect.type_info(model), path)
    if isinstance(leaf, msgspec.inspect.CustomType) and issubclass(leaf.cls, Whole):  # ours, or out of range
        wrong = f"must be an integer from {leaf.cls.LOW} to {leaf.cls.HIGH}"
    elif isinstance(leaf, msgspec.inspect.LiteralType):
        wrong = f"must be one of {', '.join(map(str, leaf.values))}"
    elif what.startswith("Expected `str` matching regex") and says:
        wrong = says
    elif found := re.fullmatch(r"Expected `([\w |]+)`, got `(\w+)`", what):
        wanted = " or ".join(_KINDS.get(k, k) for k in found[1].split(" | "))
        wrong = f"must be {wanted}, not {_KINDS.get(found[2], found[2])}"
    elif found := re.fullmatch(r"Expected `str` of length (<=|>=) (\d+)", what):
        wrong = f"must be at {'most' if found[1] == '<=' else 'least'} {found[2]} characters"
    elif found := re.fullmatch(r"Expected `array` of length (<=|>=) (\d+)", what):
        wrong = f"must have at {'most' if found[1] == '<=' else 'least'} {found[2]} items"
    else:  # our own (Id) and anything new: msgspec's words, lower-cased
        wrong = what[:1].lower() + what[1:]
    return f"{where}: {wrong}" if where else wrong


def _join(where: str, name: str) -> str:
    return f"{where}.{name}" if where else name


def _leaf(info: msgspec.inspect.Type, path: str) -> tuple[msgspec.inspect.Type, str | None]:
    """The type at ``path`` (``.assistant.mode``, ``.members[3]``) and its ``says``."""
    info, says = _unwrap(info)
    for name, index in _PART.findall(path):
        if name and isinstance(info, msgspec.inspect.StructType):
            info = next((f.type for f in info.fields if f.encode_name == name), info)
        elif index and isinstance(info, msgspec.inspect.ListType):
            info = info.item_type
        info, says = _unwrap(info)
    return info, says


def _unwrap(info: msgspec.inspect.Type) -> tuple[msgspec.inspect.Type, str | None]:
    says = None
    while True:
        if isinstance(info, msgspec.inspect.Metadata):
            says = (info.extra or {}).get("says", says)
            info = info.type
        elif isinstance(info, msgspec.inspect.UnionType):
            rest = [t for t in info.types if not isinstance(t, msgspec.inspect.NoneType)]  # UNSET is left out
            if len(rest) != 1:
                return info, says
            info = rest[0]
        else:
            return info, says


MODELS: tuple[type[Body], ...] = (
    Register,
    Login,
    Refresh,
    Logout,
    Rename,
    PasswordChange,
    AssistantSettings,
    RoomCreate,
    RoomChange,
    MemberAdd,
    AssistantCreate,
    AssistantChange,
    RoomAssistantPick,
    MessageSend,
    LoadTestUsers,
    RoleChange,
    Announce,
    Broadcast,
    ReportFile,
    ReportAction,
    ContentRuleCreate,
    Redact,
)
