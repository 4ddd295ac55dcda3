"""OpenAPI 3.1 of the REST API, generated from the declarations the handlers use.

Each handler method carries an ``Op`` (``@op(...)``): its query parameters
(which ``ApiHandler.arg`` parses and checks, so a parameter the handler reads
is a declared one), its request body and its responses.  ``document`` walks
the very route list the application registers (``api.routes``), so a route
cannot exist without being described.  Pure: no I/O.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

F = TypeVar("F", bound=Callable[..., Any])

METHODS = ("get", "post", "put", "patch", "delete")


def ref(name: str) -> dict[str, Any]:
    return {"$ref": f"#/components/schemas/{name}"}


def nullable(schema: dict[str, Any]) -> dict[str, Any]:
    return {"anyOf": [schema, {"type": "null"}]}


MAX_SAFE_INT = 2**53 - 1
MAX_QUERY_CHARS = 1000  # a string query parameter without its own maxLength
INT = {"type": "integer"}
ID = {"type": "integer", "minimum": 1, "maximum": MAX_SAFE_INT}
STR = {"type": "string"}
BOOL = {"type": "boolean"}
TIME = {"type": "string", "format": "date-time"}


def obj(props: Mapping[str, Any], required: Iterable[str] | None = None, extra: bool = False) -> dict[str, Any]:
    """An object schema; every property required unless ``required`` says otherwise."""
    return {
        "type": "object",
        "properties": dict(props),
        "required": sorted(props if required is None else required),
        "additionalProperties": extra,
    }


def page(item: str, key: str, cursor: bool = True) -> dict[str, Any]:
    props: dict[str, Any] = {key: {"type": "array", "items": ref(item)}}
    if cursor:
        props["next_cursor"] = nullable(INT)
    return obj(props)


@dataclass(frozen=True)
class Param:
    name: str
    schema: dict[str, Any]
    description: str = ""
    required: bool = False


@dataclass(frozen=True)
class Op:
    summary: str
    tag: str
    responses: Mapping[int, tuple[str, dict[str, Any] | None]]  # status -> (description, JSON schema or None)
    auth: bool = True
    query: tuple[Param, ...] = ()
    body: dict[str, Any] | None = None  # JSON request body schema
    body_required: bool = True
    multipart: dict[str, Any] | None = None  # multipart/form-data request body schema
    content_type: str = "application/json"  # of the success responses
    description: str = ""
    params: Mapping[str, Param] = field(default_factory=dict)

    def param(self, name: str) -> Param:
        for p in self.query:
            if p.name == name:
                return p
        raise KeyError(f"query parameter {name!r} is not declared for {self.summary!r}")


def query_schema(param: Param) -> dict[str, Any]:
    """A query parameter's schema with the bounds ``ApiHandler.arg`` applies when the declaration omits them."""
    schema = dict(param.schema)
    if schema.get("type") == "integer":
        schema.setdefault("minimum", 0)
        schema.setdefault("maximum", MAX_SAFE_INT)
    elif schema.get("type") == "string" and "enum" not in schema:
        schema.setdefault("maxLength", MAX_QUERY_CHARS)
    return schema


def op(**kwargs: Any) -> Callable[[F], F]:
    """Declare a handler method's contract (query parameters, body, responses)."""

    def mark(fn: F) -> F:
        fn.__openapi__ = Op(**kwargs)  # type: ignore[attr-defined]
        return fn

    return mark


def op_of(fn: Any) -> Op | None:
    return getattr(fn, "__openapi__", None)


_GROUP = re.compile(r"\([^)]*\)")


def template(pattern: str, names: list[str]) -> str:
    """``/rooms/([^/]+)/members`` + ``["room_id"]`` -> ``/rooms/{room_id}/members``."""
    it = iter(names)
    return _GROUP.sub(lambda _: "{" + next(it) + "}", pattern).rstrip("$")


def path_names(handler: type, method: str) -> list[str]:
    fn = getattr(handler, method)
    return [p for p in inspect.signature(fn).parameters if p != "self"]


def operations(routes: Iterable[tuple[str, type, Any]]) -> list[tuple[str, str, type, Op | None]]:
    """(path template, method, handler, declaration) of every method a route's handler defines."""
    out = []
    for pattern, handler, *_ in routes:
        for method in METHODS:
            owner = next((c for c in handler.__mro__ if method in c.__dict__), None)
            if owner is None or not owner.__module__.startswith("chatd"):
                continue  # Tornado's unimplemented default (405)
            fn = owner.__dict__[method]
            out.append((template(pattern, path_names(handler, method)), method, handler, op_of(fn)))
    return out


def document(routes: Iterable[tuple[str, type, Any]], version: str) -> dict[str, Any]:
    paths: dict[str, dict[str, Any]] = {}
    for path, method, handler, decl in operations(routes):
        if decl is None:
            raise ValueError(f"{handler.__name__}.{method} has no @op declaration")
        item: dict[str, Any] = {
            "operationId": f"{handler.__name__}.{method}",
            "summary": decl.summary,
            "tags": [decl.tag],
            "responses": {},
        }
        if decl.description:
            item["description"] = decl.description
        params = [
            {"name": n, "in": "path", "required": True, "schema": dict(STR)} for n in re.findall(r"\{(\w+)\}", path)
        ]
        params += [
            {"name": p.name, "in": "query", "required": p.required, "schema": query_schema(p)}
            | ({"description": p.description} if p.description else {})
            for p in decl.query
        ]
        if params:
            item["parameters"] = params
        if decl.body is not None:
            item["requestBody"] = {
                "required": decl.body_required,
                "content": {"application/json": {"schema": decl.body}},
            }
        if decl.multipart is not None:
            item["requestBody"] = {"required": True, "content": {"multipart/form-data": {"schema": decl.multipart}}}
        if decl.auth:
            item["security"] = [{"bearer": []}]
        for status, (description, schema) in decl.responses.items():
            response: dict[str, Any] = {"description": description}
            if schema is not None:
                ctype = decl.content_type if 200 <= status < 300 else "application/json"
                response["content"] = {ctype: {"schema": schema}}
            item["responses"][str(status)] = response
        item["responses"]["default"] = {
            "description": "Error (docs/API.md, error shape)",
            "content": {"application/json": {"schema": ref("Error")}},
        }
        paths.setdefault(path, {})[method] = item
    return {
        "openapi": "3.1.0",
        "info": {"title": "chatd REST API", "version": version, "description": "See docs/API.md."},
        "jsonSchemaDialect": "https://spec.openapis.org/oas/3.1/dialect/base",
        "paths": paths,
        "components": {
            "schemas": SCHEMAS,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"}},
        },
    }


# -- component schemas ------------------------------------------------------------------

_ERROR_CODES = [
    "bad_request",
    "unauthorized",
    "forbidden",
    "not_found",
    "method_not_allowed",
    "conflict",
    "too_large",
    "unsupported_type",
    "range_not_satisfiable",
    "rate_limited",
    "quota_exceeded",
    "busy",
    "unavailable",
    "llm_unavailable",
    "internal",
]

SCHEMAS: dict[str, Any] = {
    "Error": obj(
        {
            "error": obj(
                {
                    "code": {"type": "string", "enum": _ERROR_CODES},
                    "message": STR,
                    "retry_after_ms": INT,
                    "details": {"type": "object"},
                },
                required=["code", "message"],
            )
        }
    ),
    "User": obj(
        {
            "id": ID,
            "email": STR,
            "name": STR,
            "role": {"enum": ["user", "admin"]},
            "status": {"enum": ["active", "banned", "deleted"]},
            "created_at": TIME,
        }
    ),
    "UserRef": obj({"id": ID, "name": STR}),
    "Tokens": obj(
        {
            "user": ref("User"),
            "access_token": STR,
            "refresh_token": STR,
            "token_type": {"const": "Bearer"},
            "expires_in": INT,
        }
    ),
    "Room": obj(
        {
            "id": ID,
            "name": STR,
            "kind": {"enum": ["group", "assistant"]},
            "owner_id": ID,
            "status": {"enum": ["active", "archived"]},
            "assistant": nullable({"type": "object"}),
            "last_seq": INT,
            "created_at": TIME,
            "updated_at": TIME,
            "read_seq": INT,
            "unread_count": INT,
            "last_message": nullable({"type": "object"}),
        },
        required=["id", "name", "kind", "owner_id", "status", "assistant", "last_seq", "created_at", "updated_at"],
    ),
    "FileInfo": obj(
        {
            "file_id": ID,
            "name": STR,
            "content_type": STR,
            "size": INT,
            "sha256": {"type": "string", "pattern": "^[0-9a-f]{64}$"},
            "width": nullable(INT),
            "height": nullable(INT),
        }
    ),
    "Message": obj(
        {
            "room_id": ID,
            "message_id": ID,
            "seq": INT,
            "sender_id": nullable(ID),
            "role": {"enum": ["user", "assistant", "system"]},
            "kind": {"enum": ["text", "file", "system"]},
            "content": STR,
            "client_msg_id": nullable(STR),
            "created_at": TIME,
            "edited_at": nullable(TIME),
            "deleted": BOOL,
            "reply_to_message_id": ID,
            "status": {"enum": ["cancelled", "error"]},
            "superseded": BOOL,
            "data": {"type": "object", "description": "kind file: FileInfo; kind system: {event, user_id, ...}"},
            "duplicate": BOOL,
            "assistant": {"type": "object"},
        },
        required=[
            "room_id",
            "message_id",
            "seq",
            "sender_id",
            "role",
            "kind",
            "content",
            "client_msg_id",
            "created_at",
            "edited_at",
            "deleted",
        ],
    ),
    "Member": obj(
        {
            "id": ID,
            "name": STR,
            "status": {"enum": ["active", "banned", "deleted"]},
            "role": {"enum": ["owner", "member"]},
            "online": BOOL,
            "read_seq": INT,
            "joined_at": TIME,
        }
    ),
    "SearchHit": obj(
        {
            "room_id": ID,
            "message_id": ID,
            "seq": INT,
            "sender_id": nullable(ID),
            "role": {"enum": ["user", "assistant", "system"]},
            "kind": {"enum": ["text", "file", "system"]},
            "created_at": TIME,
            "score": {"type": "number"},
            "snippet": STR,
            "highlights": {
                "type": "array",
                "items": {"type": "array", "items": INT, "minItems": 2, "maxItems": 2},
            },
        }
    ),
    "AuditEntry": obj(
        {
            "id": ID,
            "actor_id": ID,
            "action": STR,
            "target": nullable(STR),
            "details": nullable({"type": "object"}),
            "ip": nullable(STR),
            "status": INT,
            "created_at": TIME,
        }
    ),
    "AdminMessage": obj(
        {
            "message": ref("Message"),
            "deleted_at": nullable(TIME),
            "deleted_by": nullable(ID),
        }
    ),
    "Usage": obj(
        {
            "daily_token_budget": INT,
            "tokens_today": INT,
            "remaining_today": nullable(INT),
            "days": {
                "type": "array",
                "items": obj({"day": STR, "answers": INT, "input_tokens": INT, "output_tokens": INT}),
            },
        }
    ),
}
