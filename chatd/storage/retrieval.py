"""The assistant's retrieval index in Postgres: embeddings, the indexer, per-room search.

Which of pgvector and pg_trgm the database offers, the background indexer's
work (messages waiting for an embedding, the lease that keeps it one batch at
a time across instances, the embeddings written), and the two reads a prompt's
context draws on: nearest embeddings (HNSW) or full text + trigram, in one
room, before the prompt (``chatd.assistant.retrieval``).  The user-facing
search over all of a caller's rooms is ``search``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from psycopg import sql

from chatd.storage.db import Database, Row, bounded, connection, fetch_one, transaction, vector_sql

_CAPABILITIES_SQL = """
SELECT
    (SELECT n.nspname FROM pg_extension e JOIN pg_namespace n ON n.oid = e.extnamespace
      WHERE e.extname = 'vector') AS vector_schema,
    (SELECT e.extversion FROM pg_extension e WHERE e.extname = 'vector') AS vector_version,
    (SELECT n.nspname FROM pg_extension e JOIN pg_namespace n ON n.oid = e.extnamespace
      WHERE e.extname = 'pg_trgm') AS trgm_schema,
    to_regclass('message_embeddings') IS NOT NULL AS embeddings_table,
    (SELECT a.atttypmod FROM pg_attribute a
      WHERE a.attrelid = to_regclass('message_embeddings') AND a.attname = 'embedding') AS embeddings_dim
"""

# Messages waiting for an embedding (new, or edited since embedded), oldest first.
_PENDING_SQL = """
SELECT m.id, m.room_id, m.content
  FROM messages m
  JOIN rooms r ON r.id = m.room_id AND r.kind = 'assistant'
  LEFT JOIN message_embeddings e ON e.message_id = m.id
 WHERE m.id > %s AND m.deleted_at IS NULL AND m.role IN ('user', 'assistant') AND btrim(m.content) <> ''
   AND (e.message_id IS NULL OR m.edited_at > e.embedded_at)
 ORDER BY m.id
 LIMIT %s
"""

_INSERT_SQL = """
INSERT INTO message_embeddings (message_id, room_id, embedding)
SELECT u.id, u.room_id, u.embedding::{vector}
  FROM unnest(%s::bigint[], %s::bigint[], %s::text[]) AS u (id, room_id, embedding)
ON CONFLICT (message_id) DO UPDATE SET embedding = EXCLUDED.embedding, embedded_at = now()
"""

# The CTE is materialized so that an HNSW iterative scan (which may return
# rows slightly out of order) is re-sorted exactly.
_VECTOR_SQL = """
WITH hits AS MATERIALIZED (
    SELECT m.id, m.seq, m.role, m.content, m.created_at, e.embedding OPERATOR({schema}.<=>) %s::{vector} AS distance
      FROM message_embeddings e
      JOIN messages m ON m.id = e.message_id
     WHERE e.room_id = %s AND m.room_id = %s AND m.seq < %s AND m.deleted_at IS NULL
       AND m.superseded_at IS NULL AND m.status = 'final'
     ORDER BY e.embedding OPERATOR({schema}.<=>) %s::{vector}
     LIMIT %s
)
SELECT id, seq, role, content, created_at, 1 - distance AS score FROM hits ORDER BY distance, seq DESC
"""

# {hits}: the number of query words found in the content, {any_hit}: at least one found (one ILIKE
# per word, so that a trigram index can serve each); {trgm}: pg_trgm's word_similarity, or 0.
_TEXT_SQL = """
SELECT m.id, m.seq, m.role, m.content, m.created_at,
       ({hits})::float8 / %(n_terms)s
       + ts_rank(m.content_tsv, to_tsquery('simple', %(tsq)s))
       + {trgm_weight} * {trgm} AS score
  FROM messages m
 WHERE m.room_id = %(room_id)s AND m.seq < %(before_seq)s AND m.deleted_at IS NULL
  AND m.superseded_at IS NULL AND m.status = 'final'
   AND m.role IN ('user', 'assistant')
   AND (m.content_tsv @@ to_tsquery('simple', %(tsq)s) OR {any_hit})
 ORDER BY score DESC, m.seq DESC
 LIMIT %(k)s
"""


@bounded
async def retrieval_capabilities(pool: Database) -> Row:
    """Which extensions and embedding table the database offers."""
    row = await fetch_one(pool, _CAPABILITIES_SQL)
    assert row is not None
    return row


@bounded
async def take_indexer_lease(pool: Database, holder: str, ttl_s: float) -> bool:
    """The indexing lease (one batch at a time across all instances): True when ``holder`` has it now."""
    row = await fetch_one(
        pool,
        "INSERT INTO indexer_lease AS l (id, holder, until) VALUES (1, %s, now() + make_interval(secs => %s))"
        " ON CONFLICT (id) DO UPDATE SET holder = EXCLUDED.holder, until = EXCLUDED.until"
        " WHERE l.until < now() OR l.holder = EXCLUDED.holder RETURNING holder",
        (holder, ttl_s),
    )
    return row is not None


@bounded
async def release_indexer_lease(pool: Database, holder: str) -> None:
    await fetch_one(pool, "UPDATE indexer_lease SET until = now() WHERE id = 1 AND holder = %s RETURNING id", (holder,))


@bounded
async def pending_embeddings(pool: Database, after_id: int, batch_size: int) -> tuple[list[Row], int | None]:
    """Messages waiting for an embedding, ids after ``after_id``; and the largest message id when the
    scan reached the end (None otherwise)."""
    async with connection(pool) as conn:
        cur = await conn.execute(_PENDING_SQL, (after_id, batch_size))
        rows = await cur.fetchall()
        max_id: int | None = None
        if len(rows) < batch_size:  # the pass reached the end
            cur = await conn.execute("SELECT coalesce(max(id), 0) AS max_id FROM messages")
            top = await cur.fetchone()
            max_id = int(top["max_id"]) if top else 0
    return rows, max_id


@bounded
async def store_embeddings(
    pool: Database, vector_schema: str, holder: str, rows: Sequence[Row], vectors: Sequence[str]
) -> None:
    """Write a batch's embeddings and give the indexing lease back."""
    async with transaction(pool) as conn:
        if rows:
            await conn.execute(
                vector_sql(_INSERT_SQL, vector_schema),
                ([r["id"] for r in rows], [r["room_id"] for r in rows], list(vectors)),
            )
        await conn.execute("UPDATE indexer_lease SET until = now() WHERE id = 1 AND holder = %s", (holder,))


@bounded
async def vector_search(
    pool: Database, vector_schema: str, iterative: bool, literal: str, room_id: int, before_seq: int, k: int
) -> list[Row]:
    async with transaction(pool) as conn:
        if iterative:
            # Keep scanning the graph until k rows pass the room filter (pgvector >= 0.8).
            await conn.execute("SET LOCAL hnsw.iterative_scan = relaxed_order")
        else:
            await conn.execute("SET LOCAL hnsw.ef_search = 400")
        cur = await conn.execute(
            vector_sql(_VECTOR_SQL, vector_schema), (literal, room_id, room_id, before_seq, literal, k)
        )
        return await cur.fetchall()


@bounded
async def text_search(
    pool: Database,
    trgm_schema: str | None,
    trgm_weight: float,
    patterns: Sequence[str],
    tsquery: str,
    query: str,
    room_id: int,
    before_seq: int,
    k: int,
) -> list[Row]:
    """Full-text + substring (+ trigram) ranking; ``patterns`` are ILIKE patterns, one per query word."""
    if trgm_schema is not None:
        trgm: sql.Composable = sql.SQL("{}.word_similarity(%(query)s, m.content)").format(sql.Identifier(trgm_schema))
    else:
        trgm = sql.SQL("0")
    likes = [sql.SQL("m.content ILIKE {}").format(sql.Placeholder(f"p{i}")) for i in range(len(patterns))]
    statement = sql.SQL(_TEXT_SQL).format(
        hits=sql.SQL(" + ").join(sql.SQL("({})::int").format(like) for like in likes),
        any_hit=sql.SQL(" OR ").join(likes),
        trgm=trgm,
        trgm_weight=sql.Literal(trgm_weight),
    )
    params: dict[str, Any] = {f"p{i}": p for i, p in enumerate(patterns)}
    params.update(tsq=tsquery, n_terms=len(patterns), query=query, room_id=room_id, before_seq=before_seq, k=k)
    async with connection(pool) as conn:
        cur = await conn.execute(statement, params)
        return await cur.fetchall()
