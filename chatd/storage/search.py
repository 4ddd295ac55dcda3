"""Message search for users in Postgres: text and semantic, over the caller's rooms.

What ``chatd.services.search`` ranks: full text + substring + trigram over a
bounded set of the newest candidates, or the retrieval index's embeddings, one
page at a time.  Apart from ``retrieval`` because the scope (every room of the
caller) and the plans differ: the statements are built per query and never
prepared, so the planner sees the patterns and can use the trigram index.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from psycopg import sql

from chatd.storage.db import Database, Row, bounded, connection, transaction, vector_sql

# The caller's rooms (or one of them), resolved once; messages of those rooms only.
_SEARCH_ROOMS = (
    "SELECT room_id FROM room_members WHERE user_id = %(user_id)s AND (%(room_id)s::bigint IS NULL"
    " OR room_id = %(room_id)s)"
)

# Candidates: full text ('simple' config, prefix terms, so Korean particles stay attached: '서울:*' finds
# '서울에서') OR substring for terms of 3+ characters (ILIKE, served by the pg_trgm index; a 2-character
# pattern has no trigram, and one unindexable branch would turn the whole OR into a scan of every row).
# The newest CANDIDATES of them are ranked by share of terms found (any length) + ts_rank (+ trigram
# word similarity), newest first among equals.
SEARCH_CANDIDATES = 1000
# Up to this many rooms in scope, candidates are read room by room (newest first, through the room's seq
# index); beyond it, newest first over the whole table (the indexes).  Postgres cannot tell which is cheaper:
# it assumes the caller's rooms are spread evenly over the table, so for a member of 20 rooms out of 1000
# it walks the whole table backwards (300 ms over 1M messages instead of 20).
SEARCH_PER_ROOM_MAX = 100
_SEARCH_MATCH = "(m.content_tsv @@ to_tsquery('simple', %(tsq)s) OR {indexed_hit})"
_CANDIDATES_GLOBAL = (
    """
    SELECT m.id FROM messages m
     WHERE m.room_id IN ("""
    + _SEARCH_ROOMS
    + """) AND """
    + _SEARCH_MATCH
    + """
     ORDER BY m.id DESC
     LIMIT %(candidates)s"""
)
_CANDIDATES_PER_ROOM = (
    """
    SELECT x.id FROM ("""
    + _SEARCH_ROOMS
    + """) r
     CROSS JOIN LATERAL (SELECT m.id FROM messages m WHERE m.room_id = r.room_id AND """
    + _SEARCH_MATCH
    + """
                          ORDER BY m.seq DESC LIMIT %(candidates)s) x
     ORDER BY x.id DESC
     LIMIT %(candidates)s"""
)
_SEARCH_TEXT_SQL = """
WITH candidates AS MATERIALIZED ({candidates}
)
SELECT m.id, m.room_id, m.seq, m.sender_id, m.role, m.kind, m.content, m.created_at,
       ({hits})::float8 / %(n_terms)s
       + ts_rank(m.content_tsv, to_tsquery('simple', %(tsq)s))
       + 0.3 * {trgm} AS score
  FROM candidates c JOIN messages m ON m.id = c.id
 WHERE m.deleted_at IS NULL AND m.superseded_at IS NULL AND m.kind IN ('text', 'file')
 ORDER BY score DESC, m.id DESC
 LIMIT %(limit)s OFFSET %(offset)s
"""

_SEARCH_VECTOR_SQL = (
    """
WITH hits AS MATERIALIZED (
    SELECT m.id, m.room_id, m.seq, m.sender_id, m.role, m.kind, m.content, m.created_at,
           e.embedding OPERATOR({schema}.<=>) %(vec)s::{vector} AS distance
      FROM message_embeddings e
      JOIN messages m ON m.id = e.message_id
     WHERE e.room_id IN ("""
    + _SEARCH_ROOMS
    + """)
       AND m.deleted_at IS NULL AND m.superseded_at IS NULL
     ORDER BY e.embedding OPERATOR({schema}.<=>) %(vec)s::{vector}
     LIMIT %(k)s
)
SELECT id, room_id, seq, sender_id, role, kind, content, created_at, 1 - distance AS score
  FROM hits ORDER BY distance, id DESC LIMIT %(limit)s OFFSET %(offset)s
"""
)


@bounded
async def search_text(
    pool: Database,
    *,
    trgm_schema: str | None,
    patterns: Sequence[str],
    tsquery: str,
    query: str,
    user_id: int,
    room_id: int | None,
    limit: int,
    offset: int,
) -> list[Row]:
    if trgm_schema is not None:
        trgm: sql.Composable = sql.SQL("{}.word_similarity(%(query)s, m.content)").format(sql.Identifier(trgm_schema))
    else:
        trgm = sql.SQL("0")
    likes = [sql.SQL("m.content ILIKE {}").format(sql.Placeholder(f"p{i}")) for i in range(len(patterns))]
    # '%abc%' has a trigram (the pattern is %term% with LIKE's wildcards escaped)
    indexed = [like for like, p in zip(likes, patterns, strict=True) if trgm_schema and len(p) >= 5]
    async with connection(pool) as conn:
        if room_id is not None:
            per_room = True
        else:
            cur = await conn.execute("SELECT count(*) AS n FROM room_members WHERE user_id = %s", (user_id,))
            counted = await cur.fetchone()
            per_room = counted is not None and counted["n"] <= SEARCH_PER_ROOM_MAX
    indexed_hit = sql.SQL(" OR ").join(indexed) if indexed else sql.SQL("false")
    statement = sql.SQL(_SEARCH_TEXT_SQL).format(
        candidates=sql.SQL(_CANDIDATES_PER_ROOM if per_room else _CANDIDATES_GLOBAL).format(indexed_hit=indexed_hit),
        hits=sql.SQL(" + ").join(sql.SQL("({})::int").format(like) for like in likes),
        trgm=trgm,
    )
    params: dict[str, Any] = {f"p{i}": p for i, p in enumerate(patterns)}
    params.update(
        tsq=tsquery,
        n_terms=len(patterns),
        query=query,
        user_id=user_id,
        room_id=room_id,
        limit=limit,
        offset=offset,
        candidates=SEARCH_CANDIDATES,
    )
    async with connection(pool) as conn:
        # Never prepared: a generic plan cannot see the patterns, so it cannot pick the trigram index
        # (seconds instead of milliseconds over 1M rows).
        cur = await conn.execute(statement, params, prepare=False)
        return await cur.fetchall()


@bounded
async def search_vector(
    pool: Database,
    *,
    vector_schema: str,
    iterative: bool,
    literal: str,
    user_id: int,
    room_id: int | None,
    limit: int,
    offset: int,
) -> list[Row]:
    async with transaction(pool) as conn:
        if iterative:  # keep scanning the graph until enough rows pass the rooms filter (pgvector >= 0.8)
            await conn.execute("SET LOCAL hnsw.iterative_scan = relaxed_order")
        else:
            await conn.execute("SET LOCAL hnsw.ef_search = 400")
        cur = await conn.execute(
            vector_sql(_SEARCH_VECTOR_SQL, vector_schema),
            {
                "vec": literal,
                "user_id": user_id,
                "room_id": room_id,
                "k": limit + offset,
                "limit": limit,
                "offset": offset,
            },
            prepare=False,  # see search_text
        )
        return await cur.fetchall()
