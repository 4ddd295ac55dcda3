// Sans-I/O client state of docs/PROTOCOL.md: frames, REST pages and user intents in, actions out.
// The same machine as chatd/client/session.py (its docstring states the invariants); keep them in step.
// Actions: {kind: "send", frame} | {kind: "fetch", roomId, purpose, query} | {kind: "refresh"} |
//          {kind: "notice", text, roomId} | {kind: "removed", roomId} | {kind: "redraw"}

export const RESUME_ID = "resume";
const TYPING_TTL_MS = 6000; // ws.typing_ttl_s
const TYPING_RESEND_MS = 2000; // ws.typing_interval_s
const TYPING_IDLE_MS = 4000;
const GAP_GRACE_MS = 1500; // the server fills its own gaps within ~0.25 s
const JOIN_RETRY_MS = 2000;
const UNAVAILABLE_RETRY_MS = 2000;
export const PAGE = 50;
const FILL_PAGE = 200;

const REDRAW = Object.freeze({ kind: "redraw" });
const send = (frame) => ({ kind: "send", frame });
const fetchPage = (roomId, purpose, query) => ({ kind: "fetch", roomId, purpose, query });
const notice = (text, roomId = null) => ({ kind: "notice", text, roomId });

export function reconnectDelay(attempt, closeCode, rand) {
  if (closeCode === 1008) return null; // banned
  if (closeCode === 1001) return 50 + 500 * rand; // a worker stops: another serves at once
  if (closeCode === 4029) return 10000 + 20000 * rand; // too many connections
  return Math.max(100, rand * Math.min(30000, 500 * 2 ** Math.min(attempt, 10))); // full jitter
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
    latestSeq: 0, // highest seq known to exist
    loaded: false, // history kept: lastSeq is contiguous
    lastSeq: 0,
    epoch: null, // of the room's seqs (from `joined`): sent back with since_seq
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
    this.connected = false;
    this.live = false;
    this.rooms = new Map();
    this.pending = new Map(); // client_msg_id -> {roomId, clientMsgId, content, state, retryAt, seq, error}
    this.counter = 0;
    this.acked = new Map(); // client_msg_id -> [roomId, seq]
    this.typingState = null; // {roomId, sentAt, inputAt}
    this.names = new Map(); // user id -> display name (roster pages, member events)
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
    room.latestSeq = Math.max(room.latestSeq, r.last_seq ?? 0);
    return out;
  }

  setMembers(members) {
    // A page of GET /rooms/{id}/members: the names senders are shown with.
    for (const m of members) this.names.set(m.id, m.name);
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

  // -- user intents ------------------------------------------------------------------------
  sendText(roomId, content) {
    this.counter += 1;
    const clientMsgId = `${this.clientId}-${this.counter}`;
    const p = { roomId, clientMsgId, content, state: "queued", retryAt: null, seq: null, error: null };
    this.pending.set(clientMsgId, p);
    const out = this.stopTyping();
    if (this.live) out.push(this.sendPending(p));
    out.push(REDRAW);
    return out;
  }

  inputChanged(roomId, empty, now) {
    if (empty) return this.stopTyping();
    const out = this.typingState && this.typingState.roomId !== roomId ? this.stopTyping() : [];
    if (!this.live) return out;
    if (!this.typingState || now - this.typingState.sentAt >= TYPING_RESEND_MS) {
      this.typingState = { roomId, sentAt: now, inputAt: now };
      out.push(send({ type: "typing", room_id: roomId, is_typing: true }));
    } else {
      this.typingState.inputAt = now;
    }
    return out;
  }

  markRead(roomId) {
    const room = this.rooms.get(roomId);
    if (!room || !room.loaded || room.lastSeq <= room.readSeq) return [];
    room.readSeq = room.lastSeq;
    const out = [REDRAW];
    if (this.connected) out.push(send({ type: "read", room_id: roomId, seq: room.lastSeq }));
    return out;
  }

  cancel(roomId, messageId) {
    // messageId: a streaming answer's id, or a queued prompt's id.
    if (!this.connected) return [];
    return [send({ type: "cancel", id: `x:${messageId}`, message_id: messageId })];
  }

  regenerate(messageId) {
    if (!this.connected) return [];
    return [send({ type: "regenerate", id: `r:${messageId}`, message_id: messageId })];
  }

  // -- time --------------------------------------------------------------------------------
  tick(now) {
    const out = [];
    let changed = false;
    const t = this.typingState;
    if (t && now - t.inputAt >= TYPING_IDLE_MS) out.push(...this.stopTyping());
    else if (t && this.live && t.inputAt > t.sentAt && now - t.sentAt >= TYPING_RESEND_MS) {
      // Still typing since the last `true` (which the server may have throttled away): say it again.
      t.sentAt = now;
      out.push(send({ type: "typing", room_id: t.roomId, is_typing: true }));
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
    if (this.live) {
      for (const p of this.pending.values()) {
        if (p.state === "waiting" && p.retryAt !== null && p.retryAt <= now) {
          out.push(this.sendPending(p));
          changed = true;
        }
      }
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
    if (f.type === "message_deleted") {
      msg.deleted = true;
      msg.content = "";
    } else {
      msg.content = f.content ?? "";
      msg.editedAt = f.edited_at ?? null;
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
    room.readSeq = Math.max(room.readSeq, f.seq);
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
    for (const p of this.pending.values()) {
      if (p.state === "queued" || (p.state === "waiting" && p.retryAt !== null && p.retryAt <= now)) {
        out.push(this.sendPending(p));
      }
    }
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
    if (f.code === "llm_unavailable") return [notice(`The assistant could not answer: ${f.message}`)];
    return [notice(`${f.code}: ${f.message}`)];
  }

  sendError(clientMsgId, f, now) {
    const p = this.pending.get(clientMsgId);
    if (!p || p.state === "acked") {
      // After the ack: stored, but the assistant refused to answer it (§5).
      const [roomId, seq] = this.acked.get(clientMsgId) ?? [null, null];
      const msg = this.rooms.get(roomId)?.messages.get(seq);
      const text = `The assistant did not answer: ${f.message}`;
      if (msg) this.rooms.get(roomId).notes.set(msg.messageId, text);
      return [notice(text, roomId), REDRAW];
    }
    if (["rate_limited", "busy", "unavailable"].includes(f.code)) {
      // Overloaded or Postgres down: nothing stored; resend the same client_msg_id later.
      p.state = "waiting";
      p.retryAt = now + (Number.isInteger(f.retry_after_ms) ? f.retry_after_ms : UNAVAILABLE_RETRY_MS);
      return [REDRAW];
    }
    p.state = "failed";
    p.error = f.message;
    return [notice(`Not sent: ${f.message}`, p.roomId), REDRAW];
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
    }
    return send(frame);
  }

  sendPending(p) {
    p.state = "sent";
    p.retryAt = null;
    return send({ type: "send", id: `s:${p.clientMsgId}`, room_id: p.roomId, content: p.content, client_msg_id: p.clientMsgId });
  }

  stopTyping() {
    if (!this.typingState) return [];
    const roomId = this.typingState.roomId;
    this.typingState = null;
    return this.connected ? [send({ type: "typing", room_id: roomId, is_typing: false })] : [];
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
