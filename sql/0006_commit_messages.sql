-- The group commit in one round trip (called by store.commit_batch, one call per batch).
--
-- The same steps as the statements it replaces, each on a fresh snapshot (a VOLATILE function
-- takes one per query, so a batch that held the lock before us is seen in full):
--   1. lock the batch's rooms in id order (concurrent batches never deadlock);
--   2. classify every input row: not_found (no room, or the sender is not a member), archived,
--      duplicate (its client_msg_id is stored already: no seq is burned), copy (a second copy of a
--      client_msg_id within this batch), or stored;
--   3. stored rows get last_seq + 1, + 2, ... per room, in batch order; insert them; move last_seq.
-- One row per input row, in input order: the outcome, the message (the stored one, or the original
-- for duplicate and copy), and the room's kind, assistant settings and owner (assistant trigger).
CREATE FUNCTION chatd_commit_messages(
    p_room_ids bigint[], p_sender_ids bigint[], p_roles text[], p_kinds text[], p_contents text[],
    p_client_msg_ids text[], p_reply_to_ids bigint[]
) RETURNS TABLE (
    ord bigint, outcome text,
    id bigint, room_id bigint, seq bigint, sender_id bigint, role text, kind text, content text,
    client_msg_id text, reply_to_id bigint, created_at timestamptz, edited_at timestamptz,
    deleted_at timestamptz, status text, superseded_at timestamptz, edit_rev bigint,
    room_kind text, room_assistant jsonb, room_owner_id bigint
) LANGUAGE plpgsql VOLATILE AS $$
#variable_conflict use_column
BEGIN
    PERFORM 1 FROM rooms r WHERE r.id = ANY (p_room_ids) ORDER BY r.id FOR UPDATE;
    RETURN QUERY
    WITH input AS (
        SELECT t.* FROM unnest(p_room_ids, p_sender_ids, p_roles, p_kinds, p_contents, p_client_msg_ids, p_reply_to_ids)
            WITH ORDINALITY AS t (room_id, sender_id, role, kind, content, client_msg_id, reply_to_id, ord)
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
        INSERT INTO messages AS m (room_id, seq, sender_id, role, kind, content, client_msg_id, reply_to_id)
        SELECT f.room_id, f.new_seq, f.sender_id, f.role, f.kind, f.content, f.client_msg_id, f.reply_to_id FROM fresh f
        RETURNING m.*
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
           m.id, m.room_id, m.seq, m.sender_id, m.role, m.kind, m.content, m.client_msg_id, m.reply_to_id,
           m.created_at, m.edited_at, m.deleted_at, m.status, m.superseded_at, m.edit_rev,
           s.room_kind, s.room_assistant, s.room_owner_id
      FROM results s
      LEFT JOIN (SELECT * FROM ins UNION ALL
                 SELECT e.* FROM messages e WHERE e.id IN (SELECT r.message_id FROM results r)) m
             ON m.id = s.message_id
     ORDER BY s.ord;
END
$$;
