-- Moderation: reports of messages, the admin's content rules, and an index for bulk redaction.

-- One report per (message, reporter): a second report by the same user is the same row (idempotent).
-- reporter_id NULL: raised by a content rule with action flag (one such report per message).
CREATE TABLE message_reports (
    id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    message_id   bigint NOT NULL REFERENCES messages (id) ON DELETE CASCADE,
    room_id      bigint NOT NULL REFERENCES rooms (id),
    sender_id    bigint REFERENCES users (id),             -- the reported message's author, when reported
    reporter_id  bigint REFERENCES users (id),
    reason       text NOT NULL,
    status       text NOT NULL DEFAULT 'open'
                 CHECK (status IN ('open', 'resolved', 'dismissed', 'deleted', 'banned')),
    handled_by   bigint REFERENCES users (id),
    handled_at   timestamptz,
    created_at   timestamptz NOT NULL DEFAULT now()
);
CREATE UNIQUE INDEX message_reports_once ON message_reports (message_id, reporter_id) WHERE reporter_id IS NOT NULL;
CREATE UNIQUE INDEX message_reports_flag_once ON message_reports (message_id) WHERE reporter_id IS NULL;
CREATE INDEX message_reports_queue_idx ON message_reports (status, id);
CREATE INDEX message_reports_room_idx ON message_reports (room_id, status, id);

-- Content rules: a word (whole word where it starts/ends with a word character, case-insensitive) or an
-- RE2 regex, and what a match does.  content_rules_version is bumped in the transaction of every change:
-- workers compare it with the version their compiled set was built from.
CREATE TABLE content_rules (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    kind        text NOT NULL CHECK (kind IN ('word', 'regex')),
    pattern     text NOT NULL,
    action      text NOT NULL CHECK (action IN ('block', 'flag', 'mask')),
    created_by  bigint REFERENCES users (id),
    created_at  timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE content_rules_version (
    one      boolean PRIMARY KEY DEFAULT true CHECK (one),
    version  bigint NOT NULL
);
INSERT INTO content_rules_version (one, version) VALUES (true, 0);

-- Bulk redaction walks one user's live messages room by room in seq order, a batch at a time.
CREATE INDEX messages_sender_room_seq_idx ON messages (sender_id, room_id, seq) WHERE deleted_at IS NULL;
