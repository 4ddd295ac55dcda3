-- The background embedding indexer: one batch at a time across all workers and instances, without
-- holding a connection or a transaction while the batch is embedded (it runs at idle CPU priority and
-- may take long under load).  One row: who holds the lease and until when.
CREATE TABLE indexer_lease (
    id     integer PRIMARY KEY CHECK (id = 1),
    holder text NOT NULL,
    until  timestamptz NOT NULL
);
