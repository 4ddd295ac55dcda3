"""The layout keeps its layers (docs/ARCHITECTURE.md §1), read from the code's own imports and strings."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

CHATD = Path(__file__).resolve().parents[2] / "chatd"
# Top to bottom: a layer imports only the layers below it (process/ wires them all; every layer may read
# process/config.py, logs.py, metrics.py and state.py).
LAYERS = ["process", "api", "services", "assistant", "realtime", "storage", "core"]
SHARED = {"chatd.process.config", "chatd.process.logs", "chatd.process.metrics", "chatd.process.state"}
IO_LIBRARIES = {"tornado", "redis", "psycopg", "psycopg_pool", "anthropic"}
SQL = re.compile(
    r"^\s*(SELECT |INSERT INTO |UPDATE \w+ SET |DELETE FROM |CREATE (TABLE|INDEX|DATABASE|FUNCTION) |ALTER TABLE |"
    r"WITH \w+ AS |SHOW \w+)"
)


def modules(layer: str) -> list[Path]:
    return sorted((CHATD / layer).rglob("*.py"))


def imports(path: Path) -> set[str]:
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            out.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    return out


@pytest.mark.parametrize("layer", LAYERS)
def test_a_layer_imports_only_the_layers_below_it(layer: str) -> None:
    above = set(LAYERS[: LAYERS.index(layer)])
    wrong = {
        (str(path.relative_to(CHATD)), name)
        for path in modules(layer)
        for name in imports(path)
        if name.startswith("chatd.") and name.split(".")[1] in above and not any(name.startswith(s) for s in SHARED)
    }
    assert wrong == set()


def test_the_core_does_no_io() -> None:
    wrong = {
        (str(path.relative_to(CHATD)), name)
        for path in modules("core")
        for name in imports(path)
        if name.split(".")[0] in IO_LIBRARIES or (name.startswith("chatd.") and not name.startswith("chatd.core"))
    }
    assert wrong == set()


def test_sql_lives_in_storage_only() -> None:
    found = set()
    for path in CHATD.rglob("*.py"):
        if path.is_relative_to(CHATD / "storage"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and SQL.match(node.value):
                found.add((str(path.relative_to(CHATD)), node.value[:40]))
    assert found == set()


def test_the_models_library_stays_with_the_models() -> None:
    """Request bodies are declared with msgspec in chatd/api/ (bodies.py), the socket's client frames in
    core/client_frames.py (the one core module: the session takes those frames); the rest take plain values."""
    wrong = {
        (str(path.relative_to(CHATD)), name)
        for path in CHATD.rglob("*.py")
        if not path.is_relative_to(CHATD / "api") and path != CHATD / "core" / "client_frames.py"
        for name in imports(path)
        if name.split(".")[0] == "msgspec"
    }
    assert wrong == set()
