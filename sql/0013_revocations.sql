-- Revocations, durable: a removal from a room, a ban or deactivation, a revoked session.  Written by
-- triggers in the transaction that makes the change, whichever code path makes it, so a worker that
-- missed the kick or close PUBLISH still finds it here (it reads the recent rows every probe interval).
-- room_id set: the user left the room's membership.  family set: that session was revoked.  Neither: the
-- user's status left 'active'.  Kept for an hour (workers delete older rows).
CREATE TABLE revocations (
    id      bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    user_id bigint NOT NULL,
    room_id bigint,
    family  text,
    at      timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX revocations_at_idx ON revocations (at);

CREATE FUNCTION chatd_revoked_members() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO revocations (user_id, room_id) SELECT user_id, room_id FROM gone;
    RETURN NULL;
END $$;
CREATE TRIGGER room_members_revoked AFTER DELETE ON room_members
    REFERENCING OLD TABLE AS gone FOR EACH STATEMENT EXECUTE FUNCTION chatd_revoked_members();

CREATE FUNCTION chatd_revoked_users() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO revocations (user_id)
    SELECT n.id FROM new_rows n JOIN old_rows o ON o.id = n.id WHERE o.status = 'active' AND n.status <> 'active';
    RETURN NULL;
END $$;
CREATE TRIGGER users_revoked AFTER UPDATE ON users
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION chatd_revoked_users();

CREATE FUNCTION chatd_revoked_sessions() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO revocations (user_id, family)
    SELECT DISTINCT n.user_id, n.family FROM new_rows n JOIN old_rows o ON o.jti = n.jti
    WHERE o.revoked_at IS NULL AND n.revoked_at IS NOT NULL;
    RETURN NULL;
END $$;
CREATE TRIGGER refresh_tokens_revoked AFTER UPDATE ON refresh_tokens
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION chatd_revoked_sessions();
