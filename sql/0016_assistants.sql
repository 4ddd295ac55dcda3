-- Issue 21: several assistants per room.  Admins define the assistants of the server (`assistants`);
-- a room owner picks some of them for the room (`room_assistants`), each answering every message
-- (mode always) or only when mentioned by name (mode mention).  A room that picks none (or whose picks
-- are all retired) keeps the server's default assistant and its `rooms.assistant` settings (assistant id 0).
-- Numbered 0016 (not 0015): another branch may add 0015 at the same time.

CREATE TABLE assistants (
    id            bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    -- the @handle: lowercase, so that a mention needs no case folding and is no regex metacharacter
    name          text NOT NULL UNIQUE CHECK (name ~ '^[a-z][a-z0-9_]{0,31}$'),
    provider      text NOT NULL CHECK (provider IN ('anthropic', 'openai', 'offline')),
    model         text NOT NULL,
    system_prompt text NOT NULL DEFAULT '',
    mode          text NOT NULL DEFAULT 'mention' CHECK (mode IN ('always', 'mention')),  -- when picked
    status        text NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'retired')),
    created_at    timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE room_assistants (
    room_id      bigint NOT NULL REFERENCES rooms (id),
    assistant_id bigint NOT NULL REFERENCES assistants (id),
    mode         text NOT NULL CHECK (mode IN ('always', 'mention')),
    added_by     bigint REFERENCES users (id),
    created_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (room_id, assistant_id)
);

-- How many assistants the room picked: a join looks for running answers in rooms that have any.
ALTER TABLE rooms ADD COLUMN assistant_count smallint NOT NULL DEFAULT 0;

-- Who answered: NULL is the server's default assistant.  One live answer per prompt AND assistant.
ALTER TABLE messages ADD COLUMN assistant_id bigint REFERENCES assistants (id);
DROP INDEX messages_one_answer_per_prompt;
CREATE UNIQUE INDEX messages_one_answer_per_prompt ON messages (reply_to_id, (coalesce(assistant_id, 0)))
    WHERE role = 'assistant' AND superseded_at IS NULL;

-- An owed answer is owed by one assistant (0: the default one).
ALTER TABLE answers_owed ADD COLUMN assistant_id bigint NOT NULL DEFAULT 0;
ALTER TABLE answers_owed DROP CONSTRAINT answers_owed_pkey;
ALTER TABLE answers_owed ADD PRIMARY KEY (prompt_id, assistant_id);

ALTER TABLE generations ADD COLUMN assistant_id bigint REFERENCES assistants (id);

-- Usage per UTC day, user, assistant (0: the default one) and model.
CREATE TABLE usage_assistants (
    day           date NOT NULL,
    user_id       bigint NOT NULL REFERENCES users (id),
    assistant_id  bigint NOT NULL,
    model         text NOT NULL,
    answers       integer NOT NULL DEFAULT 0,
    input_tokens  bigint NOT NULL DEFAULT 0,
    output_tokens bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (day, user_id, assistant_id, model)
);

-- "@name" as a word, the rule of "@assistant" (chatd.assistant.context.mentions_assistant): not inside an
-- address (x@name.io), nor the start of a longer name (@name_2).
CREATE FUNCTION chatd_mentions(p_content text, p_name text) RETURNS boolean
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT p_content ~* ('(^|[^[:alnum:]_.@])@' || p_name || '($|[^[:alnum:]_.@]|[.@]($|[^[:alnum:]_]))')
$$;

-- The group commit (0012) decides which assistants owe an answer: in a room that picked assistants,
-- those mentioned by name, or when none is mentioned those in mode always; else the default
-- assistant by the room's settings, as before.  owed_assistants lists them (0: the default one).
DROP FUNCTION chatd_commit_messages(bigint[], bigint[], text[], text[], text[], text[], bigint[], jsonb[], bigint[], boolean[]);
CREATE FUNCTION chatd_commit_messages(
    p_room_ids bigint[], p_sender_ids bigint[], p_roles text[], p_kinds text[], p_contents text[],
    p_client_msg_ids text[], p_reply_to_ids bigint[], p_datas jsonb[], p_file_ids bigint[], p_mentions boolean[]
) RETURNS TABLE (
    ord bigint, outcome text, answer_owed boolean, owed_assistants bigint[],
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
        INSERT INTO answers_owed (prompt_id, room_id, requester_id, assistant_id)
        SELECT n.id, n.room_id, n.sender_id, w.assistant_id
          FROM fresh f JOIN ins n ON n.room_id = f.room_id AND n.seq = f.new_seq
          CROSS JOIN LATERAL (
              SELECT 0::bigint AS assistant_id
               WHERE NOT EXISTS (SELECT 1 FROM room_assistants ra JOIN assistants a ON a.id = ra.assistant_id
                                  WHERE ra.room_id = f.room_id AND a.status = 'active')
                 AND CASE coalesce(f.room_assistant ->> 'mode', CASE WHEN f.room_kind = 'assistant' THEN 'always' END)
                         WHEN 'always' THEN f.room_kind = 'assistant'
                         WHEN 'mention' THEN f.mentions
                         ELSE false
                     END
              UNION ALL
              SELECT ra.assistant_id FROM room_assistants ra JOIN assistants a ON a.id = ra.assistant_id
               WHERE ra.room_id = f.room_id AND a.status = 'active'
                 AND CASE WHEN EXISTS (
                              SELECT 1 FROM room_assistants rb JOIN assistants b ON b.id = rb.assistant_id
                               WHERE rb.room_id = f.room_id AND b.status = 'active' AND chatd_mentions(f.content, b.name))
                          THEN chatd_mentions(f.content, a.name)
                          ELSE ra.mode = 'always'
                     END
          ) w
         WHERE f.role = 'user' AND f.kind = 'text' AND f.sender_id IS NOT NULL
        RETURNING prompt_id, assistant_id
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
           coalesce(o.ids, d.ids) IS NOT NULL,
           coalesce(o.ids, d.ids, '{}'),
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
      LEFT JOIN LATERAL (SELECT array_agg(o.assistant_id ORDER BY o.assistant_id) AS ids
                           FROM owed o WHERE o.prompt_id = s.message_id) o ON true
      LEFT JOIN LATERAL (SELECT array_agg(a.assistant_id ORDER BY a.assistant_id) AS ids
                           FROM answers_owed a
                          WHERE s.outcome IN ('duplicate', 'copy') AND a.prompt_id = s.message_id) d ON true
     ORDER BY s.ord;
END
$$;
