"""The OpenAPI document built from the route table, without a server: valid OpenAPI 3.1, and every request body
is a ``$ref`` to the model its handler decodes with (chatd/api/bodies.py)."""

from __future__ import annotations

import ast
import inspect
import textwrap
from typing import Any

import pytest

from chatd.api import bodies, openapi, responses, routes
from chatd.core import errors


def _document() -> dict[str, Any]:
    table = routes.routes(None, None, None, None, None, None, None, None, {})  # type: ignore[arg-type]
    return openapi.document(table, "test")


def test_the_document_is_valid_openapi_3_1() -> None:
    validator = pytest.importorskip("openapi_spec_validator")
    validator.validate(_document())


def test_every_json_body_is_a_model_component() -> None:
    spec = _document()
    schemas = spec["components"]["schemas"]
    used = set()
    for item in spec["paths"].values():
        for operation in item.values():
            content = operation.get("requestBody", {}).get("content", {})
            if "application/json" in content:
                target = content["application/json"]["schema"]["$ref"].rsplit("/", 1)[1]
                assert target in schemas
                used.add(target)
    # every model is some operation's body (AssistantSettings: inside RoomCreate and RoomChange)
    assert used | {"AssistantSettings"} == {m.__name__ for m in bodies.MODELS}
    assert schemas["RoomChange"]["properties"]["assistant"] == {
        "anyOf": [{"$ref": "#/components/schemas/AssistantSettings"}, {"type": "null"}]
    }
    assert schemas["MemberAdd"]["properties"]["user_id"] == bodies.Id.SCHEMA


def _decoded_models(fn: Any) -> set[str]:
    """The models a handler method passes to ``self.body(...)``."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(fn)))
    return {
        node.args[0].id
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr == "body"
        and node.args
        and isinstance(node.args[0], ast.Name)
    }


def test_each_handler_decodes_the_body_it_declares() -> None:
    table = routes.routes(None, None, None, None, None, None, None, None, {})  # type: ignore[arg-type]
    for path, method, handler, decl in openapi.operations(table):
        assert decl is not None
        fn = getattr(handler, method)
        declared = {decl.body.__name__} if decl.body is not None else set()
        assert _decoded_models(fn) == declared, (path, method)


def _refs(node: Any) -> set[str]:
    if isinstance(node, dict):
        return {v for k, v in node.items() if k == "$ref"} | {r for v in node.values() for r in _refs(v)}
    if isinstance(node, list):
        return {r for v in node for r in _refs(v)}
    return set()


def test_every_reference_has_its_component() -> None:
    spec = _document()
    names = {r.rsplit("/", 1)[1] for r in _refs(spec)}
    assert names <= set(spec["components"]["schemas"]), names - set(spec["components"]["schemas"])
    # no response model left unused (FileInfo: what Message.data holds for kind file, named in its description)
    assert {m.__name__ for m in responses.MODELS} - {"FileInfo"} <= names


def test_the_error_schema_lists_every_error_code() -> None:
    def codes(cls: type[errors.ChatdError]) -> set[str]:
        return {cls.code} | {c for sub in cls.__subclasses__() for c in codes(sub)}

    detail = _document()["components"]["schemas"]["ErrorDetail"]
    assert set(detail["properties"]["code"]["enum"]) == codes(errors.ChatdError)


def test_the_search_modes_are_the_services() -> None:
    from chatd.services.search import MODES

    assert set(_document()["components"]["schemas"]["SearchResults"]["properties"]["mode"]["enum"]) == set(MODES)
