-- Edits and deletes, numbered per room, so a worker that missed one (its publish was lost)
-- finds it: every worker compares rooms.edit_rev with the last revision it delivered and reads
-- the messages changed since (messages.edit_rev = the room's revision of their last change).
ALTER TABLE rooms ADD COLUMN edit_rev bigint NOT NULL DEFAULT 0;
ALTER TABLE messages ADD COLUMN edit_rev bigint NOT NULL DEFAULT 0;
CREATE INDEX messages_room_edit_rev_idx ON messages (room_id, edit_rev) WHERE edit_rev > 0;
