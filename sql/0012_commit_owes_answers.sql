-- Issue 10: an acked prompt is never forgotten.  The group commit (0006, 0009) also writes the
-- answers the assistant owes (answers_owed, 0010) in the same single round trip, deciding on the locked
-- room row, and says per message whether an answer is owed (for a duplicate: still owed), so a retried
-- send re-enqueues.  Same steps otherwise; see 0006.
DROP FUNCTION chatd_commit_messages(bigint[], bigint[], text[], text[], text[], text[], bigint[], jsonb[], bigint[]);
CREATE FUNCTION chatd_commit_messages(
    p_room_ids bigint[], p_sender_ids bigint[], p_roles text[], p_kinds text[], p_contents text[],
    p_client_msg_ids text[], p_reply_to_ids bigint[], p_datas jsonb[], p_file_ids bigint[], p_mentions boolean[]
) RETURNS TABLE (
    ord bigint, outcome text, answer_owed boolean,
    id bigint, room_id bigint, seq bigint, sender_id bigint, role text, kind text, content text,
    client_msg_id text, reply_to_id bigint, created_at timestamptz, edited_at timestamptz,
    deleted_at timestamptz, status text, superseded_at timestamptz, edit_rev bigint, data jsonb,
    room_kind text, room_assistant jsonb, room_owner_id bigint
) LANGUAGE plpgsql VOLATILE AS $$
#variable_conflict use_column
BEGIN
    PERFORM 1 FROM rooms r WHERE r.id = ANY (p_room_ids) ORDER BY r.id FOR UPDATE;
    RETURN QUERY
    WITH input AS (
        SELECT t.* FROM unnest(p_room_ids, p_sender_ids, p_roles, p_kinds, p_contents, p_client_msg_ids, p_reply_to_ids,
                               p_datas, p_file_ids, p_mentions)
            WITH ORDINALITY AS t (room_id, sender_id, role, kind, content, client_msg_id, reply_to_id, data, file_id,
                                  mentions, ord)
    ), classified AS (
        SELECT i.*, r.last_seq, r.kind AS room_kind, r.assistant AS room_assistant, r.owner_id AS room_owner_id,
            CASE
                WHEN r.id IS NULL THEN 'not_found'
                WHEN i.sender_id IS NOT NULL AND NOT EXISTS (
                    SELECT 1 FROM room_members m WHERE m.room_id = i.room_id AND m.user_id = i.sender_id
                ) THEN 'not_found'
                WHEN r.status <> 'active' THEN 'archived'
                WHEN i.client_msg_id IS NOT NULL AND EXISTS (
                    SELECT 1 FROM messages e
                     WHERE e.room_id = i.room_id AND e.sender_id = i.sender_id AND e.client_msg_id = i.client_msg_id
                ) THEN 'duplicate'
                WHEN i.client_msg_id IS NOT NULL AND row_number() OVER (
                    PARTITION BY i.room_id, i.sender_id, i.client_msg_id ORDER BY i.ord
                ) > 1 THEN 'copy'
                ELSE 'stored'
            END AS outcome
        FROM input i LEFT JOIN rooms r ON r.id = i.room_id
    ), fresh AS (
        SELECT c.*, c.last_seq + row_number() OVER (PARTITION BY c.room_id ORDER BY c.ord) AS new_seq
          FROM classified c WHERE c.outcome = 'stored'
    ), ins AS (
        INSERT INTO messages AS m (room_id, seq, sender_id, role, kind, content, client_msg_id, reply_to_id, data)
        SELECT f.room_id, f.new_seq, f.sender_id, f.role, f.kind, f.content, f.client_msg_id, f.reply_to_id, f.data
          FROM fresh f
        RETURNING m.*
    ), attached AS (
        UPDATE files fl SET message_id = n.id
          FROM fresh f JOIN ins n ON n.room_id = f.room_id AND n.seq = f.new_seq
         WHERE f.file_id IS NOT NULL AND fl.id = f.file_id
    ), owed AS (
        -- The assistant owes an answer to a user's text message in a room in mode "always" (assistant
        -- rooms' default) or, in mode "mention", to one that mentions it (p_mentions: the caller's regex).
        INSERT INTO answers_owed (prompt_id, room_id, requester_id)
        SELECT n.id, n.room_id, n.sender_id
          FROM fresh f JOIN ins n ON n.room_id = f.room_id AND n.seq = f.new_seq
         WHERE f.role = 'user' AND f.kind = 'text' AND f.sender_id IS NOT NULL
           AND CASE coalesce(f.room_assistant ->> 'mode', CASE WHEN f.room_kind = 'assistant' THEN 'always' END)
                   WHEN 'always' THEN f.room_kind = 'assistant'
                   WHEN 'mention' THEN f.mentions
                   ELSE false
               END
        RETURNING prompt_id
    ), moved AS (
        UPDATE rooms r SET last_seq = f.top FROM (SELECT f.room_id, max(f.new_seq) AS top FROM fresh f GROUP BY f.room_id) f
         WHERE r.id = f.room_id
    ), results AS (
        SELECT c.ord, c.outcome, c.room_kind, c.room_assistant, c.room_owner_id,
               coalesce(n.id, x.id, e.id) AS message_id
          FROM classified c
          LEFT JOIN fresh f ON f.ord = c.ord
          LEFT JOIN ins n ON n.room_id = f.room_id AND n.seq = f.new_seq
          LEFT JOIN ins x ON c.outcome = 'copy'
               AND x.room_id = c.room_id AND x.sender_id = c.sender_id AND x.client_msg_id = c.client_msg_id
          LEFT JOIN messages e ON c.outcome = 'duplicate'
               AND e.room_id = c.room_id AND e.sender_id = c.sender_id AND e.client_msg_id = c.client_msg_id
    )
    SELECT s.ord, s.outcome,
           s.message_id IN (SELECT o.prompt_id FROM owed o)
               OR (s.outcome IN ('duplicate', 'copy')
                   AND EXISTS (SELECT 1 FROM answers_owed a WHERE a.prompt_id = s.message_id)),
           m.id, m.room_id, m.seq, m.sender_id, m.role, m.kind, m.content, m.client_msg_id, m.reply_to_id,
           m.created_at, m.edited_at, m.deleted_at, m.status, m.superseded_at, m.edit_rev, m.data,
           s.room_kind, s.room_assistant, s.room_owner_id
      FROM results s
      LEFT JOIN (SELECT n.id, n.room_id, n.seq, n.sender_id, n.role, n.kind, n.content, n.client_msg_id,
                        n.reply_to_id, n.created_at, n.edited_at, n.deleted_at, n.status, n.superseded_at,
                        n.edit_rev, n.data FROM ins n
                 UNION ALL
                 SELECT e.id, e.room_id, e.seq, e.sender_id, e.role, e.kind, e.content, e.client_msg_id,
                        e.reply_to_id, e.created_at, e.edited_at, e.deleted_at, e.status, e.superseded_at,
                        e.edit_rev, e.data FROM messages e WHERE e.id IN (SELECT r.message_id FROM results r)) m
             ON m.id = s.message_id
     ORDER BY s.ord;
END
$$;
