// chatd/static/js/session.js: mention counts and read receipts (issue 20). Run by tests/unit/test_js.py.

import assert from "node:assert/strict";
import { test } from "node:test";

import { RESUME_ID, Session, mentions, seenBy } from "../../chatd/static/js/session.js";

const ME = 42;
const BOB = 57;
const msg = (seq, content) => ({
  type: "message", room_id: 7, message_id: 9000 + seq, seq, sender_id: BOB, role: "user", content,
  created_at: "2025-06-01T12:00:00.000Z",
});

function live() {
  const s = new Session("c");
  s.setRooms([{ id: 7, name: "ops", owner_id: BOB, last_seq: 2, read_seq: 0, mention_count: 1 }]);
  s.openRoom(7);
  s.page(7, "latest", [msg(1, "hi @Ann Lee"), msg(2, "x")], false);
  s.connectionOpened();
  s.receive({ type: "hello", user_id: ME }, 0);
  s.setMembers([{ id: ME, name: "Ann Lee", read_seq: 0 }, { id: BOB, name: "Bob", read_seq: 1 }], 7);
  s.receive({ type: "joined", room_id: 7, last_seq: 2, online: [ME] }, 0);
  s.receive({ type: "pong", reply_to: RESUME_ID }, 0);
  return s;
}

test("the mention rule: @name not inside a word, any case, and @room", () => {
  assert.equal(mentions("hey @ann lee, look", "Ann Lee"), true);
  assert.equal(mentions("(@ANN LEE)", "Ann Lee"), true);
  assert.equal(mentions("mail x@ann lee", "Ann Lee"), false);
  assert.equal(mentions("@ann leeds", "Ann Lee"), false);
  assert.equal(mentions("lunch @room?", null), true);
  assert.equal(mentions("@roomy", null), false);
});

test("live messages that mention you count once; reads reset the count", () => {
  const s = live();
  const room = s.rooms.get(7);
  assert.equal(room.mentionCount, 1); // from the rooms list
  s.receive(msg(3, "@room lunch"), 0);
  s.receive(msg(4, "no mention"), 0);
  assert.equal(room.mentionCount, 2);
  s.receive({ type: "read", room_id: 7, user_id: ME, seq: 3, mention_count: 0 }, 0); // another device read
  assert.equal(room.mentionCount, 0);
  s.receive({ type: "read", room_id: 7, user_id: ME, seq: 2, mention_count: 1 }, 0); // older: ignored
  assert.equal(room.mentionCount, 0);
});

test("receipts from the roster and receipts frames: seen by", () => {
  const s = live();
  const room = s.rooms.get(7);
  assert.equal(seenBy(room, 1, ME), 1);
  assert.equal(seenBy(room, 2, ME), 0);
  s.receive({ type: "receipts", room_id: 7, receipts: [{ user_id: BOB, read_seq: 2 }, { user_id: ME, read_seq: 2 }] }, 0);
  assert.equal(seenBy(room, 2, ME), 1); // you do not count yourself
  s.receive({ type: "receipts", room_id: 7, receipts: [{ user_id: BOB, read_seq: 1 }] }, 0); // never backwards
  assert.equal(room.receipts.get(BOB), 2);
});

test("private reads carry private: true", () => {
  const s = live();
  s.privateReads = true;
  const out = s.markRead(7).filter((a) => a.kind === "send").map((a) => a.frame);
  assert.deepEqual(out, [{ type: "read", room_id: 7, seq: 2, private: true }]);
  assert.equal(s.rooms.get(7).mentionCount, 0);
});
