-- The assistant: answers, their generations and token usage.

-- status: final, or the partial text of a stream that was cancelled or failed (kept, and marked).
ALTER TABLE messages ADD COLUMN status text NOT NULL DEFAULT 'final'
    CHECK (status IN ('final', 'cancelled', 'error'));
-- regenerate keeps the old answer and marks it superseded.
ALTER TABLE messages ADD COLUMN superseded_at timestamptz;
-- One live answer per prompt: a job taken over after a crash cannot persist a second one.
CREATE UNIQUE INDEX messages_one_answer_per_prompt ON messages (reply_to_id)
    WHERE role = 'assistant' AND superseded_at IS NULL;

CREATE TABLE generations (
    id                 bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    room_id            bigint NOT NULL REFERENCES rooms (id),
    prompt_message_id  bigint NOT NULL REFERENCES messages (id),
    answer_message_id  bigint REFERENCES messages (id),
    requester_id       bigint REFERENCES users (id),
    provider           text NOT NULL,
    model              text NOT NULL,
    stop_reason        text NOT NULL CHECK (stop_reason IN ('end_turn', 'max_tokens', 'cancelled', 'error')),
    input_tokens       integer NOT NULL DEFAULT 0,
    output_tokens      integer NOT NULL DEFAULT 0,
    first_token_ms     integer,
    latency_ms         integer NOT NULL,
    retrieved_ids      bigint[] NOT NULL DEFAULT '{}',
    created_at         timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX generations_room_idx ON generations (room_id, created_at);
CREATE INDEX generations_requester_day_idx ON generations (requester_id, created_at);

-- Aggregates for quotas and the admin API: per user, room and UTC day.
CREATE TABLE usage_daily (
    day            date NOT NULL,
    user_id        bigint NOT NULL REFERENCES users (id),
    room_id        bigint NOT NULL REFERENCES rooms (id),
    answers        integer NOT NULL DEFAULT 0,
    input_tokens   bigint NOT NULL DEFAULT 0,
    output_tokens  bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (day, user_id, room_id)
);
