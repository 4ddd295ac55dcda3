"""The REST request bodies (chatd/api/bodies.py): what each model accepts, the one-line errors, and that the
published JSON schema accepts exactly what the model accepts.  No I/O."""

from __future__ import annotations

import json
import re
import time
from functools import cache
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jsonschema import Draft202012Validator
from referencing import Registry
from referencing.jsonschema import DRAFT202012

from chatd.api import bodies, openapi
from chatd.api.bodies import (
    Announce,
    AssistantSettings,
    Body,
    Broadcast,
    Login,
    Logout,
    MemberAdd,
    MessageSend,
    PasswordChange,
    Refresh,
    Register,
    RoleChange,
    RoomChange,
    RoomCreate,
)
from chatd.core import errors
from chatd.services.rooms import ASSISTANT_MODES, ROOM_KINDS

MAX = 2**53 - 1
PW = "correct horse"


def raw(value: Any) -> bytes:
    return value if isinstance(value, bytes) else json.dumps(value).encode()


@pytest.mark.parametrize(
    ("model", "body", "expected"),
    [
        (MemberAdd, {"user_id": 7}, MemberAdd(user_id=bodies.Id(7))),
        (MemberAdd, {"user_id": 7.0}, MemberAdd(user_id=bodies.Id(7))),  # JSON Schema's integer
        (MemberAdd, {"user_id": MAX, "extra": [1]}, MemberAdd(user_id=bodies.Id(MAX))),  # extra members ignored
        (RoomCreate, {"name": " Team "}, RoomCreate(name=" Team ")),  # the handler trims
        (
            RoomCreate,
            {"name": "T", "kind": "assistant", "members": [2, 3.0], "assistant": {"mode": "mention"}},
            RoomCreate(
                name="T",
                kind="assistant",
                members=[bodies.Id(2), bodies.Id(3)],
                assistant=AssistantSettings(mode="mention"),
            ),
        ),
        (RoomCreate, {"name": "T", "assistant": None}, RoomCreate(name="T")),
        (RoomChange, {}, RoomChange()),
        (RoomChange, {"assistant": None}, RoomChange(assistant=None)),
        (
            RoomChange,
            {"name": "New", "assistant": {"model": "m"}},
            RoomChange(name="New", assistant=AssistantSettings(model="m")),
        ),
        (
            Register,
            {"email": "a@b.co", "password": PW, "name": "Ann"},
            Register(email="a@b.co", password=PW, name="Ann"),
        ),
        (
            Register,  # the service trims the email and the name
            {"email": " a@b.co\n", "password": PW, "name": " Ann "},
            Register(email=" a@b.co\n", password=PW, name=" Ann "),
        ),
        (Login, {"email": " x", "password": "p"}, Login(email=" x", password="p")),
        (Logout, {}, Logout(all=False)),
        (Logout, {"all": True}, Logout(all=True)),
        (
            MessageSend,
            {"content": "  hi\n", "client_msg_id": "c-1"},
            MessageSend(content="  hi\n", client_msg_id="c-1"),
        ),
        (Broadcast, {"target": "users", "content": "x"}, Broadcast(target="users", content="x")),
    ],
)
def test_accepted(model: type[Body], body: Any, expected: Body) -> None:
    assert bodies.decode(model, raw(body)) == expected


@pytest.mark.parametrize(
    ("model", "body", "message"),
    [
        # the body itself
        (MemberAdd, b"", "request body must be a JSON object"),
        (MemberAdd, b"  ", "request body must be a JSON object"),
        (MemberAdd, b"[1, 2]", "request body must be a JSON object"),
        (MemberAdd, b"null", "request body must be a JSON object"),
        (MemberAdd, b"{not json", "request body is not valid JSON"),
        (MemberAdd, b"\xff\xfe", "request body is not valid JSON"),
        (MemberAdd, b'{"user_id": NaN}', "request body is not valid JSON"),
        (MemberAdd, b'{"user_id": 1} x', "request body is not valid JSON"),
        (Login, b'{"email": "\\ud800", "password": "p"}', "request body is not valid JSON"),  # lone surrogate
        # ids
        (MemberAdd, {}, "user_id: required"),
        (MemberAdd, {"user_id": 0}, f"user_id: must be an integer from 1 to {MAX}"),
        (MemberAdd, {"user_id": MAX + 1}, f"user_id: must be an integer from 1 to {MAX}"),
        (MemberAdd, {"user_id": 7.5}, f"user_id: must be an integer from 1 to {MAX}"),
        (MemberAdd, {"user_id": "7"}, f"user_id: must be an integer from 1 to {MAX}"),
        (MemberAdd, {"user_id": True}, f"user_id: must be an integer from 1 to {MAX}"),
        (MemberAdd, {"user_id": None}, f"user_id: must be an integer from 1 to {MAX}"),
        (MemberAdd, b'{"user_id": 1e400}', f"user_id: must be an integer from 1 to {MAX}"),
        (RoomCreate, {"name": "T", "members": [1, -2]}, f"members[1]: must be an integer from 1 to {MAX}"),
        (RoomCreate, {"name": "T", "members": 5}, "members: must be an array, not an integer"),
        (RoomCreate, {"name": "T", "members": list(range(1, 1002))}, "members: must have at most 1000 items"),
        # names
        (RoomCreate, {"name": " \t\u3000"}, "name: must not be blank"),
        (RoomCreate, {"name": ""}, "name: must not be blank"),
        (RoomCreate, {"name": None}, "name: must be a string, not null"),
        (RoomCreate, {"name": "x" * 201}, "name: must be at most 200 characters"),
        (RoomCreate, {}, "name: required"),
        (RoomCreate, {"name": "T", "kind": "party"}, "kind: must be one of assistant, group"),
        (RoomChange, {"name": "  "}, "name: must not be blank"),
        (RoomChange, {"name": None}, "name: must be a string, not null"),
        (RoomChange, {"status": "archived"}, "status: unknown field"),  # refused, as before
        (
            Register,
            {"email": "a@b.co", "password": PW, "name": "Ann\n"},
            "name: must not be blank nor contain control characters",
        ),
        (
            Register,
            {"email": "a@b.co", "password": PW, "name": "  "},
            "name: must not be blank nor contain control characters",
        ),
        (Register, {"email": "a@b.co", "password": PW, "name": "n" * 101}, "name: must be at most 100 characters"),
        (Register, {"email": "a@b.co", "password": PW}, "name: required"),
        (
            Register,
            {"email": "a@b.co\x00", "password": PW, "name": "A"},
            "email: must be an address like name@example.com",
        ),
        (Register, {"email": "a@b", "password": PW, "name": "A"}, "email: must be an address like name@example.com"),
        (Register, {"email": "a@b.co", "password": "short", "name": "A"}, "password: must be at least 8 characters"),
        (
            Register,
            {"email": "a@b.co", "password": 12345678, "name": "A"},
            "password: must be a string, not an integer",
        ),
        (PasswordChange, {"old_password": "", "new_password": PW}, "old_password: must be at least 1 characters"),
        (Refresh, {"refresh_token": ""}, "refresh_token: must be at least 1 characters"),
        (Logout, {"all": 1}, "all: must be a boolean, not an integer"),
        (Logout, {"all": "true"}, "all: must be a boolean, not a string"),
        # the assistant's settings
        (RoomCreate, {"name": "T", "assistant": 5}, "assistant: must be an object or null, not an integer"),
        (RoomCreate, {"name": "T", "assistant": {"mode": "loud"}}, "assistant.mode: must be one of always, mention"),
        (RoomCreate, {"name": "T", "assistant": {"temperature": 1}}, "assistant.temperature: unknown field"),
        (RoomChange, {"assistant": {"model": None}}, "assistant.model: must be a string, not null"),
        (
            RoomChange,
            {"assistant": {"system_prompt": "x" * 20_001}},
            "assistant.system_prompt: must be at most 20000 characters",
        ),
        # messages
        (MessageSend, {"content": " \n", "client_msg_id": "c"}, "content: must not be blank nor contain NUL"),
        (MessageSend, {"content": "a\x00", "client_msg_id": "c"}, "content: must not be blank nor contain NUL"),
        (MessageSend, {"content": "hi"}, "client_msg_id: required"),
        (
            MessageSend,
            {"content": "hi", "client_msg_id": "a b"},
            "client_msg_id: must be 1..64 printable ASCII characters without spaces",
        ),
        (
            MessageSend,
            {"content": "hi", "client_msg_id": "c\n"},
            "client_msg_id: must be 1..64 printable ASCII characters without spaces",
        ),
        (
            MessageSend,
            {"content": "hi", "client_msg_id": "c" * 65},
            "client_msg_id: must be 1..64 printable ASCII characters without spaces",
        ),
        # admin
        (RoleChange, {"role": "root"}, "role: must be one of admin, user"),
        (Broadcast, {"target": "moon", "content": "x"}, "target: must be one of rooms, users"),
        (Announce, {"content": "\u2003"}, "content: must not be blank"),
        (Announce, {"content": "x" * 4001}, "content: must be at most 4000 characters"),
    ],
)
def test_refused_with_one_clear_line(model: type[Body], body: Any, message: str) -> None:
    with pytest.raises(errors.BadRequest) as exc:
        bodies.decode(model, raw(body))
    assert exc.value.message == message
    assert exc.value.code == "bad_request" and exc.value.http_status == 400


def test_the_literals_are_the_services_values() -> None:
    assert set(msgspec.inspect.type_info(RoomCreate).fields[1].type.values) == set(ROOM_KINDS)  # type: ignore[attr-defined]
    modes = msgspec.inspect.type_info(AssistantSettings).fields[2].type  # type: ignore[attr-defined]
    assert set(modes.values) == set(ASSISTANT_MODES)


def _patterns(info: Any) -> list[str]:
    out: list[str] = []
    for f in msgspec.inspect.type_info(info).fields:  # type: ignore[attr-defined]
        t = f.type
        t = t.type if isinstance(t, msgspec.inspect.Metadata) else t
        if isinstance(t, msgspec.inspect.StrType) and t.pattern:
            out.append(t.pattern)
    return out


@pytest.mark.parametrize("model", bodies.MODELS, ids=lambda m: m.__name__)
def test_patterns_mean_the_same_in_python_and_ecma(model: type[Body]) -> None:
    """msgspec matches with Python's re.search, the schema's readers with ECMA-262: no ``$`` (Python's also
    matches before a final newline) and no ``\\s``/``\\w``/``\\d`` shorthands (their sets differ), but in
    ``[\\s\\S]`` (any character in both)."""
    for pattern in _patterns(model):
        rest = pattern.replace(r"[\s\S]", "")
        assert "$" not in rest and not re.search(r"\\[sSwWdDbB]", rest), pattern


@cache
def _validator(model: type[Body]) -> Draft202012Validator:
    """The model's schema as the OpenAPI document publishes it (components, ``$ref``)."""
    spec = {"components": {"schemas": openapi.model_schemas(bodies.MODELS)}}
    registry: Registry[Any] = Registry().with_resource("urn:b", DRAFT202012.create_resource(spec))
    return Draft202012Validator({"$ref": f"urn:b#/components/schemas/{model.__name__}"}, registry=registry)


@pytest.mark.parametrize("model", bodies.MODELS, ids=lambda m: m.__name__)
def test_every_schema_is_valid_json_schema(model: type[Body]) -> None:
    components = openapi.model_schemas([model])
    for schema in components.values():
        Draft202012Validator.check_schema(schema)
    assert components[model.__name__]["type"] == "object"


def _accepts(model: type[Body], body: bytes) -> bool:
    try:
        bodies.decode(model, body)
    except errors.BadRequest:
        return False
    return True


_VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-3, max_value=3),
    st.sampled_from([MAX, MAX + 1, 7.0, 7.5, -1.0, 1e300]),
    st.sampled_from(["", " ", "x", " x ", "x\n", "\n", "a@b.co", "a@b.co\n", "a@b", "c-1", "a b", "\x00", "\u3000"]),
    st.sampled_from(["group", "assistant", "always", "mention", "user", "admin", "rooms", "users", "12345678"]),
    st.text(max_size=12),
)
_JSON = st.recursive(_VALUES, lambda inner: st.lists(inner, max_size=3), max_leaves=6)
_FIELDS = sorted({f for m in bodies.MODELS for f in m.__struct_fields__} | {"extra"})


@pytest.mark.parametrize("model", bodies.MODELS, ids=lambda m: m.__name__)
@settings(max_examples=100, deadline=None)
@given(data=st.data())
def test_the_schema_accepts_exactly_what_the_model_accepts(model: type[Body], data: st.DataObject) -> None:
    validator = _validator(model)
    fields = list(model.__struct_fields__)
    body: dict[str, Any] = data.draw(
        st.dictionaries(
            st.sampled_from(fields + _FIELDS),
            _JSON | st.dictionaries(st.sampled_from(fields + _FIELDS), _VALUES, max_size=3),
            max_size=4,
        )
    )
    encoded = json.dumps(body).encode()
    assert _accepts(model, encoded) == validator.is_valid(body), body


@pytest.mark.parametrize(
    ("model", "body"),
    [
        (MessageSend, {"content": "a" * 200_000 + "\x00", "client_msg_id": "c"}),
        (MessageSend, {"content": " " * 200_000 + "\x00", "client_msg_id": "c"}),
        (MessageSend, {"content": "a " * 100_000, "client_msg_id": "c" * 65}),
        (Register, {"email": " " * 100_000 + "a@b", "password": PW, "name": "A"}),
        (RoomCreate, {"name": " " * 100_000}),
    ],
)
def test_no_pattern_backtracks_on_a_long_value(model: type[Body], body: Any) -> None:
    """A body up to server.max_body_bytes is checked in linear time (a quadratic pattern took 28 s for 32k)."""
    started = time.perf_counter()
    _accepts(model, raw(body))
    assert time.perf_counter() - started < 0.5
