-- Answers owed: an acked prompt that the assistant must answer.  Written in the SAME transaction
-- as the prompt (store.commit_batch), so an ack always implies either this row or a stored answer.
-- Removed when the answer is stored (store.persist_answer, same transaction), or when it is refused
-- (busy, quota), cancelled while queued, or dropped (prompt deleted).  Every worker's sweeper
-- enqueues the rows that have no job in the Redis queue (lost enqueue: crash, shutdown, Redis down).
CREATE TABLE answers_owed (
    prompt_id    bigint PRIMARY KEY REFERENCES messages (id) ON DELETE CASCADE,
    room_id      bigint NOT NULL REFERENCES rooms (id),
    requester_id bigint NOT NULL REFERENCES users (id),
    created_at   timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX answers_owed_created_idx ON answers_owed (created_at);
