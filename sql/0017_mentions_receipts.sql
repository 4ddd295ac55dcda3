-- Mentions and read receipts (issue 20).  Numbered 0017 to leave 0015/0016 to work on other branches.
--
-- Mentions are found when a message is stored, by a statement trigger on messages: no extra round
-- trip on the send path, one statement per group commit, and only messages containing '@' are
-- looked at.  The rule: '@' at the start or after a character that is not a letter, digit or '_',
-- then a member's name (case-insensitive), then the end or a character that is not a letter, digit
-- or '_'.  '@room' mentions every member.  The sender is never mentioned by their own message; system
-- messages mention nobody; an edit does not add or remove mentions.
-- One row per (mentioned member, message); an @room message has one row with user_id 0 (everyone), so a
-- busy room's @room costs one row, not one per member.  The counts skip the sender's own messages.
CREATE TABLE mentions (
    user_id    bigint NOT NULL,
    room_id    bigint NOT NULL,
    seq        bigint NOT NULL,
    message_id bigint NOT NULL,
    PRIMARY KEY (user_id, room_id, seq)
);

CREATE FUNCTION chatd_store_mentions() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    WITH n AS (
        SELECT id, room_id, seq, sender_id, content, lower(content) AS lowered,
               content ~* '(^|[^[:alnum:]_])@room($|[^[:alnum:]_])' AS everyone
        FROM new_rows WHERE kind <> 'system' AND strpos(content, '@') > 0
    ), who AS (
        -- each member's name as a literal pattern (every character that is not a letter or digit escaped),
        -- built once per member, not once per message
        SELECT m.room_id, m.user_id, '@' || lower(u.name) AS needle,
               '(^|[^[:alnum:]_])@' || regexp_replace(u.name, '([^[:alnum:]])', '\\\1', 'g') || '($|[^[:alnum:]_])'
                   AS pattern
        FROM room_members m JOIN users u ON u.id = m.user_id
        WHERE m.room_id IN (SELECT room_id FROM n WHERE NOT everyone)
    )
    INSERT INTO mentions (user_id, room_id, seq, message_id)
    SELECT 0, room_id, seq, id FROM n WHERE everyone
    UNION ALL
    SELECT w.user_id, n.room_id, n.seq, n.id FROM n JOIN who w ON w.room_id = n.room_id
    WHERE NOT n.everyone AND w.user_id IS DISTINCT FROM n.sender_id
      -- a plain substring test first: the regex (one per member, more than the backend's cache of
      -- compiled ones) only for the few members whose name follows an '@'
      AND CASE WHEN strpos(n.lowered, w.needle) > 0 THEN n.content ~* w.pattern ELSE false END
    ON CONFLICT DO NOTHING;
    RETURN NULL;
END $$;
CREATE TRIGGER messages_mentions AFTER INSERT ON messages
    REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION chatd_store_mentions();

-- The read marker shared with other members.  read_seq (your devices, unread and mention counts) is
-- the private marker; shared_seq is NULL while it equals read_seq (no read was private), so existing
-- rows need no rewrite.  A member's receipt is COALESCE(shared_seq, read_seq).
ALTER TABLE room_members ADD COLUMN shared_seq bigint;
