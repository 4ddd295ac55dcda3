"""Message search over the caller's rooms: full text, semantic, or both fused.

* ``text``: Postgres full text ('simple' config, prefix terms, so Korean
  particles stay attached: '서울:*' finds '서울에서') OR substring (ILIKE,
  served by the pg_trgm index), ranked by share of terms found + ts_rank +
  trigram word similarity (``storage.search.search_text``).
* ``semantic``: the query embedded like the retrieval's queries and matched
  in ``message_embeddings`` (HNSW, iterative scan), which holds the messages
  the retrieval indexer embedded (assistant rooms).
* ``hybrid``: both lists fused by reciprocal rank (k = 60).

Snippets carry ``highlights`` (character offsets) rather than markup, so no
client has to trust HTML from a message.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

from chatd.assistant.retrieval import _WORD, Retriever, like_pattern, query_terms, tsquery_text
from chatd.core import errors, server_frames
from chatd.storage import search as search_db
from chatd.storage.db import Database

Mode = Literal["text", "semantic", "hybrid"]
MODES: tuple[Mode, ...] = ("text", "semantic", "hybrid")
RRF_K = 60
SNIPPET_CHARS = 160
MAX_OFFSET = 1000
MAX_TERMS = 8


def terms_of(query: str) -> list[str]:
    """The retrieval's terms (stop words and particles dropped); the raw words if that leaves none."""
    terms = query_terms(query, MAX_TERMS)
    if terms:
        return terms
    seen: list[str] = []
    for word in _WORD.findall(query.lower()):
        if word not in seen:
            seen.append(word)
    return seen[:MAX_TERMS]


def rrf(lists: Sequence[Sequence[dict[str, Any]]], k: int = RRF_K) -> list[dict[str, Any]]:
    """Reciprocal rank fusion: score = sum of 1 / (k + rank) over the lists a row appears in."""
    scores: dict[int, float] = {}
    rows: dict[int, dict[str, Any]] = {}
    for ranked in lists:
        for rank, row in enumerate(ranked, start=1):
            scores[row["id"]] = scores.get(row["id"], 0.0) + 1.0 / (k + rank)
            rows.setdefault(row["id"], row)
    order = sorted(scores, key=lambda i: (-scores[i], -i))
    return [rows[i] | {"score": scores[i]} for i in order]


def snippet(content: str, terms: Sequence[str]) -> tuple[str, list[list[int]]]:
    """About ``SNIPPET_CHARS`` characters around the first term found, and where each term occurs in it."""
    low = content.lower()
    hits = sorted((i, len(t)) for t in terms for i in _occurrences(low, t))
    start = 0
    if hits and len(content) > SNIPPET_CHARS:
        start = max(0, min(hits[0][0] - SNIPPET_CHARS // 4, len(content) - SNIPPET_CHARS))
    text = content[start : start + SNIPPET_CHARS]
    marks: list[list[int]] = []
    last_end = -1
    for i, n in hits:
        a, b = i - start, i - start + n
        if a >= 0 and b <= len(text) and a >= last_end:
            marks.append([a, b])
            last_end = b
    return text, marks


def _occurrences(text: str, term: str) -> list[int]:
    out: list[int] = []
    i = text.find(term)
    while i >= 0 and len(out) < 50:
        out.append(i)
        i = text.find(term, i + len(term))
    return out


class Search:
    def __init__(self, db: Database, retriever: Retriever) -> None:
        self.db = db
        self.retriever = retriever

    async def search(
        self, user_id: int, query: str, room_id: int | None, mode: Mode, limit: int, offset: int
    ) -> dict[str, Any]:
        query = query.strip()
        if not query or len(query) > 500:
            raise errors.BadRequest("q must be 1 to 500 characters")
        if offset > MAX_OFFSET:
            raise errors.BadRequest(f"cursor beyond {MAX_OFFSET}")
        terms = terms_of(query)
        if mode == "text":
            rows = await self._text(user_id, query, terms, room_id, limit + 1, offset)
        elif mode == "semantic":
            rows = await self._semantic(user_id, query, room_id, limit + 1, offset)
        else:
            depth = min(2 * (offset + limit + 1), 400)
            fused = rrf(
                [
                    await self._text(user_id, query, terms, room_id, depth, 0),
                    await self._semantic(user_id, query, room_id, depth, 0),
                ]
            )
            rows = fused[offset : offset + limit + 1]
        more = len(rows) > limit
        hits = []
        for row in rows[:limit]:
            text, marks = snippet(row["content"], terms)
            hits.append(
                {
                    "room_id": row["room_id"],
                    "message_id": row["id"],
                    "seq": row["seq"],
                    "sender_id": row["sender_id"],
                    "role": row["role"],
                    "kind": row["kind"],
                    "created_at": server_frames.iso(row["created_at"]),
                    "score": round(float(row["score"]), 6),
                    "snippet": text,
                    "highlights": marks,
                }
            )
        return {"hits": hits, "mode": mode, "next_cursor": offset + limit if more else None}

    async def _text(
        self, user_id: int, query: str, terms: list[str], room_id: int | None, limit: int, offset: int
    ) -> list[dict[str, Any]]:
        if not terms:
            return []
        return await search_db.search_text(
            self.db,
            trgm_schema=self.retriever.trgm_schema,
            patterns=[like_pattern(t) for t in terms],
            tsquery=tsquery_text(terms),
            query=query,
            user_id=user_id,
            room_id=room_id,
            limit=limit,
            offset=offset,
        )

    async def _semantic(
        self, user_id: int, query: str, room_id: int | None, limit: int, offset: int
    ) -> list[dict[str, Any]]:
        vec = await self.retriever.query_vector(query)
        if vec is None:
            raise errors.Unavailable(f"semantic search is off: {self.retriever.reason or 'no embeddings'}")
        literal, iterative, schema = vec
        return await search_db.search_vector(
            self.db,
            vector_schema=schema,
            iterative=iterative,
            literal=literal,
            user_id=user_id,
            room_id=room_id,
            limit=limit,
            offset=offset,
        )
