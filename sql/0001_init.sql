-- chatd core schema: users, rooms, members, messages.
-- Ids are bigint identities (JSON integers on the wire, < 2^53).

CREATE TABLE users (
    id            bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    email         text NOT NULL,
    name          text NOT NULL DEFAULT '',
    password_hash text,                         -- NULL for users of an external identity provider
    role          text NOT NULL DEFAULT 'user' CHECK (role IN ('user', 'admin')),
    status        text NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'banned', 'deleted')),
    created_at    timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now()
);
CREATE UNIQUE INDEX users_email_lower_key ON users (lower(email));

CREATE TABLE rooms (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name        text NOT NULL,
    kind        text NOT NULL CHECK (kind IN ('group', 'assistant')),
    owner_id    bigint NOT NULL REFERENCES users (id),
    status      text NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'archived')),
    assistant   jsonb,                           -- {model, system_prompt, mode}
    last_seq    bigint NOT NULL DEFAULT 0,       -- seq of the newest message; the per-room counter
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE room_members (
    room_id    bigint NOT NULL REFERENCES rooms (id),
    user_id    bigint NOT NULL REFERENCES users (id),
    role       text NOT NULL DEFAULT 'member' CHECK (role IN ('owner', 'member')),
    read_seq   bigint NOT NULL DEFAULT 0,
    joined_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (room_id, user_id)
);
CREATE INDEX room_members_user_idx ON room_members (user_id);

CREATE TABLE messages (
    id             bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    room_id        bigint NOT NULL REFERENCES rooms (id),
    seq            bigint NOT NULL,
    sender_id      bigint REFERENCES users (id),  -- NULL for assistant and system messages
    role           text NOT NULL CHECK (role IN ('user', 'assistant', 'system')),
    kind           text NOT NULL DEFAULT 'text' CHECK (kind IN ('text', 'file', 'system')),
    content        text NOT NULL,
    client_msg_id  text,
    reply_to_id    bigint REFERENCES messages (id),
    created_at     timestamptz NOT NULL DEFAULT now(),
    edited_at      timestamptz,
    deleted_at     timestamptz,
    UNIQUE (room_id, seq)
);
-- Idempotent send: a retried client_msg_id finds the original.
CREATE UNIQUE INDEX messages_client_msg_key ON messages (room_id, sender_id, client_msg_id)
    WHERE client_msg_id IS NOT NULL;
