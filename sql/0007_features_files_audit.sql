-- Issue 11: attachments, structured message payloads, who deleted what, the admin audit log.

-- The structured part of a message: kind 'file' {file_id, name, content_type, size, sha256, width, height},
-- kind 'system' {event: member_joined | member_left | announcement, user_id?, by?}.
ALTER TABLE messages ADD COLUMN data jsonb;
-- Admins browse the log including deleted messages: who deleted each one.
ALTER TABLE messages ADD COLUMN deleted_by bigint REFERENCES users (id);

-- One stored upload.  The blob lives in the storage backend under storage_key; the row goes on
-- living after the blob is gone (purged_at), so a message's payload never points at nothing silently.
CREATE TABLE files (
    id            bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    room_id       bigint NOT NULL REFERENCES rooms (id),
    uploader_id   bigint NOT NULL REFERENCES users (id),
    message_id    bigint REFERENCES messages (id),      -- NULL until its message is committed
    storage_key   text NOT NULL UNIQUE,
    name          text NOT NULL,
    content_type  text NOT NULL,
    size          bigint NOT NULL,
    sha256        text NOT NULL,
    width         integer,
    height        integer,
    created_at    timestamptz NOT NULL DEFAULT now(),
    deleted_at    timestamptz,                            -- its message was deleted: the sweeper removes the blob
    purged_at     timestamptz                             -- blob removed from storage
);
CREATE INDEX files_message_idx ON files (message_id);
-- The sweeper's work list: deleted, or never attached to a message (a failed upload), not yet purged.
CREATE INDEX files_sweep_idx ON files (created_at) WHERE purged_at IS NULL AND (deleted_at IS NOT NULL OR message_id IS NULL);

CREATE TABLE audit_log (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    actor_id    bigint NOT NULL REFERENCES users (id),
    action      text NOT NULL,                           -- e.g. GET /api/v1/admin/stats, or unban, role
    target      text,                                    -- e.g. user:42, room:7
    details     jsonb,
    ip          text,
    status      integer NOT NULL,                        -- HTTP status of the call
    created_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX audit_log_created_idx ON audit_log (created_at DESC);

-- User directory: name prefix (lower) and email (already: users_email_lower_key).
CREATE INDEX users_name_lower_idx ON users (lower(name) text_pattern_ops);
