"""Decode + validate three typical REST request bodies: msgspec, pydantic v2 and the hand-written checks
chatd had before (issue 17, "request and response bodies declared once"; docs/BENCHMARKS.md).

    .venv/bin/python loadtest/bench_bodies.py

msgspec runs chatd's own models (chatd/api/bodies.py) through ``bodies.decode``, as a handler does; pydantic gets
the same rules and patterns (ids 1..2^53-1 with ``7.0`` accepted, names not blank, strict types, unknown members
ignored or refused as in chatd); the hand code is a copy of the checks chatd had before.  All decode from the raw
bytes.  Prints microseconds per body (the best of 50 runs of 2,000 calls) for each body and library.
"""

from __future__ import annotations

import json
import timeit
from typing import Annotated, Any, Literal

import pydantic

from chatd.api import bodies
from chatd.api.bodies import CLIENT_MSG_ID_PATTERN, CONTENT_PATTERN, EMAIL_PATTERN, NAME_PATTERN, NOT_BLANK
from chatd.core import client_frames, errors
from chatd.services import credentials

MAX = 2**53 - 1
ROOM = b'{"name":"Team chat","kind":"assistant","members":[2,3,4.0],"assistant":{"mode":"always"}}'
SEND = b'{"content":"Hello, how are you doing today? A short message.","client_msg_id":"c-01HF8Z2X"}'
REGISTER = b'{"email":"ann@example.com","password":"correct horse battery","name":"Ann Lee"}'


# -- the hand code (chatd/api/rooms.py, messages.py, services/accounts.py before the models) ------------------


def body_id(value: Any) -> int | None:
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, int) and not isinstance(value, bool) and 0 < value <= MAX:
        return value
    return None


def hand_room(raw: bytes) -> Any:
    body = json.loads(raw)
    if not isinstance(body, dict):
        raise errors.BadRequest("request body must be a JSON object")
    kind = body.get("kind", "group")
    if kind not in ("group", "assistant"):
        raise errors.BadRequest("kind")
    listed = body.get("members", [])
    ids = [body_id(m) for m in listed] if isinstance(listed, list) else [None]
    members = [m for m in ids if m is not None]
    if len(members) != len(ids) or len(members) > 1000:
        raise errors.BadRequest("members")
    value = body.get("assistant")
    out: dict[str, Any] = {"mode": "always"}
    if value is not None:
        if not isinstance(value, dict):
            raise errors.BadRequest("assistant")
        for key in ("model", "system_prompt"):
            if key in value and (not isinstance(value[key], str) or len(value[key]) > 20_000):
                raise errors.BadRequest(key)
        if "mode" in value and value["mode"] not in ("always", "mention"):
            raise errors.BadRequest("mode")
        if set(value) - {"model", "system_prompt", "mode"}:
            raise errors.BadRequest("unknown")
        out |= value
    name = body.get("name")
    if not isinstance(name, str) or not name.strip() or len(name) > 200:
        raise errors.BadRequest("name")
    return name.strip(), kind, members, out


def hand_send(raw: bytes) -> Any:
    body = json.loads(raw)
    if not isinstance(body, dict):
        raise errors.BadRequest("request body must be a JSON object")
    frame = {"type": "send", "room_id": 1, "content": body.get("content"), "client_msg_id": body.get("client_msg_id")}
    return client_frames.parse_client_frame(frame, max_message_chars=4000)


def hand_register(raw: bytes) -> Any:
    body = json.loads(raw)
    if not isinstance(body, dict):
        raise errors.BadRequest("request body must be a JSON object")
    email = credentials.validate_email(body.get("email"))
    return email, credentials.validate_password(body.get("password")), credentials.validate_name(body.get("name"))


# -- msgspec: chatd's own models (chatd/api/bodies.py), through the handlers' decode ------------------------------

MSG: dict[str, Any] = {
    "room": lambda raw: bodies.decode(bodies.RoomCreate, raw),
    "send": lambda raw: bodies.decode(bodies.MessageSend, raw),
    "register": lambda raw: bodies.decode(bodies.Register, raw),
}


# -- pydantic v2 ---------------------------------------------------------------------------------------------


def _id(value: Any) -> Any:
    return int(value) if isinstance(value, float) and value.is_integer() else value


PydId = Annotated[int, pydantic.BeforeValidator(_id), pydantic.Strict(), pydantic.Field(ge=1, le=MAX)]
# chatd's patterns end in a lookahead (bodies.END): pydantic's default Rust engine has no lookaround.
_STRICT = pydantic.ConfigDict(strict=True, regex_engine="python-re")


class PydAssistant(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(strict=True, extra="forbid", regex_engine="python-re")
    model: Annotated[str, pydantic.Field(max_length=20_000)] | None = None
    system_prompt: Annotated[str, pydantic.Field(max_length=20_000)] | None = None
    mode: Literal["always", "mention"] | None = None


class PydRoom(pydantic.BaseModel):
    model_config = _STRICT
    name: Annotated[str, pydantic.Field(max_length=200, pattern=NOT_BLANK)]
    kind: Literal["group", "assistant"] = "group"
    members: Annotated[list[PydId], pydantic.Field(max_length=1000)] = []
    assistant: PydAssistant | None = None


class PydSend(pydantic.BaseModel):
    model_config = _STRICT
    content: Annotated[str, pydantic.Field(max_length=4000, pattern=CONTENT_PATTERN)]
    client_msg_id: Annotated[str, pydantic.Field(pattern=CLIENT_MSG_ID_PATTERN)]


class PydRegister(pydantic.BaseModel):
    model_config = _STRICT
    email: Annotated[str, pydantic.Field(max_length=254, pattern=EMAIL_PATTERN)]
    password: Annotated[str, pydantic.Field(min_length=8, max_length=1024)]
    name: Annotated[str, pydantic.Field(max_length=100, pattern=NAME_PATTERN)]


PYD: dict[str, type[pydantic.BaseModel]] = {"room": PydRoom, "send": PydSend, "register": PydRegister}


def main() -> None:
    raws = {"room": ROOM, "send": SEND, "register": REGISTER}
    hand = {"room": hand_room, "send": hand_send, "register": hand_register}
    n, repeat = 2_000, 50  # short runs, many: the best one is the least disturbed on a shared machine
    print(f"{'body':<10}{'hand (json + checks)':>22}{'msgspec':>12}{'pydantic v2':>14}   us per body, best run")
    for name, raw in raws.items():
        def by_hand(raw: bytes = raw, name: str = name) -> object:
            return hand[name](raw)

        def by_msgspec(raw: bytes = raw, name: str = name) -> object:
            return MSG[name](raw)

        def by_pydantic(raw: bytes = raw, name: str = name) -> object:
            return PYD[name].model_validate_json(raw)

        fns = [by_hand, by_msgspec, by_pydantic]
        for fn in fns:
            fn()  # each accepts the body
        us = [min(timeit.repeat(fn, number=n, repeat=repeat)) / n * 1e6 for fn in fns]
        print(f"{name:<10}{us[0]:>22.2f}{us[1]:>12.2f}{us[2]:>14.2f}")


if __name__ == "__main__":
    main()
