// chatd/static/js/session.js: send pacing, the outbox, typing frames, who may stop an answer, words for
// error codes (issue 22). The resume rules are run in the browser (tests/integration/test_webapp.py).
// Run by tests/unit/test_js.py (node --test).

import assert from "node:assert/strict";
import { test } from "node:test";

import { RESUME_ID, Session, describeError, reconnectDelay } from "../../chatd/static/js/session.js";

const ME = 42;
const BOB = 57;
const frames = (actions) => actions.filter((a) => a.kind === "send").map((a) => a.frame);
const sends = (actions) => frames(actions).filter((f) => f.type === "send");
const typing = (actions) => frames(actions).filter((f) => f.type === "typing").map((f) => f.is_typing);
const notices = (actions) => actions.filter((a) => a.kind === "notice");
const msg = (seq, extra = {}) => ({
  type: "message", room_id: 7, message_id: 9000 + seq, seq, sender_id: BOB, role: "user", content: `m${seq}`,
  created_at: "2025-06-01T12:00:00.000Z", ...extra,
});

function live({ limits, owner = BOB, restore = null } = {}) {
  const s = new Session("c");
  s.setRooms([{ id: 7, name: "ops", owner_id: owner, last_seq: 0, read_seq: 0 }]);
  s.openRoom(7);
  s.page(7, "latest", [], false);
  if (restore) s.restore(...restore);
  s.connectionOpened();
  s.receive({ type: "hello", user_id: ME, limits }, 0);
  s.receive({ type: "joined", room_id: 7, last_seq: 0, online: [ME] }, 0);
  const out = s.receive({ type: "pong", reply_to: RESUME_ID }, 0);
  return [s, out];
}

test("sends are paced to hello.limits.send (its window plus a tenth), in order", () => {
  const [s] = live({ limits: { send: { count: 3, window_ms: 1000 } } });
  const first = [];
  for (let i = 1; i <= 5; i++) first.push(...sends(s.sendText(7, `t${i}`, 0)));
  assert.deepEqual(first.map((f) => f.content), ["t1", "t2", "t3"]);
  assert.deepEqual(sends(s.tick(1099)), []);
  assert.deepEqual(sends(s.tick(1100)).map((f) => f.content), ["t4", "t5"]);
});

test("without hello.limits, the server's defaults: 20 per 10 s", () => {
  const [s] = live();
  let n = 0;
  for (let i = 0; i < 25; i++) n += sends(s.sendText(7, `t${i}`, 0)).length;
  assert.equal(n, 20);
  assert.equal(sends(s.tick(10_999)).length, 0);
  assert.equal(sends(s.tick(11_000)).length, 5);
});

test("rate_limited holds every send until retry_after_ms, then one at a time until the window passed", () => {
  const [s] = live();
  const [a] = sends(s.sendText(7, "a", 0));
  const [b] = sends(s.sendText(7, "b", 0)); // another tab used the quota: both refused
  const refused = [a, b].flatMap((f) =>
    s.receive({ type: "error", code: "rate_limited", message: "x", reply_to: f.id, retry_after_ms: 3000 }, 10),
  );
  assert.deepEqual(notices(refused), []); // the message itself says "retrying soon…"
  assert.equal(s.pending.get(a.client_msg_id).state, "waiting");
  assert.deepEqual(sends(s.sendText(7, "c", 20)), []);
  assert.deepEqual(sends(s.tick(3000)), []);
  assert.deepEqual(sends(s.tick(3010)), [a]); // same client_msg_id, in its place
  assert.deepEqual(sends(s.tick(3300)), []); // a's answer first
  s.receive({ type: "ack", room_id: 7, client_msg_id: a.client_msg_id, seq: 1 }, 3400);
  assert.deepEqual(sends(s.tick(3500)), [b]);
  s.receive({ type: "ack", room_id: 7, client_msg_id: b.client_msg_id, seq: 2 }, 3600);
  assert.deepEqual(sends(s.tick(3700)).map((f) => f.content), ["c"]);
});

test("the outbox: unsent messages, restored with their ids and the quota already used", () => {
  const [s] = live({ limits: { send: { count: 2, window_ms: 1000 } } });
  for (const t of ["a", "b", "c", "d"]) s.sendText(7, t, 0);
  s.receive({ type: "ack", room_id: 7, client_msg_id: "c-1", seq: 1 }, 5);
  s.receive({ type: "error", code: "too_large", message: "content over 4000 characters", reply_to: "s:c-2" }, 5);
  const kept = s.outbox();
  assert.deepEqual(kept, [
    { roomId: 7, clientMsgId: "c-3", content: "c" },
    { roomId: 7, clientMsgId: "c-4", content: "d" },
  ]);
  // After a reload: a new Session (new client id), the kept entries first, resent as they were.
  const [r, out] = live({ limits: { send: { count: 2, window_ms: 1000 } }, restore: [kept, [-400, -300], 0] });
  assert.deepEqual(sends(out), []); // the two sends of 400 and 300 ms ago still count
  assert.deepEqual(sends(r.tick(700)).map((f) => f.client_msg_id), ["c-3"]);
  assert.deepEqual(sends(r.tick(800)).map((f) => f.client_msg_id), ["c-4"]);
  assert.deepEqual(sends(r.sendText(7, "e", 900)), []); // two sends within the window again: it waits
  assert.deepEqual(sends(r.tick(1800)).map((f) => f.content), ["e"]);
});

test("typing: one `true` per 3 s at most, and `false` only after a `true`", () => {
  const [s] = live();
  const seen = [];
  let now = 0;
  for (let i = 0; i < 25; i++) {
    // 25 messages in a second, each typed then sent
    seen.push(...typing(s.inputChanged(7, false, now)), ...typing(s.sendText(7, `m${i}`, now)));
    now += 40;
  }
  assert.deepEqual(seen, [true, false]);
  assert.deepEqual(typing(s.inputChanged(7, false, 2000)), []); // within 3 s of the last `true`
  assert.deepEqual(typing(s.tick(2999)), []);
  assert.deepEqual(typing(s.tick(3000)), [true]); // still typing: said once the 3 s passed
  assert.deepEqual(typing(s.tick(6000)), [false]); // idle for 4 s
  assert.deepEqual(typing(s.inputChanged(7, false, 6100)), [true]);
  assert.deepEqual(typing(s.inputChanged(7, true, 6200)), [false]); // cleared
  assert.deepEqual(typing(s.inputChanged(7, true, 6300)), []);
});

test("a sender's typing indicator goes when their message arrives", () => {
  const [s] = live();
  s.receive({ type: "typing", room_id: 7, user_id: BOB, is_typing: true }, 0);
  assert.deepEqual([...s.rooms.get(7).typing.keys()], [BOB]);
  s.receive(msg(1), 10);
  assert.equal(s.rooms.get(7).typing.size, 0);
});

test("Stop only for whom the server lets stop the answer", () => {
  const prompt = (seq, sender) => msg(seq, { sender_id: sender, content: "@assistant hi" });
  const answer = (seq, replyTo) => msg(seq, { sender_id: null, role: "assistant", reply_to_message_id: replyTo });
  const [s] = live(); // owned by Bob
  s.receive(prompt(1, ME), 0); // message 9001
  s.receive(prompt(2, BOB), 0); // message 9002
  assert.equal(s.canStop(7, 9001, true), true); // my prompt
  assert.equal(s.canStop(7, 9001, false), true);
  assert.equal(s.canStop(7, 9002, true), false); // Bob's
  assert.equal(s.canStop(7, 9099, true), false); // a prompt not loaded
  s.isAdmin = true;
  assert.equal(s.canStop(7, 9002, true), true);
  s.isAdmin = false;
  // A regenerated answer: its requester is who asked again, not the prompt's author; queued, nobody.
  s.receive(answer(3, 9001), 0);
  s.receive(answer(4, 9002), 0);
  assert.equal(s.canStop(7, 9001, true), false);
  s.regenerate(9004); // I ask again for Bob's prompt
  assert.equal(s.canStop(7, 9002, true), true);
  assert.equal(s.canStop(7, 9002, false), false);
  const [owner] = live({ owner: ME });
  owner.receive(prompt(1, BOB), 0);
  assert.equal(owner.canStop(7, 9001, true), true); // the room owner
});

test("errors are shown in words, never as codes", () => {
  const [s] = live();
  const words = [];
  const cases = [
    ["x:1", "forbidden"], ["x:1", "not_found"], ["r:1", "conflict"], ["r:1", "not_found"], ["r:1", "busy"],
    [undefined, "internal"], [undefined, "unavailable"], [undefined, "something_new"],
  ];
  for (const [replyTo, code] of cases) {
    const out = notices(s.receive({ type: "error", code, message: "raw server text", reply_to: replyTo }, 0));
    assert.equal(out.length, 1);
    assert.equal(out[0].level, "error");
    words.push(out[0].text);
  }
  const [f] = sends(s.sendText(7, "x", 0));
  words.push(...notices(s.receive({ type: "error", code: "not_found", message: "room not found", reply_to: f.id }, 0)).map((n) => n.text));
  for (const text of words) assert.doesNotMatch(text, /[a-z]+_[a-z]+|raw server text/);
  assert.equal(words[0], "Only the person who asked, the room owner or an admin can stop this answer.");
  assert.equal(words.at(-1), "Not sent: You are no longer a member of this room.");
  // A typing or read frame refused as too soon: nothing to tell.
  assert.deepEqual(s.receive({ type: "error", code: "rate_limited", message: "too many typing frames" }, 0), []);
  assert.equal(describeError("quota_exceeded"), "You have used up today's assistant allowance. It renews at midnight (UTC).");
});

test("a policy close (1008) is followed by a reconnect, after a pause", () => {
  for (const rand of [0, 0.5, 0.999]) {
    const delay = reconnectDelay(3, 1008, rand);
    assert.ok(delay >= 2000 && delay <= 32000, delay);
  }
});
