-- Mentions and read receipts (issue 20).  Numbered 0017 to leave 0015/0016 to work on other branches.
--
-- Mentions are found when a message is stored, by a trigger on messages: no extra round trip on the
-- send path, and only messages containing '@' are looked at.  The rule: '@' at the start or after a
-- character that is not a letter, digit or '_', then a member's name (case-insensitive), then the end
-- or a character that is not a letter, digit or '_'.  '@room' mentions every member.  The sender is never mentioned by their own message; system
-- messages mention nobody; an edit does not add or remove mentions.
--
-- One row per (mentioned member, message); an @room message has one row with user_id 0 (everyone), so a
-- busy room's @room costs one row, not one per member.  The counts skip the sender's own messages.
CREATE TABLE mentions (
    user_id    bigint NOT NULL,
    room_id    bigint NOT NULL,
    seq        bigint NOT NULL,
    message_id bigint NOT NULL,
    PRIMARY KEY (user_id, room_id, seq)
);

-- A row trigger whose WHEN is tested without calling PL/pgSQL: a message without '@' (most of them) costs
-- next to nothing, unlike a statement trigger's transition table and call on every group commit.
CREATE FUNCTION chatd_store_mentions() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.content ~* '(^|[^[:alnum:]_])@room($|[^[:alnum:]_])' THEN
        INSERT INTO mentions (user_id, room_id, seq, message_id) VALUES (0, NEW.room_id, NEW.seq, NEW.id)
        ON CONFLICT DO NOTHING;
        RETURN NULL;
    END IF;
    INSERT INTO mentions (user_id, room_id, seq, message_id)
    SELECT m.user_id, NEW.room_id, NEW.seq, NEW.id
    FROM room_members m JOIN users u ON u.id = m.user_id
    WHERE m.room_id = NEW.room_id AND m.user_id IS DISTINCT FROM NEW.sender_id
      -- a plain substring test first: the regex (one per member, more than the backend's cache of compiled
      -- ones) only for the few members whose name follows an '@'; the name as a literal pattern (every
      -- character that is not a letter or digit escaped)
      AND CASE WHEN strpos(lower(NEW.content), '@' || lower(u.name)) > 0
          THEN NEW.content ~* ('(^|[^[:alnum:]_])@' || regexp_replace(u.name, '([^[:alnum:]])', '\\\1', 'g')
                               || '($|[^[:alnum:]_])')
          ELSE false END
    ON CONFLICT DO NOTHING;
    RETURN NULL;
END $$;
CREATE TRIGGER messages_mentions AFTER INSERT ON messages
    FOR EACH ROW WHEN (NEW.kind <> 'system' AND strpos(NEW.content, '@') > 0) EXECUTE FUNCTION chatd_store_mentions();

-- The read marker shared with other members.  read_seq (your devices, unread and mention counts) is
-- the private marker; shared_seq is NULL while it equals read_seq (no read was private), so existing
-- rows need no rewrite.  A member's receipt is COALESCE(shared_seq, read_seq).
ALTER TABLE room_members ADD COLUMN shared_seq bigint;
