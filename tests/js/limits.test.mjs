// chatd/static/js/limits.js: the web app's frames never go over the server's per-socket limits.
// Run by tests/unit/test_js.py (node --test).

import assert from "node:assert/strict";
import { test } from "node:test";

import { FRAME_LIMITS, FrameGate, frameLimits } from "../../chatd/static/js/limits.js";

const GROUPS = { join: "join", leave: "join", read: "read", typing: "typing", cancel: "control", regenerate: "control" };

// The server's limiter (chatd/core/framelimits.py: TokenBucket, FrameLimiter.hit), to check the gate against.
class ServerBucket {
  constructor([rate, burst]) {
    this.rate = rate;
    this.burst = burst;
    this.tokens = burst;
    this.stamp = null;
  }
  take(nowS) {
    if (this.stamp !== null) this.tokens = Math.min(this.burst, this.tokens + (nowS - this.stamp) * this.rate);
    this.stamp = nowS;
    if (this.tokens >= 1) {
      this.tokens -= 1;
      return 0;
    }
    return (1 - this.tokens) / this.rate;
  }
}

function serverLimiter(limits = FRAME_LIMITS) {
  const buckets = Object.fromEntries(Object.entries(limits).map(([k, v]) => [k, new ServerBucket(v)]));
  return (frame, nowMs) => {
    if (frame.type === "send") return true;
    let wait = buckets.all.take(nowMs / 1000);
    const group = GROUPS[frame.type];
    if (!wait && group) wait = buckets[group].take(nowMs / 1000);
    return wait === 0;
  };
}

// Drive a gate as connection.js does (a timer for the next due frame) over a schedule of frames.
function drive(gate, schedule) {
  const out = []; // [time, frame]
  let timerAt = null;
  const write = (now, frames) => {
    for (const f of frames) out.push([now, f]);
    const wait = gate.nextInMs(now);
    if (wait !== null && timerAt === null) timerAt = now + wait;
  };
  for (const [at, frame] of schedule) {
    while (timerAt !== null && timerAt <= at) {
      const now = timerAt;
      timerAt = null;
      write(now, gate.release(now));
    }
    write(at, gate.push(frame, at));
  }
  while (timerAt !== null) {
    const now = timerAt;
    timerAt = null;
    write(now, gate.release(now));
  }
  return out;
}

function random(seed) {
  let x = seed;
  return () => {
    x = (x * 1103515245 + 12345) % 2147483648;
    return x / 2147483648;
  };
}

test("a random storm of frames passes the server's limiter without a refusal, in order", () => {
  const rand = random(7);
  const types = ["join", "read", "typing", "cancel", "ping", "send", "leave", "regenerate"];
  const schedule = [];
  let t = 0;
  for (let i = 0; i < 3000; i++) {
    t += rand() < 0.8 ? 0 : rand() * 200; // mostly bursts
    const type = types[Math.floor(rand() * types.length)];
    schedule.push([t, { type, room_id: Math.floor(rand() * 300), seq: i, id: `f${i}` }]);
  }
  const out = drive(new FrameGate(), schedule);
  const allowed = serverLimiter();
  const refused = out.filter(([at, f]) => !allowed(f, at));
  assert.deepEqual(refused, []);
  // Only waiting reads and typing frames of the same room were merged; everything else went, in order.
  const kept = out.map(([, f]) => f.id).filter((id) => !["read", "typing"].includes(schedule[Number(id.slice(1))][1].type));
  const expected = schedule.map(([, f]) => f).filter((f) => !["read", "typing"].includes(f.type)).map((f) => f.id);
  assert.deepEqual(kept, expected);
});

test("joins over the burst wait, and the resume ping after them waits too", () => {
  const gate = new FrameGate();
  let sent = [];
  for (let room = 1; room <= 150; room++) sent.push(...gate.push({ type: "join", room_id: room }, 0));
  sent.push(...gate.push({ type: "ping", id: "resume" }, 0));
  assert.equal(sent.length, 80); // 0.8 of join_burst 100
  assert.equal(gate.nextInMs(0), 125); // 0.8 of 10/s
  const later = gate.release(10_000);
  assert.equal(later.length, 71);
  assert.deepEqual(later.at(-1), { type: "ping", id: "resume" });
});

test("a waiting read or typing frame of a room is replaced by the newer one", () => {
  const gate = new FrameGate({ ...FRAME_LIMITS, read: [1, 1] });
  assert.equal(gate.push({ type: "read", room_id: 7, seq: 1 }, 0).length, 1);
  assert.deepEqual(gate.push({ type: "read", room_id: 7, seq: 2 }, 0), []);
  assert.deepEqual(gate.push({ type: "read", room_id: 7, seq: 3 }, 0), []);
  assert.deepEqual(gate.release(2000), [{ type: "read", room_id: 7, seq: 3 }]);
});

test("sends are not counted here (the Session paces them), but keep their place behind a waiting frame", () => {
  const gate = new FrameGate({ ...FRAME_LIMITS, control: [1, 1] });
  assert.equal(gate.push({ type: "cancel", message_id: 1 }, 0).length, 1);
  assert.deepEqual(gate.push({ type: "cancel", message_id: 2 }, 0), []);
  assert.deepEqual(gate.push({ type: "send", client_msg_id: "a" }, 0), []);
  assert.deepEqual(gate.release(1250).map((f) => f.type), ["cancel", "send"]);
  for (let i = 0; i < 500; i++) assert.equal(gate.push({ type: "send", client_msg_id: `s${i}` }, 2000).length, 1);
});

test("hello.limits replace the defaults they name", () => {
  const limits = frameLimits({ typing: { per_s: 1, burst: 2 }, join: { per_s: 0, burst: 5 }, bogus: { per_s: 9, burst: 9 } });
  assert.deepEqual(limits, { ...FRAME_LIMITS, typing: [1, 2] });
  assert.deepEqual(frameLimits(undefined), FRAME_LIMITS);
});
