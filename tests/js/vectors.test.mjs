// The shared vectors of tests/vectors/session (format: its README) run against chatd/static/js/session.js.
// tests/unit/client/test_vectors.py runs the same files against chatd/client/session.py, so that the two
// twins cannot drift. This adapter only translates the session's actions and state to the vector's names.
// Run by tests/unit/test_js.py (node --test).

import assert from "node:assert/strict";
import { readdirSync, readFileSync } from "node:fs";
import { test } from "node:test";

import { Session, afterClose } from "../../chatd/static/js/session.js";

const DIR = new URL("../vectors/session/", import.meta.url);
const FILES = readdirSync(DIR).filter((f) => f.endsWith(".json")).sort();

test("there are vectors", () => assert.ok(FILES.length >= 12));

function outputs(actions) {
  return {
    frames: actions.filter((a) => a.kind === "send").map((a) => a.frame),
    fetches: actions.filter((a) => a.kind === "fetch").map((a) => ({ room_id: a.roomId, purpose: a.purpose, query: a.query })),
    notices: actions.filter((a) => a.kind === "notice").map((a) => ({ room_id: a.roomId ?? null, level: a.level })),
    removed: actions.filter((a) => a.kind === "removed").map((a) => a.roomId),
    refresh: actions.some((a) => a.kind === "refresh"),
  };
}

const sorted = (xs) => [...xs].sort((a, b) => a - b);

function state(s, want) {
  const got = {};
  if ("live" in want) got.live = s.live;
  if ("pending" in want) got.pending = Object.fromEntries([...s.pending.values()].map((p) => [p.clientMsgId, p.state]));
  if ("rooms" in want) {
    got.rooms = {};
    for (const [rid, keys] of Object.entries(want.rooms)) {
      const room = s.rooms.get(Number(rid));
      const every = {
        last_seq: room.lastSeq,
        latest_seq: room.latestSeq,
        seqs: sorted(room.messages.keys()),
        buffered: sorted(room.buffer.keys()),
        typing: sorted(room.typing.keys()),
        joined: room.joined,
        reactions: Object.fromEntries(
          [...room.messages.entries()]
            .filter(([, m]) => m.reactions.length > 0)
            .sort(([a], [b]) => a - b)
            .map(([seq, m]) => [String(seq), Object.fromEntries(m.reactions.map((r) => [r.emoji, r.users]))]),
        ),
      };
      got.rooms[rid] = Object.fromEntries(Object.keys(keys).map((k) => [k, every[k]]));
    }
  }
  return got;
}

const round = (x) => Math.round(x * 1000) / 1000;

function step(s, st) {
  switch (st.do) {
    case "set_rooms": return [s.setRooms(st.rooms)];
    case "open_room": return [s.openRoom(st.room_id)];
    case "page": return [s.page(st.room_id, st.purpose, st.messages, st.has_more)];
    case "connection_opened": return [s.connectionOpened()];
    case "receive": return [s.receive(st.frame, st.now)];
    case "send_text": return [s.sendText(st.room_id, st.content, st.now)];
    case "input_changed": return [s.inputChanged(st.room_id, st.empty, st.now)];
    case "tick": return [s.tick(st.now)];
    case "react": return [s.react(st.room_id, st.message_id, st.emoji)];
    case "mark_read": return [s.markRead(st.room_id)];
    case "token_refreshed": return [s.tokenRefreshed(st.token)];
    case "closed": {
      const out = s.connectionLost();
      const low = afterClose(st.code, st.reason, st.attempt, 0);
      const high = afterClose(st.code, st.reason, st.attempt, 1 - Number.EPSILON / 2);
      return [out, { refresh_first: low.refreshFirst, policy: low.policy, delay_ms: [round(low.delayMs), round(high.delayMs)] }];
    }
    default: throw new Error(`unknown step ${st.do}`);
  }
}

for (const file of FILES) {
  test(`vector ${file}`, () => {
    const vector = JSON.parse(readFileSync(new URL(file, DIR), "utf8"));
    const s = new Session(vector.client_id);
    vector.steps.forEach((st, i) => {
      const where = `${file} step ${i} (${st.do})`;
      const [actions, decision] = step(s, st);
      const expect = st.expect ?? {};
      const want = {
        frames: expect.frames ?? [],
        fetches: expect.fetches ?? [],
        notices: expect.notices ?? [],
        removed: expect.removed ?? [],
        refresh: expect.refresh ?? false,
      };
      assert.deepEqual(outputs(actions), want, where);
      if ("after_close" in expect || decision !== undefined) assert.deepEqual(decision, expect.after_close, where);
      if ("state" in expect) assert.deepEqual(state(s, expect.state), expect.state, where);
    });
  });
}
