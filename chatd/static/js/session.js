// Sans-I/O client state of docs/PROTOCOL.md: frames, REST pages and user intents in, actions out.
// The same machine as chatd/client/session.py (its docstring states the invariants); keep them in step.
// Actions: {kind: "send", frame} | {kind: "fetch", roomId, purpose, query} | {kind: "refresh"} |
//          {kind: "notice", text, roomId, level: "info" | "error"} | {kind: "removed", roomId} | {kind: "redraw"}
//
// Limits (issue 22): the Session never sends over the server's send quota by itself (`hello.limits.send`:
// at most `count` sends per `window_ms`, as the server counts them), and stops sending on `busy` /
// `rate_limited` / `unavailable` until their `retry_after_ms` passed. Typing says `true` at most once per
// TYPING_RESEND_MS and `false` only after a `true`. Per-socket frame limits: see limits.js.

export const RESUME_ID = "resume";
const TYPING_TTL_MS = 6000; // ws.typing_ttl_s
// At most one `true` per 3 s: the server relays one per ws.typing_interval_s (2 s) anyway, and a remote
// indicator lasts ws.typing_ttl_s (6 s). Against ws.typing_rate_per_s = 3 with `false` after each `true`.
const TYPING_RESEND_MS = 3000;
const TYPING_IDLE_MS = 4000;
export const SEND_LIMIT = 20; // ws.send_rate_count, until `hello.limits.send` says
export const SEND_WINDOW_MS = 10000; // ws.send_rate_window_s, likewise
// Plus one slice (a tenth) of the window, in which the server counts sends across its workers.
const WINDOW_SLACK = 1.1;
const GAP_GRACE_MS = 1500; // the server fills its own gaps within ~0.25 s
const JOIN_RETRY_MS = 2000;
const UNAVAILABLE_RETRY_MS = 2000;
export const PAGE = 50;
const FILL_PAGE = 200;

const REDRAW = Object.freeze({ kind: "redraw" });
const send = (frame) => ({ kind: "send", frame });
const fetchPage = (roomId, purpose, query) => ({ kind: "fetch", roomId, purpose, query });
const notice = (text, roomId = null, level = "info") => ({ kind: "notice", text, roomId, level });

// Plain words for the error codes of PROTOCOL.md §5 (the UI shows no codes); `action` picks the words of
// one request where the general ones would mislead.
const WORDS = {
  rate_limited: "Too many requests at once: the app slows down and tries again.",
  busy: "The server is busy. Try again in a moment.",
  unavailable: "The server is having trouble. Try again in a moment.",
  forbidden: "You are not allowed to do that.",
  not_found: "That is no longer there.",
  conflict: "That was already done.",
  too_large: "That is too long.",
  content_blocked: "That contains something this server does not allow.",
  bad_request: "The server did not accept that.",
  quota_exceeded: "You have used up today's assistant allowance. It renews at midnight (UTC).",
  unauthorized: "Your session has ended. Sign in again.",
  internal: "Something went wrong on the server. Try again.",
  llm_unavailable: "The assistant cannot answer right now.",
};
const ACTION_WORDS = {
  send: {
    not_found: "You are no longer a member of this room.",
    conflict: "This room is archived: nothing more can be sent to it.",
    too_large: "This message is too long.",
    content_blocked: "This message contains something this server does not allow: it was not sent.",
    bad_request: "The server did not accept this message.",
  },
  cancel: {
    forbidden: "Only the person who asked, the room owner or an admin can stop this answer.",
    not_found: "This answer can no longer be stopped.",
  },
  react: {
    not_found: "This message is gone.",
    conflict: "No more reactions fit on this message, or it was deleted.",
    bad_request: "That is not an emoji the server takes.",
  },
  regenerate: {
    not_found: "This answer cannot be regenerated now: it is still being written, or it is gone.",
    conflict: "This answer was already regenerated.",
    bad_request: "Only an answer of the assistant can be regenerated.",
    busy: "The assistant is busy. Try again in a moment.",
  },
};

export function describeError(code, action = null) {
  return ACTION_WORDS[action]?.[code] ?? WORDS[code] ?? "Something went wrong. Try again.";
}

export function reconnectDelay(attempt, closeCode, rand) {
  // 1008: too many refused frames (reconnect, not at once) or a ban (the Connection's refresh tells).
  if (closeCode === 1008) return 2000 + rand * Math.min(30000, 1000 * 2 ** Math.min(attempt, 10));
  if (closeCode === 1001) return 50 + 500 * rand; // a worker stops: another serves at once
  if (closeCode === 4029) return 10000 + 20000 * rand; // too many connections
  return Math.max(100, rand * Math.min(30000, 500 * 2 ** Math.min(attempt, 10))); // full jitter
}

// What a client does when its socket closed (PROTOCOL.md §6, §10 step 1): 4001 (token expired, session
// revoked, ...) and 1008 "account banned" refresh first (a refresh answered 401 signs out: the ban's does);
// any other 1008 is a policy close (too many refused frames): explain it and reconnect after a pause.
export function afterClose(code, reason, attempt, rand) {
  const banned = code === 1008 && /banned/.test(reason ?? "");
  return { refreshFirst: code === 4001 || banned, policy: code === 1008 && !banned, delayMs: reconnectDelay(attempt, code, rand) };
}

function toMessage(d) {
  return {
    roomId: d.room_id,
    messageId: d.message_id,
    seq: d.seq,
    senderId: d.sender_id ?? null,
    role: d.role ?? "user",
    kind: d.kind ?? "text",
    content: d.content ?? "",
    clientMsgId: d.client_msg_id ?? null,
    createdAt: d.created_at ?? "",
    editedAt: d.edited_at ?? null,
    deleted: Boolean(d.deleted),
    replyTo: d.reply_to_message_id ?? null,
    status: d.status ?? null, // "cancelled" | "error": a partial answer
    superseded: Boolean(d.superseded),
    data: d.data ?? null, // kind file: the attachment; kind system: the event
    reactions: d.reactions ?? [], // [{emoji, count, users}], first-reaction order
    answeredBy: d.answered_by ?? null, // a room assistant's answer: {id, name, model}
    error: d.error ?? null, // why a room assistant's answer failed: {code, message}
    rev: 0, // the edit revision of the last change applied: an older change frame is dropped
  };
}

function newRoom(id) {
  return {
    id,
    name: "",
    kind: "group",
    ownerId: null,
    status: "active",
    readSeq: 0,
    mentionCount: 0, // mentions of you after readSeq (rooms list and read frames; new live messages counted here)
    receipts: new Map(), // user id -> the read marker the member shares (roster, then receipts frames)
    latestSeq: 0, // highest seq known to exist
    loaded: false, // history kept: lastSeq is contiguous
    lastSeq: 0,
    epoch: null, // of the room's seqs (from `joined`): sent back with since_seq
    editRev: null, // the room's edit revision at the last `joined`: sent back as since_rev
    firstSeq: 0,
    hasOlder: false,
    messages: new Map(), // seq -> message
    buffer: new Map(), // seq > lastSeq + 1
    joined: false,
    joinRetryAt: null,
    fetching: null,
    gapSince: null,
    online: new Set(),
    typing: new Map(), // user id -> expiry
    streams: new Map(), // answer message id -> {messageId, replyTo, model, text, lastIndex, ended, stopReason, interrupted}
    queued: new Map(), // prompt id -> position
    notes: new Map(), // message id -> text
  };
}

// Whether userId reacted with emoji (frames carry who reacted; "me" is computed here).
export function reacted(msg, userId, emoji) {
  return (msg.reactions ?? []).some((r) => r.emoji === emoji && (r.users ?? []).includes(userId));
}

function findMessage(room, messageId) {
  for (const m of room.messages.values()) if (m.messageId === messageId) return m;
  return null;
}

// PROTOCOL.md "Mentions": @name (case-insensitive, not inside a word) or @room.
export function mentions(content, name) {
  const text = (content ?? "").toLowerCase();
  const boundary = (ch) => ch === undefined || !/[\p{L}\p{N}_]/u.test(ch);
  for (const target of ["room", ...(name ? [name.toLowerCase()] : [])]) {
    for (let i = text.indexOf("@" + target); i >= 0; i = text.indexOf("@" + target, i + 1)) {
      if (boundary(text[i - 1]) && boundary(text[i + 1 + target.length])) return true;
    }
  }
  return false;
}

// "Seen by": the other members whose shared read marker reached seq.
export function seenBy(room, seq, userId) {
  let n = 0;
  for (const [user, readSeq] of room.receipts) if (user !== userId && readSeq >= seq) n += 1;
  return n;
}

export function unread(room) {
  return Math.max(0, room.latestSeq - room.readSeq);
}

export function ordered(room) {
  return [...room.messages.keys()].sort((a, b) => a - b).map((s) => room.messages.get(s));
}

export class Session {
  constructor(clientId) {
    this.clientId = clientId;
    this.userId = null;
    this.privateReads = false; // read markers for your own devices only: no receipts to other members
    this.connected = false;
    this.live = false;
    this.rooms = new Map();
    this.pending = new Map(); // client_msg_id -> {roomId, clientMsgId, content, state, retryAt, seq, error}
    this.counter = 0;
    this.acked = new Map(); // client_msg_id -> [roomId, seq]
    this.typingState = null; // {roomId, inputAt, shown}: shown = a `true` went out and no `false` since
    this.typingSentAt = -Infinity; // the last `true`, whatever its room
    this.sendLog = []; // times of the sends written, ascending: pacing to sendLimit per sendWindowMs
    this.sendLimit = SEND_LIMIT;
    this.sendWindowMs = SEND_WINDOW_MS * WINDOW_SLACK;
    this.holdUntil = 0; // after busy / rate_limited / unavailable: no send before
    this.probeUntil = 0; // and until then one send at a time: the server counts sends this client cannot see
    this.names = new Map(); // user id -> display name (roster pages, member events)
    this.isAdmin = false; // set by the app from the signed-in user's role
    this.regenerating = new Set(); // prompt ids this client asked a new answer for (it is its requester)
  }

  // -- rooms ------------------------------------------------------------------------------
  setRooms(list) {
    const out = [];
    const seen = new Set();
    for (const r of list) {
      seen.add(r.id);
      out.push(...this.upsertRoom(r));
    }
    for (const id of [...this.rooms.keys()]) {
      if (!seen.has(id)) {
        this.rooms.delete(id);
        out.push({ kind: "removed", roomId: id });
      }
    }
    out.push(REDRAW);
    return out;
  }

  upsertRoom(r) {
    // A REST room object in: a new room is joined when connected.
    const out = [];
    let room = this.rooms.get(r.id);
    if (!room) {
      room = newRoom(r.id);
      this.rooms.set(r.id, room);
      if (this.connected) out.push(this.join(room));
    }
    room.name = r.name;
    room.kind = r.kind;
    room.ownerId = r.owner_id;
    room.status = r.status ?? "active";
    room.readSeq = Math.max(room.readSeq, r.read_seq ?? 0);
    if (r.mention_count !== undefined) room.mentionCount = r.mention_count;
    room.latestSeq = Math.max(room.latestSeq, r.last_seq ?? 0);
    return out;
  }

  setMembers(members, roomId) {
    // A page of GET /rooms/{id}/members: the names senders are shown with, and each member's read receipt.
    const room = this.rooms.get(roomId);
    for (const m of members) {
      this.names.set(m.id, m.name);
      if (room && m.read_seq !== undefined) room.receipts.set(m.id, Math.max(room.receipts.get(m.id) ?? 0, m.read_seq));
    }
    return [REDRAW];
  }

  nameOf(userId) {
    if (userId === null || userId === undefined) return "";
    return this.names.get(userId) || `User ${userId}`;
  }

  openRoom(roomId) {
    const room = this.rooms.get(roomId);
    if (!room || room.loaded || room.fetching) return [];
    room.fetching = "latest";
    return [fetchPage(roomId, "latest", { limit: PAGE })];
  }

  loadOlder(roomId) {
    const room = this.rooms.get(roomId);
    if (!room || !room.loaded || !room.hasOlder || room.fetching) return [];
    room.fetching = "older";
    return [fetchPage(roomId, "older", { before_seq: room.firstSeq, limit: PAGE })];
  }

  page(roomId, purpose, messages, hasMore) {
    const room = this.rooms.get(roomId);
    if (!room) return [];
    room.fetching = null;
    const msgs = messages.map(toMessage);
    const out = [];
    if (purpose === "older") {
      const older = msgs.filter((m) => m.seq < room.firstSeq);
      for (const m of older) room.messages.set(m.seq, m);
      if (older.length) room.firstSeq = older[0].seq;
      room.hasOlder = hasMore && older.length > 0;
      return [{ kind: "older", roomId, count: older.length }, REDRAW];
    }
    if (purpose === "latest") {
      const newest = msgs.length ? msgs[msgs.length - 1].seq : 0;
      if (!room.loaded || (msgs.length && msgs[0].seq > room.lastSeq + 1)) {
        // First load, or a gap too large to replay: start over from the newest page.
        room.messages.clear();
        for (const s of [...room.buffer.keys()]) if (s <= newest) room.buffer.delete(s);
        room.loaded = true;
        room.lastSeq = msgs.length ? msgs[0].seq - 1 : 0;
        room.firstSeq = msgs.length ? msgs[0].seq : 1;
        room.hasOlder = hasMore;
      }
      for (const m of msgs) this.apply(room, m);
      if (this.connected) out.push(this.join(room)); // replays whatever came after the page
      out.push(REDRAW);
      return out;
    }
    for (const m of msgs) this.apply(room, m); // fill
    if (hasMore && room.lastSeq < room.latestSeq && msgs.length) {
      room.fetching = "fill";
      out.push(fetchPage(roomId, "fill", { after_seq: room.lastSeq, limit: FILL_PAGE }));
    }
    out.push(REDRAW);
    return out;
  }

  pageFailed(roomId) {
    const room = this.rooms.get(roomId);
    if (room) {
      room.fetching = null;
      room.gapSince = null;
    }
    return [REDRAW];
  }

  // -- connection -------------------------------------------------------------------------
  connectionOpened() {
    this.connected = true;
    this.live = false;
    return [REDRAW];
  }

  connectionLost() {
    this.connected = false;
    this.live = false;
    for (const p of this.pending.values()) if (p.state === "sent") p.state = "queued";
    for (const room of this.rooms.values()) {
      room.joined = false;
      room.typing.clear();
      room.queued.clear(); // join does not resend `queued`
      for (const s of room.streams.values()) s.interrupted = true;
    }
    this.typingState = null;
    return [REDRAW];
  }

  tokenRefreshed(accessToken) {
    return this.connected ? [send({ type: "auth", id: "auth", token: accessToken })] : [];
  }

  // -- the outbox ---------------------------------------------------------------------------
  outbox() {
    // The sends not stored yet, in order, for the app to keep over a reload (resent with the same ids).
    return [...this.pending.values()]
      .filter((p) => p.state !== "acked" && p.state !== "failed")
      .map((p) => ({ roomId: p.roomId, clientMsgId: p.clientMsgId, content: p.content }));
  }

  restore(entries, sendLog = [], holdUntil = 0) {
    // A kept outbox (and the times of the sends that count against the quota) back after a reload.
    for (const e of entries) {
      if (this.pending.has(e.clientMsgId)) continue;
      const p = { roomId: e.roomId, clientMsgId: e.clientMsgId, content: e.content, state: "queued", retryAt: null, seq: null, error: null };
      this.pending.set(e.clientMsgId, p);
    }
    this.sendLog = [...sendLog, ...this.sendLog].sort((a, b) => a - b);
    this.holdUntil = Math.max(this.holdUntil, holdUntil);
    return [REDRAW];
  }

  // -- user intents ------------------------------------------------------------------------
  sendText(roomId, content, now = 0) {
    this.counter += 1;
    const clientMsgId = `${this.clientId}-${this.counter}`;
    const p = { roomId, clientMsgId, content, state: "queued", retryAt: null, seq: null, error: null };
    this.pending.set(clientMsgId, p);
    const out = this.stopTyping();
    out.push(...this.flush(now));
    out.push(REDRAW);
    return out;
  }

  inputChanged(roomId, empty, now) {
    if (empty) return this.stopTyping();
    const out = this.typingState && this.typingState.roomId !== roomId ? this.stopTyping() : [];
    if (!this.typingState) this.typingState = { roomId, inputAt: now, shown: false };
    this.typingState.inputAt = now;
    if (this.live && now - this.typingSentAt >= TYPING_RESEND_MS) out.push(this.typingOn(now));
    return out;
  }

  markRead(roomId) {
    const room = this.rooms.get(roomId);
    if (!room || !room.loaded || room.lastSeq <= room.readSeq) return [];
    room.readSeq = room.lastSeq;
    room.mentionCount = 0;
    const out = [REDRAW];
    if (this.connected) {
      out.push(send({ type: "read", room_id: roomId, seq: room.lastSeq, ...(this.privateReads ? { private: true } : {}) }));
    }
    return out;
  }

  cancel(roomId, messageId) {
    // messageId: a streaming answer's id, or a queued prompt's id.
    if (!this.connected) return [];
    return [send({ type: "cancel", id: `x:${messageId}`, message_id: messageId })];
  }

  // Toggle the user's emoji on a message: removed if theirs already, else added. The counts change when the
  // room's message_updated comes (this socket gets it too), not before.
  react(roomId, messageId, emoji) {
    const room = this.rooms.get(roomId);
    const msg = room ? findMessage(room, messageId) : null;
    if (!msg || !this.connected) return [];
    const add = !reacted(msg, this.userId, emoji);
    return [send({ type: "react", id: `e:${messageId}`, message_id: messageId, emoji, add })];
  }

  regenerate(messageId) {
    if (!this.connected) return [];
    for (const room of this.rooms.values()) {
      const answer = findMessage(room, messageId);
      if (answer?.replyTo != null) this.regenerating.add(answer.replyTo);
    }
    return [send({ type: "regenerate", id: `r:${messageId}`, message_id: messageId })];
  }

  // Whether the server lets this user stop the answer to `promptId` (PROTOCOL.md §3 cancel): while it
  // streams, its requester (the prompt's author; for a regenerated answer, who asked again), the room
  // owner or an admin; while queued, the prompt's author, the owner or an admin, and never a queued
  // regeneration.
  canStop(roomId, promptId, streaming) {
    const room = this.rooms.get(roomId);
    if (!room || this.userId === null) return false;
    const regeneration = [...room.messages.values()].some((m) => m.role === "assistant" && m.replyTo === promptId);
    if (regeneration && !streaming) return false;
    if (this.isAdmin || room.ownerId === this.userId) return true;
    if (regeneration) return this.regenerating.has(promptId);
    return findMessage(room, promptId)?.senderId === this.userId;
  }

  // -- time --------------------------------------------------------------------------------
  tick(now) {
    const out = [];
    let changed = false;
    const t = this.typingState;
    if (t && now - t.inputAt >= TYPING_IDLE_MS) out.push(...this.stopTyping());
    else if (t && this.live && t.inputAt > this.typingSentAt && now - this.typingSentAt >= TYPING_RESEND_MS) {
      // Typed since the last `true` (held back by the throttle, or the indicator is about to expire): say it.
      out.push(this.typingOn(now));
    }
    for (const room of this.rooms.values()) {
      for (const [uid, exp] of [...room.typing]) {
        if (exp <= now) {
          room.typing.delete(uid);
          changed = true;
        }
      }
      if (!this.live) continue;
      if (room.joinRetryAt !== null && room.joinRetryAt <= now) out.push(this.join(room));
      if (room.loaded && room.joined && !room.fetching && room.latestSeq > room.lastSeq) {
        if (room.gapSince === null) room.gapSince = now;
        else if (now - room.gapSince >= GAP_GRACE_MS) {
          room.gapSince = null;
          room.fetching = "fill";
          out.push(fetchPage(room.id, "fill", { after_seq: room.lastSeq, limit: FILL_PAGE }));
        }
      } else {
        room.gapSince = null;
      }
    }
    const sent = this.flush(now);
    if (sent.length) {
      out.push(...sent);
      changed = true;
    }
    if (changed) out.push(REDRAW);
    return out;
  }

  // -- frames ------------------------------------------------------------------------------
  receive(frame, now) {
    const handler = HANDLERS[frame.type];
    return handler ? handler.call(this, frame, now) : []; // unknown types: ignored
  }

  onHello(f) {
    this.userId = f.user_id;
    const quota = f.limits?.send;
    if (Number.isInteger(quota?.count) && quota.count > 0 && quota.window_ms > 0) {
      this.sendLimit = quota.count;
      this.sendWindowMs = quota.window_ms * WINDOW_SLACK;
    }
    const out = [...this.rooms.values()].map((room) => this.join(room));
    out.push(send({ type: "ping", id: RESUME_ID })); // barrier (§10 step 4)
    return out;
  }

  onJoined(f) {
    const room = this.rooms.get(f.room_id);
    if (!room) return [];
    room.joined = true;
    room.joinRetryAt = null;
    room.online = new Set(f.online ?? []);
    if (Number.isInteger(f.edit_rev)) room.editRev = f.edit_rev; // the changes before it came ahead of `joined`
    const epoch = typeof f.epoch === "string" ? f.epoch : null;
    if (epoch !== null && room.epoch !== null && epoch !== room.epoch && room.loaded) {
      // Another history of the room (a restore, a failover): what we hold is not its past.
      room.epoch = epoch;
      room.messages.clear();
      room.buffer.clear();
      room.loaded = false;
      room.lastSeq = 0;
      room.latestSeq = f.last_seq ?? 0;
      room.fetching = "latest";
      return [fetchPage(room.id, "latest", { limit: PAGE }), REDRAW];
    }
    if (epoch !== null) room.epoch = epoch;
    room.latestSeq = Math.max(room.latestSeq, f.last_seq ?? 0);
    return [REDRAW];
  }

  onLeft(f) {
    if (f.reply_to !== undefined) {
      const room = this.rooms.get(f.room_id);
      if (room) room.joined = false;
      return [REDRAW];
    }
    if (!this.rooms.delete(f.room_id)) return []; // removed by the owner
    return [{ kind: "removed", roomId: f.room_id }, notice("You were removed from this room.", f.room_id), REDRAW];
  }

  onRoomAdded(f) {
    const r = f.room;
    if (!r || r.id === undefined) return [];
    const known = this.rooms.has(r.id);
    const out = this.upsertRoom(r);
    if (!known) out.push(notice(`You were added to ${r.name}.`, r.id));
    out.push(REDRAW);
    return out;
  }

  onRoomRemoved(f) {
    if (!this.rooms.delete(f.room_id)) return []; // already gone (its `left` came first)
    const text = f.reason === "left" ? "You left this room." : "You were removed from this room.";
    return [{ kind: "removed", roomId: f.room_id }, notice(text, f.room_id), REDRAW];
  }

  onRoomUpdated(f) {
    const r = f.room;
    if (!r || !this.rooms.has(r.id)) return [];
    return [...this.upsertRoom(r), REDRAW];
  }

  onAnnouncement(f) {
    return [notice(`Announcement: ${f.content ?? ""}`)];
  }

  onResync(f) {
    const room = this.rooms.get(f.room_id);
    if (!room) return [];
    room.latestSeq = Math.max(room.latestSeq, f.last_seq ?? 0);
    if (!room.loaded || room.fetching === "latest") return [REDRAW]; // not loaded, or reloading (new epoch)
    room.fetching = "latest"; // too far behind to replay: newest page, then rejoin from it
    return [fetchPage(room.id, "latest", { limit: PAGE })];
  }

  onAck(f) {
    const p = this.pending.get(f.client_msg_id);
    const room = this.rooms.get(f.room_id);
    if (room) room.latestSeq = Math.max(room.latestSeq, f.seq);
    this.acked.set(f.client_msg_id, [f.room_id, f.seq]); // an assistant refusal may follow
    if (this.acked.size > 256) this.acked.delete(this.acked.keys().next().value);
    if (!p) return [];
    if (!room || !room.loaded || room.lastSeq >= f.seq) this.pending.delete(p.clientMsgId);
    else {
      p.state = "acked";
      p.seq = f.seq;
    }
    return [REDRAW];
  }

  onMessage(f) {
    const room = this.rooms.get(f.room_id);
    if (!room) return [];
    const msg = toMessage(f);
    // Only a message newer than any seq known yet: the rooms list's count already has the older ones.
    if (msg.seq > room.latestSeq && msg.seq > room.readSeq && msg.kind !== "system" && msg.senderId !== this.userId) {
      if (mentions(msg.content, this.names.get(this.userId))) room.mentionCount += 1;
    }
    room.latestSeq = Math.max(room.latestSeq, msg.seq);
    if (msg.kind === "system" && msg.data?.user_id && msg.data?.name) this.names.set(msg.data.user_id, msg.data.name);
    if (!room.loaded) {
      this.settlePending(msg);
      if (msg.role === "assistant") room.streams.delete(msg.messageId);
      return [REDRAW];
    }
    this.apply(room, msg);
    return [REDRAW];
  }

  onUpdated(f) {
    const room = this.rooms.get(f.room_id);
    const msg = room?.messages.get(f.seq);
    if (!msg || msg.messageId !== f.message_id) return [];
    if (Number.isInteger(f.rev)) {
      if (f.rev < msg.rev) return []; // an older state than the one shown (a late publish after the join's repair)
      msg.rev = f.rev;
    }
    if (f.type === "message_deleted") {
      msg.deleted = true;
      msg.content = "";
      msg.reactions = [];
    } else {
      msg.content = f.content ?? "";
      msg.editedAt = f.edited_at ?? null;
      msg.reactions = f.reactions ?? [];
    }
    return [REDRAW];
  }

  onTyping(f, now) {
    const room = this.rooms.get(f.room_id);
    if (!room || f.user_id === this.userId) return [];
    if (f.is_typing) room.typing.set(f.user_id, now + TYPING_TTL_MS);
    else room.typing.delete(f.user_id);
    return [REDRAW];
  }

  onPresence(f) {
    const room = this.rooms.get(f.room_id);
    if (!room) return [];
    for (const u of f.online) room.online.add(u);
    for (const u of f.offline) room.online.delete(u);
    return [REDRAW];
  }

  onRead(f) {
    const room = this.rooms.get(f.room_id);
    if (!room) return [];
    if (f.seq >= room.readSeq) {
      room.readSeq = f.seq;
      room.mentionCount = f.mention_count ?? 0;
    }
    return [REDRAW];
  }

  onReceipts(f) {
    const room = this.rooms.get(f.room_id);
    if (!room) return [];
    for (const r of f.receipts) room.receipts.set(r.user_id, Math.max(room.receipts.get(r.user_id) ?? 0, r.read_seq));
    return [REDRAW];
  }

  onPong(f, now) {
    if (f.reply_to !== RESUME_ID || !this.connected) return [];
    this.live = true;
    const out = [];
    for (const room of this.rooms.values()) {
      // Streams not re-announced during the resume ended while we were away (§10).
      for (const [mid, s] of [...room.streams]) if (s.interrupted) room.streams.delete(mid);
      if (room.loaded && room.joined && !room.fetching && room.lastSeq < room.latestSeq) {
        room.fetching = "fill";
        out.push(fetchPage(room.id, "fill", { after_seq: room.lastSeq, limit: FILL_PAGE }));
      }
    }
    out.push(...this.flush(now));
    out.push(REDRAW);
    return out;
  }

  onTokenExpiring() {
    return [{ kind: "refresh" }];
  }

  onError(f, now) {
    const replyTo = typeof f.reply_to === "string" ? f.reply_to : "";
    if (replyTo.startsWith("s:")) return this.sendError(replyTo.slice(2), f, now);
    if (replyTo.startsWith("j:")) {
      const roomId = Number(replyTo.slice(2));
      if (f.code === "not_found") {
        return this.rooms.delete(roomId) ? [{ kind: "removed", roomId }, REDRAW] : [];
      }
      const room = this.rooms.get(roomId);
      if (room) room.joinRetryAt = now + JOIN_RETRY_MS;
      return [];
    }
    if (replyTo.startsWith("x:")) return [notice(describeError(f.code, "cancel"), null, "error")];
    if (replyTo.startsWith("r:")) return [notice(describeError(f.code, "regenerate"), null, "error")];
    if (replyTo.startsWith("e:")) return [notice(describeError(f.code, "react"), null, "error")];
    // A typing or read frame refused as too soon: nothing the user can act on (and the app paces them).
    if (f.code === "rate_limited") return [];
    if (f.code === "llm_unavailable") return [notice(`The assistant could not answer: ${f.message}`, null, "error")];
    return [notice(describeError(f.code), null, "error")];
  }

  sendError(clientMsgId, f, now) {
    const p = this.pending.get(clientMsgId);
    if (!p || p.state === "acked") {
      // After the ack: stored, but the assistant refused to answer it (§5).
      const [roomId, seq] = this.acked.get(clientMsgId) ?? [null, null];
      const msg = this.rooms.get(roomId)?.messages.get(seq);
      const text = `The assistant did not answer: ${f.message}`;
      if (msg) this.rooms.get(roomId).notes.set(msg.messageId, text);
      return [notice(text, roomId, "error"), REDRAW];
    }
    if (["rate_limited", "busy", "unavailable"].includes(f.code)) {
      // Over the quota, overloaded or Postgres down: nothing stored (or maybe, for unavailable); no send
      // goes out before retry_after_ms, then this one again with the same client_msg_id, in its place.
      p.state = "waiting";
      p.retryAt = now + (Number.isInteger(f.retry_after_ms) ? f.retry_after_ms : UNAVAILABLE_RETRY_MS);
      this.holdUntil = Math.max(this.holdUntil, p.retryAt);
      this.probeUntil = this.holdUntil + this.sendWindowMs;
      return [REDRAW];
    }
    p.state = "failed";
    p.error = describeError(f.code, "send");
    return [notice(`Not sent: ${p.error}`, p.roomId, "error"), REDRAW];
  }

  onQueued(f) {
    const room = this.rooms.get(f.room_id);
    if (!room) return [];
    room.queued.set(f.reply_to_message_id, f.position ?? 1);
    return [REDRAW];
  }

  onCancelled(f) {
    // A queued answer was cancelled before it started: its waiting indicator goes.
    const room = this.rooms.get(f.room_id);
    if (!room || !room.queued.delete(f.reply_to_message_id)) return [];
    return [REDRAW];
  }

  onStreamStart(f) {
    const room = this.rooms.get(f.room_id);
    if (!room) return [];
    room.queued.delete(f.reply_to_message_id);
    // A fresh bubble, also when re-announced on join: the catch-up chunk (whole text, index > -1) rebuilds it.
    room.streams.set(f.message_id, {
      messageId: f.message_id,
      replyTo: f.reply_to_message_id,
      model: f.model ?? "",
      answeredBy: f.answered_by ?? null, // one of the room's assistants: {id, name, model}
      text: "",
      lastIndex: -1,
      ended: false,
      stopReason: null,
      interrupted: false,
    });
    return [REDRAW];
  }

  onStreamChunk(f) {
    const stream = this.rooms.get(f.room_id)?.streams.get(f.message_id);
    if (!stream || f.index <= stream.lastIndex) return [];
    stream.text += f.content ?? "";
    stream.lastIndex = f.index;
    return [REDRAW];
  }

  onStreamEnd(f) {
    const room = this.rooms.get(f.room_id);
    const stream = room?.streams.get(f.message_id);
    if (!stream) return []; // not open: e.g. an orphan's end after a takeover
    const seq = f.seq ?? 0;
    room.latestSeq = Math.max(room.latestSeq, seq);
    if (seq === 0 || room.messages.has(seq) || !room.loaded) room.streams.delete(stream.messageId);
    else {
      stream.ended = true;
      stream.stopReason = f.stop_reason ?? null;
    }
    return [REDRAW];
  }

  // -- internals ---------------------------------------------------------------------------
  join(room) {
    room.joinRetryAt = null;
    const frame = { type: "join", id: `j:${room.id}`, room_id: room.id };
    if (room.loaded) {
      frame.since_seq = room.lastSeq;
      if (room.epoch !== null) frame.epoch = room.epoch;
      if (room.editRev !== null) frame.since_rev = room.editRev; // edits, deletes and reactions missed meanwhile
    }
    return send(frame);
  }

  flush(now) {
    // Sends due, in order, as many as the quota allows now; the rest go from a later tick.
    if (!this.live) return [];
    const probing = now < this.probeUntil; // after a refusal: the next send waits for the answer to this one
    if (probing && [...this.pending.values()].some((p) => p.state === "sent")) return [];
    const out = [];
    for (const p of this.pending.values()) {
      if (p.state !== "queued" && !(p.state === "waiting" && p.retryAt <= now)) continue;
      if (!this.maySend(now)) break;
      out.push(this.sendPending(p, now));
      if (probing) break;
    }
    return out;
  }

  maySend(now) {
    if (now < this.holdUntil) return false;
    while (this.sendLog.length && this.sendLog[0] <= now - this.sendWindowMs) this.sendLog.shift();
    return this.sendLog.length < this.sendLimit;
  }

  sendPending(p, now) {
    p.state = "sent";
    p.retryAt = null;
    this.sendLog.push(now);
    return send({ type: "send", id: `s:${p.clientMsgId}`, room_id: p.roomId, content: p.content, client_msg_id: p.clientMsgId });
  }

  typingOn(now) {
    this.typingSentAt = now;
    this.typingState.shown = true;
    return send({ type: "typing", room_id: this.typingState.roomId, is_typing: true });
  }

  stopTyping() {
    const t = this.typingState;
    this.typingState = null;
    return t?.shown && this.connected ? [send({ type: "typing", room_id: t.roomId, is_typing: false })] : [];
  }

  settlePending(msg) {
    if (msg.clientMsgId === null || msg.senderId === null || msg.senderId !== this.userId) return;
    const p = this.pending.get(msg.clientMsgId);
    if (p && p.roomId === msg.roomId && p.state !== "failed") this.pending.delete(msg.clientMsgId); // stored: never resend
  }

  apply(room, msg) {
    // Apply in seq order: duplicates refresh the stored copy, later seqs wait for the gap.
    if (msg.seq <= room.lastSeq) {
      const known = room.messages.get(msg.seq);
      if (known && known.messageId === msg.messageId) {
        known.content = msg.content;
        known.status = msg.status;
        known.deleted = msg.deleted;
        known.reactions = msg.reactions;
        known.superseded = known.superseded || msg.superseded;
      }
      this.settlePending(msg);
      return;
    }
    if (msg.seq > room.lastSeq + 1) {
      room.buffer.set(msg.seq, msg);
      return;
    }
    let next = msg;
    while (next) {
      room.messages.set(next.seq, next);
      if (next.senderId !== null) room.typing.delete(next.senderId); // sent: no longer typing it
      room.lastSeq = next.seq;
      room.gapSince = null;
      this.settlePending(next);
      if (next.role === "assistant") {
        room.streams.delete(next.messageId);
        if (next.replyTo !== null) {
          // A new answer to the same prompt replaces the older ones (no live frame says so).
          for (const old of room.messages.values()) {
            if (old !== next && old.role === "assistant" && old.replyTo === next.replyTo) old.superseded = true;
          }
        }
      }
      next = room.buffer.get(room.lastSeq + 1);
      room.buffer.delete(room.lastSeq + 1);
    }
    for (const s of [...room.buffer.keys()]) if (s <= room.lastSeq) room.buffer.delete(s);
  }
}

// Frame type -> handler.
const HANDLERS = {
  hello: Session.prototype.onHello,
  joined: Session.prototype.onJoined,
  left: Session.prototype.onLeft,
  resync_required: Session.prototype.onResync,
  ack: Session.prototype.onAck,
  message: Session.prototype.onMessage,
  message_updated: Session.prototype.onUpdated,
  message_deleted: Session.prototype.onUpdated,
  typing: Session.prototype.onTyping,
  presence: Session.prototype.onPresence,
  read: Session.prototype.onRead,
  receipts: Session.prototype.onReceipts,
  pong: Session.prototype.onPong,
  token_expiring: Session.prototype.onTokenExpiring,
  error: Session.prototype.onError,
  queued: Session.prototype.onQueued,
  cancelled: Session.prototype.onCancelled,
  stream_start: Session.prototype.onStreamStart,
  stream_chunk: Session.prototype.onStreamChunk,
  stream_end: Session.prototype.onStreamEnd,
  room_added: Session.prototype.onRoomAdded,
  room_removed: Session.prototype.onRoomRemoved,
  room_updated: Session.prototype.onRoomUpdated,
  announcement: Session.prototype.onAnnouncement,
};
