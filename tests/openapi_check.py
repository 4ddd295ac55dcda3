"""Validate real responses against chatd's own OpenAPI document (jsonschema, draft 2020-12)."""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import urlparse

from jsonschema import Draft202012Validator
from referencing import Registry
from referencing.jsonschema import DRAFT202012

from tests.support import Response, request


class Contract:
    def __init__(self, spec: dict[str, Any]) -> None:
        self.spec = spec
        self.registry = Registry().with_resource("urn:chatd", DRAFT202012.create_resource(spec))
        self.paths: list[tuple[re.Pattern[str], str]] = [
            (re.compile("^" + re.sub(r"\{\w+\}", "[^/]+", p) + "$"), p) for p in sorted(spec["paths"], key=len)
        ]
        self.checked: list[tuple[str, str, int]] = []

    def template(self, path: str) -> str:
        matches = [t for rx, t in self.paths if rx.match(path)]
        assert matches, f"{path} is not in the OpenAPI document"
        return min(matches, key=lambda t: t.count("{"))  # /rooms/{id}/messages before /rooms/{id}/{x}

    def validate(self, method: str, url: str, response: Response) -> None:
        path = urlparse(url).path
        tmpl = self.template(path)
        operation = self.spec["paths"][tmpl].get(method.lower())
        assert operation is not None, f"{method} {tmpl} is not in the OpenAPI document"
        responses = operation["responses"]
        declared = responses.get(str(response.status)) or responses["default"]
        if response.status < 400:
            assert str(response.status) in responses, f"{method} {tmpl}: undeclared status {response.status}"
        content = declared.get("content")
        if content is None:
            assert not response.body, f"{method} {tmpl} {response.status}: undeclared body {response.body!r}"
            return
        schema = next(iter(content.values()))["schema"]
        if "application/json" not in content:
            return  # files, SSE, metrics: not JSON
        validator = Draft202012Validator(_rooted(schema), registry=self.registry)
        errors = sorted(validator.iter_errors(response.body), key=lambda e: list(e.path))
        assert not errors, f"{method} {tmpl} {response.status}: {errors[0].message} at {list(errors[0].path)}"
        self.checked.append((method.upper(), tmpl, response.status))


def _rooted(schema: dict[str, Any]) -> Any:
    """Component references ('#/components/...') resolved against the whole document."""
    return _rewrite(schema)


def _rewrite(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: ("urn:chatd" + v if k == "$ref" and v.startswith("#/") else _rewrite(v)) for k, v in node.items()}
    if isinstance(node, list):
        return [_rewrite(v) for v in node]
    return node


class Api:
    """``request`` plus contract validation of every answer."""

    def __init__(self, base: str, contract: Contract) -> None:
        self.base = base
        self.contract = contract

    async def __call__(
        self,
        method: str,
        path: str,
        body: Any = None,
        token: str | None = None,
        headers: dict[str, str] | None = None,
        raw_body: bytes | None = None,
    ) -> Response:
        url = self.base + path
        r = await request(method, url, body, token, headers, raw_body)
        self.contract.validate(method, url, r)
        return r


async def contract_for(base: str) -> Contract:
    r = await request("GET", base + "/api/v1/openapi.json")
    assert r.status == 200, r.body
    return Contract(r.body)
