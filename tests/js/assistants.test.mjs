// chatd/static/js/session.js with several assistants in a room (issue 21): each stream and each stored
// answer keeps who answered (answered_by) and why it failed (error), so that the bubbles can say so.
// Run by tests/unit/test_js.py (node --test).

import assert from "node:assert/strict";
import { test } from "node:test";

import { RESUME_ID, Session } from "../../chatd/static/js/session.js";

const ME = 42;

function live() {
  const s = new Session("c");
  s.setRooms([{ id: 7, name: "ops", owner_id: ME, last_seq: 0, read_seq: 0 }]);
  s.openRoom(7);
  s.page(7, "latest", [], false);
  s.connectionOpened();
  s.receive({ type: "hello", user_id: ME }, 0);
  s.receive({ type: "joined", room_id: 7, last_seq: 0, online: [ME] }, 0);
  s.receive({ type: "pong", reply_to: RESUME_ID }, 0);
  return s;
}

const GPT = { id: 3, name: "gpt", model: "gpt-4.1" };
const ECHO = { id: 4, name: "echo", model: "offline" };

test("two streams answering one prompt each keep their assistant", () => {
  const s = live();
  s.receive({ type: "stream_start", room_id: 7, message_id: 9002, reply_to_message_id: 9001, model: "gpt-4.1", answered_by: GPT }, 0);
  s.receive({ type: "stream_start", room_id: 7, message_id: 9003, reply_to_message_id: 9001, model: "offline", answered_by: ECHO }, 0);
  s.receive({ type: "stream_start", room_id: 7, message_id: 9004, reply_to_message_id: 9000, model: "claude" }, 0);
  const streams = s.rooms.get(7).streams;
  assert.deepEqual(streams.get(9002).answeredBy, GPT);
  assert.deepEqual(streams.get(9003).answeredBy, ECHO);
  assert.equal(streams.get(9004).answeredBy, null); // the server's default assistant
});

test("a stored answer keeps answered_by and its error", () => {
  const s = live();
  const error = { code: "llm_unavailable", message: "@gpt could not answer this time; try again later" };
  s.receive({
    type: "message", room_id: 7, message_id: 9002, seq: 1, role: "assistant", content: "", status: "error",
    created_at: "2025-06-01T12:00:00.000Z", reply_to_message_id: 9001, answered_by: GPT, error,
  }, 0);
  const m = s.rooms.get(7).messages.get(1);
  assert.deepEqual(m.answeredBy, GPT);
  assert.deepEqual(m.error, error);
  assert.equal(m.status, "error");
});
