-- Emoji reactions.  One row per (message, user, emoji): the primary key is what makes a reaction
-- count once however many times, and from however many workers, it is added.  messages.reactions
-- is their aggregate ([{"emoji","count","users"}], NULL when none), rewritten in the transaction that
-- changes a reaction together with the room's next edit_rev: history, replay and the edit repair
-- (changes_after) read it with the message, no join.
CREATE TABLE message_reactions (
    message_id bigint NOT NULL REFERENCES messages (id) ON DELETE CASCADE,
    user_id    bigint NOT NULL REFERENCES users (id),
    emoji      text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (message_id, user_id, emoji)
);
ALTER TABLE messages ADD COLUMN reactions jsonb;
