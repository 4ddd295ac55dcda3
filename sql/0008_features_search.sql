-- Issue 11 search: a stored tsvector, so that matching and ranking never re-parse the text of every row
-- they look at (re-parsing was ~90% of a search over 1M messages: docs/BENCHMARKS.md).  It replaces the
-- expression index of 0003 (the retrieval's text mode reads the column too).  Rewrites messages once.
ALTER TABLE messages ADD COLUMN content_tsv tsvector
    GENERATED ALWAYS AS (to_tsvector('simple'::regconfig, content)) STORED;
CREATE INDEX messages_content_tsv_idx ON messages USING gin (content_tsv);
DROP INDEX IF EXISTS messages_content_fts_idx;
