// The web app: sign-in, room list, room view. State lives in the Session (session.js); this module
// turns user input into Session calls, runs the actions it returns, and renders its state.

import { Api, ApiError } from "./api.js";
import { Connection } from "./connection.js";
import { renderLinkified, renderMarkdown } from "./markdown.js";
import { Session, ordered, reacted, seenBy, unread } from "./session.js";

const $ = (id) => document.getElementById(id);
const ROOMS_POLL_MS = 120000; // a safety net: the server announces rooms itself (room_added / room_removed)
const NOTICE_MS = 5000; // info and success notices go after this long; errors stay until dismissed
const MAX_ALERTS = 3;
const OUTBOX_PREFIX = "chatd.outbox."; // + user id: the sends not stored yet, kept over a reload
const PREVIEW_MAX_H = 400; // px: a tall image's preview is scaled down to this height (keeping its shape)
const REPLY_EXCERPT = 80; // characters of a prompt quoted above an answer drawn apart from it
const PLACEHOLDER = "Message (Enter sends, Shift+Enter: new line)";
const PICKER = ["👍", "❤️", "😂", "🎉", "😮", "😢", "👀", "🚀"]; // the reaction picker: a few common emoji

const api = new Api(() => showSignIn());
let session = null;
let conn = null;
let current = null; // open room id
let timers = [];
let renderQueued = false;
let keepScroll = null; // {height, top} while older messages are prepended
let pinned = true; // the view follows new messages: the user has not scrolled up from the bottom
let lastScrollTop = 0;
let newestShown = null; // {roomId, mark}: the room's newest item at the last render (renderMessages)
let signOutReason = ""; // shown on the sign-in form after a sign-out the user did not ask for
let outboxSig = ""; // what was last written to the outbox
let outboxKnown = new Set(); // client_msg_ids this page holds (or held): the rest of the kept outbox is another tab's

// -- helpers -------------------------------------------------------------------------------

function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(props)) {
    if (k === "class") node.className = v;
    else if (k === "dataset") Object.assign(node.dataset, v);
    else if (k === "text") node.textContent = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else if (v !== null && v !== undefined && v !== false) node.setAttribute(k, v === true ? "" : v);
  }
  node.append(...children);
  return node;
}

// Keep `parent`'s children in the order of `keys`, creating and updating them in place so that
// focus, selection and scroll survive a redraw.
function reconcile(parent, keys, create, update) {
  const existing = new Map([...parent.children].map((c) => [c.dataset.key, c]));
  const wanted = new Set(keys);
  for (const [key, node] of existing) if (!wanted.has(key)) node.remove();
  let before = parent.firstElementChild;
  for (const key of keys) {
    let node = existing.get(key);
    if (!node) {
      node = create(key);
      node.dataset.key = key;
    }
    update(node, key);
    if (node !== before) parent.insertBefore(node, before);
    else before = before.nextElementSibling;
  }
}

function nameOf(userId) {
  if (userId === session?.userId) return "You";
  return session ? session.nameOf(userId) : `User ${userId}`;
}

function size(n) {
  if (n < 1024) return `${n} B`;
  if (n < 1048576) return `${(n / 1024).toFixed(1)} KiB`;
  return `${(n / 1048576).toFixed(1)} MiB`;
}

function clock(iso) {
  const d = new Date(iso);
  return Number.isNaN(d.getTime()) ? "" : d.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
}

// Notices: info and success in #notice (a polite live region; the next replaces it, and it goes after
// NOTICE_MS), errors in #alerts (assertive), each until its Dismiss button (the newest MAX_ALERTS).
let noticeTimer = null;
function showNotice(text, level = "info") {
  if (level === "error") {
    const alerts = $("alerts");
    for (const old of [...alerts.children]) if (old.dataset.text === text) old.remove();
    const item = el(
      "p",
      { class: "notice error", dataset: { text } },
      el("span", { text }),
      el("button", { type: "button", class: "dismiss", "aria-label": "Dismiss", onclick: () => item.remove() }),
    );
    alerts.append(item);
    while (alerts.children.length > MAX_ALERTS) alerts.firstElementChild.remove();
    return;
  }
  const node = $("notice");
  node.textContent = text;
  node.className = `notice ${level}`;
  clearTimeout(noticeTimer);
  noticeTimer = setTimeout(clearNotice, NOTICE_MS);
}

function clearNotice() {
  $("notice").textContent = "";
  $("notice").className = "notice";
}

function errorText(err) {
  return err instanceof ApiError ? err.message : "The server could not be reached.";
}

// -- sign in -------------------------------------------------------------------------------

let registering = false;

function setRegistering(on) {
  registering = on;
  $("signin-name-row").hidden = !on;
  $("signin-name").required = on;
  $("signin-submit").textContent = on ? "Create account" : "Sign in";
  $("signin-toggle").textContent = on ? "I have an account" : "Create an account instead";
  $("signin-password").autocomplete = on ? "new-password" : "current-password";
}

function showSignIn() {
  stop();
  $("app").hidden = true;
  $("signin").hidden = false;
  $("signin-error").textContent = signOutReason;
  signOutReason = "";
  $("signin-email").focus();
}

async function onSignIn(ev) {
  ev.preventDefault();
  const email = $("signin-email").value.trim();
  const password = $("signin-password").value;
  const name = $("signin-name").value.trim();
  $("signin-error").textContent = "";
  if (!email || !password || (registering && !name)) {
    $("signin-error").textContent = registering ? "Email, password and name are required." : "Email and password are required.";
    return;
  }
  $("signin-submit").disabled = true;
  try {
    await api.signIn(email, password, registering ? name : null);
    $("signin-password").value = "";
    await start();
  } catch (err) {
    $("signin-error").textContent = errorText(err);
  } finally {
    $("signin-submit").disabled = false;
  }
}

// -- session ---------------------------------------------------------------------------------

function randomId() {
  const bytes = crypto.getRandomValues(new Uint8Array(4));
  return [...bytes].map((b) => b.toString(16).padStart(2, "0")).join("");
}

async function start() {
  $("signin").hidden = true;
  $("app").hidden = false;
  const user = api.user;
  $("me-name").textContent = user?.name ?? "";
  $("me-id").textContent = user ? `(user id ${user.id})` : "";
  session = new Session(randomId());
  session.privateReads = $("private-reads").checked;
  session.isAdmin = user?.role === "admin";
  conn = new Connection(api, session, run, setStatus, showNotice);
  restoreOutbox(); // before anything is written back to it
  try {
    await loadRooms();
  } catch (err) {
    if (err instanceof ApiError && err.status === 401) return showSignIn();
    showNotice(errorText(err), "error");
  }
  conn.start();
  timers = [
    setInterval(() => run(session.tick(performance.now())), 250),
    setInterval(() => loadRooms().catch(() => {}), ROOMS_POLL_MS),
  ];
  const fromHash = Number(new URLSearchParams(location.hash.slice(1)).get("room"));
  if (fromHash && session.rooms.has(fromHash)) openRoom(fromHash);
  else render();
}

function stop() {
  for (const url of blobUrls.values()) URL.revokeObjectURL(url);
  blobUrls.clear();
  for (const t of timers) clearInterval(t);
  timers = [];
  conn?.stop();
  conn = null;
  session = null;
  current = null;
  outboxSig = "";
  outboxKnown = new Set();
  newestShown = null;
  clearTimeout(noticeTimer);
  clearNotice();
  $("alerts").replaceChildren();
}

// -- the outbox: unsent messages survive a reload ---------------------------------------------
// The Session counts time from the page's start (performance.now()); what is kept is in wall-clock ms.

const toWall = (t) => Date.now() - (performance.now() - t);
const fromWall = (w) => performance.now() - (Date.now() - w);

function outboxKey() {
  return api.user ? OUTBOX_PREFIX + api.user.id : null;
}

function readOutbox(key) {
  try {
    const kept = JSON.parse(localStorage.getItem(key) ?? "null");
    return kept && Array.isArray(kept.entries) ? kept : null;
  } catch {
    return null;
  }
}

function restoreOutbox() {
  const kept = readOutbox(outboxKey());
  if (!kept || !session) return;
  for (const e of kept.entries) outboxKnown.add(e.clientMsgId);
  const hold = kept.holdUntil ? fromWall(kept.holdUntil) : 0;
  run(session.restore(kept.entries, (kept.sent ?? []).map(fromWall), hold));
}

function saveOutbox() {
  const key = outboxKey();
  if (!session || !key) return;
  const mine = session.outbox();
  const log = session.sendLog;
  const sig = `${mine.map((e) => e.clientMsgId).join(",")}|${log.length}|${log.at(-1)}|${session.holdUntil}`;
  if (sig === outboxSig) return;
  outboxSig = sig;
  for (const e of mine) outboxKnown.add(e.clientMsgId);
  // Another tab of the same user keeps its own entries here: those stay as they are.
  const others = (readOutbox(key)?.entries ?? []).filter((e) => !outboxKnown.has(e.clientMsgId));
  const kept = {
    entries: [...others, ...mine],
    sent: log.map(toWall), // the quota counts these: a reload does not start from zero
    holdUntil: session.holdUntil ? toWall(session.holdUntil) : 0,
  };
  try {
    localStorage.setItem(key, JSON.stringify(kept));
  } catch {
    // storage full or disabled: the outbox lasts as long as the page
  }
}

async function loadRooms() {
  const body = await api.call("GET", "/rooms", null, { limit: 200 });
  if (session) run(session.setRooms(body.rooms));
}

function run(actions) {
  let redraw = false;
  let closed = null;
  for (const a of actions) {
    switch (a.kind) {
      case "send":
        conn?.send(a.frame);
        break;
      case "fetch":
        fetchPage(a);
        break;
      case "refresh":
        api.refresh().then((token) => session && run(session.tokenRefreshed(token)), () => {});
        break;
      case "notice":
        if (a.roomId === null || a.roomId === current || a.roomId === closed) showNotice(a.text, a.level);
        break;
      case "removed":
        if (a.roomId === current) {
          closeRoom();
          closed = a.roomId; // its notice (removed, left) still shows
        }
        break;
      case "older":
        if (a.roomId === current) keepScroll = { height: $("log").scrollHeight, top: $("log").scrollTop };
        break;
      case "redraw":
        redraw = true;
        break;
    }
  }
  if (redraw) scheduleRender();
  saveOutbox();
}

async function fetchPage(a) {
  const s = session;
  try {
    const page = await api.call("GET", `/rooms/${a.roomId}/messages`, null, a.query);
    if (s === session) run(s.page(a.roomId, a.purpose, page.messages, page.has_more));
  } catch (err) {
    if (s !== session) return;
    showNotice(`Could not load messages: ${errorText(err)}`, "error");
    setTimeout(() => s === session && run(s.pageFailed(a.roomId)), 1000);
  }
}

function setStatus(text, why = "") {
  const node = $("conn");
  node.textContent = text;
  node.dataset.state = text.split(" ")[0];
  if (text === "signed out") {
    // Only when the server refused the session for good (a refresh answered 401).
    signOutReason = why ? `You were signed out (${why}). Sign in again.` : "You were signed out. Sign in again.";
    api.clear();
  }
}

// -- rooms -----------------------------------------------------------------------------------

async function loadMembers(roomId) {
  // The roster gives the names messages are shown with (and who the member events talk about).
  const s = session;
  let cursor = null;
  try {
    do {
      const query = cursor ? { limit: 200, cursor } : { limit: 200 };
      const body = await api.call("GET", `/rooms/${roomId}/members`, null, query);
      if (s !== session) return;
      run(s.setMembers(body.members, roomId));
      cursor = body.next_cursor;
    } while (cursor);
  } catch {
    // names fall back to "User <id>"
  }
}

// The room's assistants by room id ("@gpt, @claude"): the composer's hint of whom to mention.
const mentionHints = new Map();

async function loadAssistants(roomId) {
  try {
    const { assistants } = await api.call("GET", `/rooms/${roomId}/assistants`);
    mentionHints.set(roomId, assistants.map((a) => `@${a.name}`).join(", "));
  } catch {
    mentionHints.delete(roomId); // no hint: the default assistant (@assistant where it listens)
  }
  if (roomId === current) setPlaceholder();
}

// "Assistant", or a room assistant's @name and model (several may answer one message).
function assistantLabel(by) {
  return by ? `@${by.name} · ${by.model}` : "Assistant";
}

function openRoom(roomId) {
  if (!session?.rooms.has(roomId)) return;
  if (current !== roomId) {
    $("messages").replaceChildren();
    loadMembers(roomId);
    loadAssistants(roomId);
  }
  current = roomId;
  history.replaceState(null, "", `#room=${roomId}`);
  $("composer-input").disabled = false;
  $("send").disabled = false;
  $("attach").disabled = false;
  $("sidebar").classList.remove("open");
  $("rooms-toggle").setAttribute("aria-expanded", "false");
  run(session.openRoom(roomId));
  pinned = true;
  render();
  scrollToBottom();
  $("composer-input").focus();
}

function closeRoom() {
  current = null;
  $("messages").replaceChildren();
  $("composer-input").disabled = true;
  $("send").disabled = true;
  $("attach").disabled = true;
  history.replaceState(null, "", location.pathname);
  render();
}

async function onCreateRoom(ev) {
  ev.preventDefault();
  const name = $("create-name").value.trim();
  if (!name) return;
  try {
    const kind = $("create-kind").value;
    // Group rooms answer messages that mention @assistant; assistant rooms answer every message.
    const body = kind === "group" ? { name, kind, assistant: { mode: "mention" } } : { name, kind };
    const room = await api.call("POST", "/rooms", body);
    $("create-name").value = "";
    await loadRooms();
    openRoom(room.id);
  } catch (err) {
    showNotice(`Could not create the room: ${errorText(err)}`, "error");
  }
}

async function findUser(who) {
  // An id as is; an email or a name prefix through the directory (GET /users?q=).
  if (/^[0-9]+$/.test(who)) return { id: Number(who), name: `User ${who}` };
  const { users } = await api.call("GET", "/users", null, { q: who });
  const exact = users.filter((u) => u.name.toLowerCase() === who.toLowerCase());
  if (users.length === 1) return users[0];
  if (exact.length === 1) return exact[0];
  if (!users.length) throw new Error(`No one found for "${who}".`);
  throw new Error(`Several people match: ${users.map((u) => `${u.name} (#${u.id})`).join(", ")}. Use the email or id.`);
}

async function onAddMember(ev) {
  ev.preventDefault();
  const who = $("add-member-id").value.trim();
  if (who.length < 2 && !/^[0-9]+$/.test(who)) {
    showNotice("Enter the email, name or user id of the person to add.", "error");
    return;
  }
  if (current === null) return;
  try {
    const user = await findUser(who);
    const res = await api.call("POST", `/rooms/${current}/members`, { user_id: user.id });
    if (!/^[0-9]+$/.test(who)) session?.names.set(user.id, user.name);
    showNotice(res.added ? `${user.name} added.` : `${user.name} is already a member.`, res.added ? "success" : "info");
    $("add-member-id").value = "";
  } catch (err) {
    const why = err instanceof ApiError || !(err instanceof Error) ? errorText(err) : err.message;
    showNotice(`Could not add the member: ${why}`, "error");
  }
}

// -- attachments -----------------------------------------------------------------------------

const blobUrls = new Map(); // file id -> object URL (fetched with the bearer token; cleared on sign-out)

async function fileUrl(fileId) {
  if (!blobUrls.has(fileId)) {
    const blob = await api.transfer("GET", `/files/${fileId}`, { as: "blob" });
    blobUrls.set(fileId, URL.createObjectURL(blob));
  }
  return blobUrls.get(fileId);
}

async function onAttach() {
  const input = $("attach-input");
  const file = input.files?.[0];
  input.value = "";
  if (!file || current === null) return;
  const form = new FormData();
  form.append("file", file, file.name);
  const caption = $("composer-input").value.trim();
  if (caption) form.append("caption", caption);
  $("attach").disabled = true;
  showNotice(`Uploading ${file.name}…`);
  try {
    await api.transfer("POST", `/rooms/${current}/files`, { form });
    if (caption) {
      $("composer-input").value = "";
      autosize();
    }
    showNotice(`${file.name} sent.`, "success");
    scrollToBottom();
  } catch (err) {
    showNotice(`Could not send ${file.name}: ${errorText(err)}`, "error");
  } finally {
    $("attach").disabled = current === null;
  }
}

async function onDownload(data) {
  try {
    const link = el("a", { href: await fileUrl(data.file_id), download: data.name });
    document.body.append(link);
    link.click();
    link.remove();
  } catch (err) {
    showNotice(`Could not download ${data.name}: ${errorText(err)}`, "error");
  }
}

function fileCard(data) {
  const card = el(
    "div",
    { class: "file" },
    el("span", { class: "file-name", text: data.name }),
    el("span", { class: "muted", text: ` ${size(data.size)} ` }),
    el("button", { type: "button", class: "download", onclick: () => onDownload(data), text: "Download" }),
  );
  if (data.content_type.startsWith("image/") && data.width && data.height) {
    // Its size from the attachment's width and height: at most its natural size (app.css keeps it within
    // the bubble), and its room reserved before it loads, so that the view does not move when it does.
    const scale = Math.min(1, PREVIEW_MAX_H / data.height);
    const width = Math.max(1, Math.round(data.width * scale));
    const height = Math.max(1, Math.round(data.height * scale));
    const img = el("img", { alt: data.name, width, height, class: "preview" });
    const box = el("div", { class: "preview-box" }, img);
    fileUrl(data.file_id).then(
      (url) => (img.src = url),
      () => box.remove(),
    );
    card.prepend(box);
  }
  return card;
}

// -- composer --------------------------------------------------------------------------------

function onSend(ev) {
  ev.preventDefault();
  const box = $("composer-input");
  if (current === null || !box.value.trim()) return;
  run(session.sendText(current, box.value, performance.now()));
  box.value = "";
  autosize();
  scrollToBottom(); // one's own message brings the view back to the bottom
}

function onKey(ev) {
  if (ev.key === "Enter" && !ev.shiftKey && !ev.isComposing) {
    ev.preventDefault();
    $("composer").requestSubmit();
  }
}

function onInput() {
  autosize();
  if (current !== null) run(session.inputChanged(current, !$("composer-input").value.trim(), performance.now()));
}

function autosize() {
  const box = $("composer-input");
  box.style.height = "auto"; // CSSOM, not a style attribute: allowed by the CSP
  box.style.height = `${Math.min(box.scrollHeight, 200)}px`;
}

// -- rendering -------------------------------------------------------------------------------

function scheduleRender() {
  if (renderQueued) return;
  renderQueued = true;
  setTimeout(() => {
    renderQueued = false;
    render();
  }, 16);
}

function scrollToBottom() {
  const log = $("log");
  log.scrollTop = log.scrollHeight;
  lastScrollTop = log.scrollTop;
  pinned = true;
  $("new-below").hidden = true;
}

function onLogScroll() {
  // Unpinned only by a scroll up: content that grows (no scroll event) or a late event does not unpin.
  const log = $("log");
  const atBottom = log.scrollHeight - log.scrollTop - log.clientHeight < 60;
  if (atBottom) pinned = true;
  else if (log.scrollTop < lastScrollTop) pinned = false;
  lastScrollTop = log.scrollTop;
  if (pinned) {
    $("new-below").hidden = true;
    if (current !== null && session && document.visibilityState === "visible") run(session.markRead(current));
  }
  if (log.scrollTop < 40 && current !== null && session) run(session.loadOlder(current));
}

// Whatever grows the messages (an image decoded, a code block laid out, an answer streaming) keeps a view that
// follows at the bottom; sizes are reserved where known, this catches the rest.
function followGrowth() {
  if (pinned && !keepScroll) scrollToBottom();
}

let measure = null; // a canvas context: text widths in the box's font

function setPlaceholder() {
  // The Enter hint where it fits in the box (not on phones, nor beside a wide room list); else just "Message".
  const box = $("composer-input");
  const style = getComputedStyle(box);
  measure ??= document.createElement("canvas").getContext("2d");
  measure.font = style.font;
  const room = box.clientWidth - parseFloat(style.paddingLeft) - parseFloat(style.paddingRight);
  const hint = mentionHints.get(current);
  const wanted = hint ? `Message (mention ${hint})` : PLACEHOLDER;
  const text = measure.measureText(wanted).width <= room ? wanted : "Message";
  if (box.placeholder !== text) box.placeholder = text;
}

function setKindHint() {
  $("create-kind-hint").textContent =
    $("create-kind").value === "assistant"
      ? "The assistant answers every message."
      : "The assistant answers messages that mention @assistant.";
}

function render() {
  if (!session) return;
  renderRoomList();
  const room = current === null ? null : session.rooms.get(current);
  $("room-title").textContent = room ? room.name : "No room open";
  $("add-member").hidden = !room || room.ownerId !== session.userId;
  $("older").hidden = !room?.loaded || !room.hasOlder;
  $("rooms-empty").hidden = session.rooms.size > 0;
  renderHint(room);
  if (!room) {
    $("room-online").textContent = "";
    $("typing").textContent = "";
    return;
  }
  const online = [...room.online].sort((a, b) => (a === session.userId ? -1 : b === session.userId ? 1 : a - b));
  $("room-online").textContent = online.length ? `Online: ${online.map(nameOf).join(", ")}` : "";
  const typing = [...room.typing.keys()].map(nameOf);
  $("typing").textContent = typing.length ? `${typing.join(", ")} ${typing.length === 1 ? "is" : "are"} typing…` : "";

  const log = $("log");
  const mark = renderMessages(room);
  const grew = newestShown?.roomId === room.id && mark !== newestShown.mark;
  newestShown = { roomId: room.id, mark };
  if (keepScroll) {
    log.scrollTop = log.scrollHeight - keepScroll.height + keepScroll.top;
    keepScroll = null;
  } else if (pinned) {
    scrollToBottom();
  } else if (grew) {
    $("new-below").hidden = false; // scrolled up: the view stays, and says there is more below
  }
  if (pinned && document.visibilityState === "visible") run(session.markRead(room.id));
}

function renderHint(room) {
  // What to do next where there is nothing to show: no room open, or a room without messages.
  let text = "";
  if (!room) {
    const where = matchMedia("(max-width: 720px)").matches ? "under Rooms" : "on the left";
    text = session.rooms.size ? `Pick a room ${where}, or create one.` : `Create a room ${where} to start chatting.`;
  } else if (room.loaded && !room.hasOlder && !room.messages.size && !room.streams.size && !room.queued.size) {
    const pending = [...session.pending.values()].some((p) => p.roomId === room.id);
    if (!pending) text = "No messages yet — say hello.";
  }
  $("room-hint").textContent = text;
  $("room-hint").hidden = !text;
}

function renderRoomList() {
  const rooms = [...session.rooms.values()].sort((a, b) => b.id - a.id);
  reconcile(
    $("room-list"),
    rooms.map((r) => `r${r.id}`),
    (key) => {
      const id = Number(key.slice(1));
      return el("li", {}, el("button", { type: "button", class: "room-link", onclick: () => openRoom(id) }));
    },
    (li, key) => {
      const room = session.rooms.get(Number(key.slice(1)));
      const button = li.firstElementChild;
      const count = room.id === current ? 0 : unread(room);
      const atMe = room.id === current ? 0 : room.mentionCount;
      const sig = `${room.name}|${room.kind}|${count}|${atMe}|${room.id === current}`;
      if (button.dataset.sig === sig) return;
      button.dataset.sig = sig;
      button.toggleAttribute("aria-current", room.id === current);
      if (room.id === current) button.setAttribute("aria-current", "page");
      const parts = [el("span", { class: "room-name", text: room.name })];
      if (room.kind === "assistant") parts.push(el("span", { class: "tag", text: "assistant" }));
      if (count) parts.push(el("span", { class: "badge", "aria-label": `${count} unread`, text: String(count) }));
      if (atMe) parts.push(el("span", { class: "badge mention", "aria-label": `${atMe} mentions`, text: `@${atMe}` }));
      button.replaceChildren(...parts);
    },
  );
}

// The room's items: stored messages in seq order; then the answers on their way (streaming or waiting), in
// the order of their prompts, which is the order they are answered and stored in; then one's unsent messages.
// An answer not drawn right under its prompt quotes it (replyLine). Returns the key of the newest item.
function renderMessages(room) {
  const items = new Map();
  const messages = ordered(room);
  const byId = new Map(messages.map((m) => [m.messageId, m]));
  const streamingPrompts = new Set([...room.streams.values()].map((s) => s.replyTo));
  for (const m of messages) items.set(`m${m.seq}`, { type: "message", m, replyTo: m.replyTo, streaming: streamingPrompts.has(m.replyTo) });
  const lastMine = messages.findLast((m) => m.senderId === session.userId && !m.deleted);
  if (lastMine) items.get(`m${lastMine.seq}`).seen = seenBy(room, lastMine.seq, session.userId);
  const coming = [
    ...[...room.streams.values()].map((s) => [`s${s.messageId}`, { type: "stream", s, replyTo: s.replyTo }]),
    ...[...room.queued].map(([prompt, position]) => [`q${prompt}`, { type: "queued", prompt, position, replyTo: prompt }]),
  ];
  const promptSeq = (entry) => byId.get(entry[1].replyTo)?.seq ?? Infinity;
  coming.sort((x, y) => promptSeq(x) - promptSeq(y)); // stable: prompts not loaded keep their order, last
  for (const [key, item] of coming) items.set(key, item);
  for (const p of session.pending.values()) if (p.roomId === room.id) items.set(`p${p.clientMsgId}`, { type: "pending", p });
  let previous = null;
  for (const item of items.values()) {
    const prompt = item.replyTo == null ? null : byId.get(item.replyTo);
    item.reply = item.replyTo == null || (prompt && previous === prompt) ? "" : replyLine(prompt);
    previous = item.type === "message" ? item.m : null;
  }
  reconcile(
    $("messages"),
    [...items.keys()],
    () => el("li"),
    (li, key) => {
      const item = items.get(key);
      if (item.type === "message") updateMessage(li, item.m, room, item.streaming, item.reply, item.seen ?? 0);
      else if (item.type === "queued") updateQueued(li, item);
      else if (item.type === "stream") updateStream(li, item.s, item.reply);
      else updatePending(li, item.p);
    },
  );
  return [...items.keys()].filter((k) => k[0] !== "p").at(-1) ?? ""; // older pages prepended do not change it
}

function replyLine(prompt) {
  if (!prompt) return "↳ an earlier message";
  const text = prompt.deleted ? "message deleted" : prompt.content.replace(/\s+/g, " ").trim();
  const excerpt = text.length > REPLY_EXCERPT ? `${text.slice(0, REPLY_EXCERPT - 1)}…` : text;
  const who = prompt.role === "assistant" ? "Assistant" : nameOf(prompt.senderId);
  return `↳ ${who}: ${excerpt}`;
}

function replyNote(text) {
  return text ? [el("p", { class: "reply-to", text })] : [];
}

function meta(who, when, state, stateLabel) {
  const parts = [el("span", { class: "who", text: who })];
  if (when) parts.push(el("time", { datetime: when, text: clock(when) }));
  if (state) parts.push(el("span", { class: "state", text: stateLabel }));
  return el("div", { class: "meta" }, ...parts);
}

function updateMessage(li, m, room, streaming, reply, seen) {
  const note = room.notes.get(m.messageId) ?? "";
  const who = m.role === "assistant" ? assistantLabel(m.answeredBy) : m.role === "system" ? "" : nameOf(m.senderId);
  const reactionSig = JSON.stringify(m.reactions);
  const sig = [m.content, m.deleted, m.status, m.superseded, m.editedAt, note, streaming, who, reply, reactionSig, seen].join("|");
  if (li.dataset.sig === sig) return;
  li.dataset.sig = sig;
  const mine = m.senderId !== null && m.senderId === session.userId;
  const assistant = m.role === "assistant";
  const system = m.role === "system";
  li.className = ["msg", mine && "mine", assistant && "assistant", system && "system", m.kind === "file" && "file-msg",
    m.superseded && "superseded", m.status && "partial"]
    .filter(Boolean)
    .join(" ");
  li.dataset.seq = String(m.seq);
  li.dataset.state = mine ? "delivered" : "";
  const body = el("div", { class: "body" });
  if (m.deleted) body.append(el("em", { text: "message deleted" }));
  else if (assistant) renderMarkdown(body, m.content);
  else if (system) body.textContent = m.content;
  else renderLinkified(body, m.content);
  const children = [...replyNote(reply), meta(who, m.createdAt, mine, seen ? `✓ seen by ${seen}` : "✓ delivered"), body];
  if (m.kind === "file" && m.data && !m.deleted) children.push(fileCard(m.data));
  if (m.status === "cancelled") children.push(el("p", { class: "flag", text: "Stopped before the end." }));
  if (m.status === "error") children.push(el("p", { class: "flag", text: m.error?.message ?? "The answer failed part way." }));
  if (m.superseded) children.push(el("p", { class: "flag", text: "Replaced by a newer answer." }));
  if (note) children.push(el("p", { class: "flag", text: note }));
  if (!m.deleted && !system) children.push(reactionBar(m, !mine));
  if (assistant && !m.superseded && !streaming) {
    const again = () => run(session.regenerate(m.messageId));
    const button = el(
      "button",
      { type: "button", class: "icon-action", "aria-label": "Regenerate", title: "Regenerate this answer", onclick: again },
      "↻",
    );
    children.push(el("div", { class: "actions" }, button));
  }
  li.replaceChildren(...children);
}

// Reactions under a message: one chip per emoji with its count (mine highlighted; a click toggles mine),
// then a small picker. The counts move when the room's message_updated comes, for this tab too.
function reactionBar(m, reportable) {
  const toggle = (emoji) => run(session.react(current, m.messageId, emoji));
  const chips = m.reactions.map((r) => {
    const mine = reacted(m, session.userId, r.emoji);
    const who = r.users.map((u) => (u === session.userId ? "you" : nameOf(u))).join(", ");
    return el(
      "button",
      { type: "button", class: mine ? "reaction mine" : "reaction", "aria-pressed": String(mine), title: who, onclick: () => toggle(r.emoji) },
      `${r.emoji} ${r.count}`,
    );
  });
  const choices = PICKER.map((emoji) =>
    el("button", { type: "button", class: "pick", "aria-label": `React ${emoji}`, onclick: () => toggle(emoji) }, emoji),
  );
  const picker = el(
    "details",
    { class: "picker" },
    el("summary", { "aria-label": "Add a reaction", title: "Add a reaction" }, "☺+"),
    el("div", { class: "choices" }, ...choices),
  );
  const extra = reportable ? [reportForm(m)] : [];
  return el("div", { class: "reactions" }, ...chips, picker, ...extra);
}

// Report a message (not your own) to the room's owner and the admins: POST .../reports with a reason.
// Reporting it again is harmless: the server keeps your first report (API.md, "Reports").
function reportForm(m) {
  const input = el("input", { type: "text", maxlength: "500", placeholder: "Why?", "aria-label": "Reason for the report" });
  const details = el("details", { class: "report" });
  const submit = async (ev) => {
    ev.preventDefault();
    const reason = input.value.trim();
    if (!reason) {
      showNotice("Say why you report this message.", "error");
      return;
    }
    try {
      await api.call("POST", `/rooms/${m.roomId}/messages/${m.messageId}/reports`, { reason });
      details.open = false;
      input.value = "";
      showNotice("Reported. The room's owner and the admins will look at it.", "success");
    } catch (err) {
      showNotice(`Could not report the message: ${errorText(err)}`, "error");
    }
  };
  details.append(
    el("summary", { "aria-label": "Report this message", title: "Report this message" }, "⚑"),
    el("form", { class: "report-form", onsubmit: submit }, input, el("button", { type: "submit", text: "Send report" })),
  );
  return details;
}

// Stop only for whom the server lets stop the answer (Session.canStop); Regenerate for every member.

function updateQueued(li, { prompt, position, reply }) {
  const stoppable = session.canStop(current, prompt, false);
  const sig = `q|${position}|${stoppable}|${reply}`;
  if (li.dataset.sig === sig) return;
  li.dataset.sig = sig;
  li.className = "msg assistant queued";
  const stop = () => run(session.cancel(current, prompt));
  const children = [...replyNote(reply), meta("Assistant", null, false, ""), el("div", { class: "body", text: `Waiting (position ${position})…` })];
  if (stoppable) children.push(el("div", { class: "actions" }, el("button", { type: "button", onclick: stop, text: "Stop" })));
  li.replaceChildren(...children);
}

function updateStream(li, s, reply) {
  const stoppable = session.canStop(current, s.replyTo, true);
  const sig = `s|${s.text}|${s.ended}|${s.interrupted}|${stoppable}|${reply}`;
  if (li.dataset.sig === sig) return;
  const rebuild = li.dataset.stoppable !== String(stoppable) || li.dataset.reply !== reply;
  li.dataset.reply = reply;
  li.dataset.sig = sig;
  li.dataset.stoppable = String(stoppable);
  li.className = "msg assistant streaming";
  li.setAttribute("aria-busy", String(!s.ended));
  if (rebuild) {
    const stop = () => run(session.cancel(current, s.messageId));
    const children = [...replyNote(reply), meta(assistantLabel(s.answeredBy), null, true, "writing…"), el("div", { class: "body" })];
    if (stoppable) {
      children.push(el("div", { class: "actions" }, el("button", { type: "button", class: "stop", onclick: stop, text: "Stop" })));
    }
    li.replaceChildren(...children);
  }
  renderMarkdown(li.querySelector(".body"), s.text);
  li.querySelector(".state").textContent = s.interrupted ? "reconnecting…" : s.ended ? "finishing…" : "writing…";
  const stopButton = li.querySelector(".stop");
  if (stopButton) stopButton.hidden = s.ended;
}

function updatePending(li, p) {
  const sig = `p|${p.state}|${p.error}`;
  if (li.dataset.sig === sig) return;
  li.dataset.sig = sig;
  li.className = `msg mine pending ${p.state}`;
  li.dataset.state = p.state === "acked" ? "acked" : p.state === "failed" ? "failed" : "pending";
  const label = {
    queued: "waiting to send…",
    sent: "sending…",
    waiting: "retrying soon…",
    acked: "✓ sent",
    failed: `not sent: ${p.error}`,
  }[p.state];
  li.replaceChildren(meta("You", null, true, label), el("div", { class: "body", text: p.content }));
}

// -- wiring ----------------------------------------------------------------------------------

function init() {
  $("signin-form").addEventListener("submit", onSignIn);
  $("signin-toggle").addEventListener("click", () => setRegistering(!registering));
  $("signout").addEventListener("click", async () => {
    const key = outboxKey();
    stop();
    if (key) localStorage.removeItem(key); // asked to sign out: nothing of this user is sent later
    await api.signOut();
  });
  $("private-reads").checked = localStorage.getItem("chatd.privateReads") === "1";
  $("private-reads").addEventListener("change", () => {
    localStorage.setItem("chatd.privateReads", $("private-reads").checked ? "1" : "0");
    if (session) session.privateReads = $("private-reads").checked;
  });
  $("create-room").addEventListener("submit", onCreateRoom);
  $("add-member").addEventListener("submit", onAddMember);
  $("attach").addEventListener("click", () => $("attach-input").click());
  $("attach-input").addEventListener("change", onAttach);
  $("rooms-refresh").addEventListener("click", () => loadRooms().catch((err) => showNotice(errorText(err), "error")));
  $("composer").addEventListener("submit", onSend);
  $("composer-input").addEventListener("keydown", onKey);
  $("composer-input").addEventListener("input", onInput);
  $("older").addEventListener("click", () => current !== null && run(session.loadOlder(current)));
  $("log").addEventListener("scroll", onLogScroll);
  $("new-below").addEventListener("click", scrollToBottom);
  new ResizeObserver(followGrowth).observe($("messages"));
  $("create-kind").addEventListener("change", setKindHint);
  new ResizeObserver(setPlaceholder).observe($("composer-input"));
  $("rooms-toggle").addEventListener("click", () => {
    const open = $("sidebar").classList.toggle("open");
    $("rooms-toggle").setAttribute("aria-expanded", String(open));
  });
  addEventListener("hashchange", () => {
    const id = Number(new URLSearchParams(location.hash.slice(1)).get("room"));
    if (id && id !== current) openRoom(id);
  });
  document.addEventListener("visibilitychange", () => {
    if (document.visibilityState === "visible" && session) {
      loadRooms().catch(() => {});
      scheduleRender();
    }
  });
  if (api.user) start();
  else showSignIn();
}

init();
