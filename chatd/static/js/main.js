// The web app: sign-in, room list, room view. State lives in the Session (session.js); this module
// turns user input into Session calls, runs the actions it returns, and renders its state.

import { Api, ApiError } from "./api.js";
import { Connection } from "./connection.js";
import { renderMarkdown } from "./markdown.js";
import { Session, ordered, unread } from "./session.js";

const $ = (id) => document.getElementById(id);
const ROOMS_POLL_MS = 120000; // a safety net: the server announces rooms itself (room_added / room_removed)

const api = new Api(() => showSignIn());
let session = null;
let conn = null;
let current = null; // open room id
let timers = [];
let renderQueued = false;
let keepScroll = null; // {height, top} while older messages are prepended

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

let noticeTimer = null;
function showNotice(text) {
  $("notice").textContent = text;
  clearTimeout(noticeTimer);
  noticeTimer = setTimeout(() => ($("notice").textContent = ""), 8000);
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
  conn = new Connection(api, session, run, setStatus);
  try {
    await loadRooms();
  } catch (err) {
    if (err instanceof ApiError && err.status === 401) return showSignIn();
    showNotice(errorText(err));
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
        if (a.roomId === null || a.roomId === current || a.roomId === closed) showNotice(a.text);
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
}

async function fetchPage(a) {
  const s = session;
  try {
    const page = await api.call("GET", `/rooms/${a.roomId}/messages`, null, a.query);
    if (s === session) run(s.page(a.roomId, a.purpose, page.messages, page.has_more));
  } catch (err) {
    if (s !== session) return;
    showNotice(`Could not load messages: ${errorText(err)}`);
    setTimeout(() => s === session && run(s.pageFailed(a.roomId)), 1000);
  }
}

function setStatus(text) {
  const node = $("conn");
  node.textContent = text;
  node.dataset.state = text.split(" ")[0];
  if (text === "signed out") api.clear();
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
      run(s.setMembers(body.members));
      cursor = body.next_cursor;
    } while (cursor);
  } catch {
    // names fall back to "User <id>"
  }
}

function openRoom(roomId) {
  if (!session?.rooms.has(roomId)) return;
  if (current !== roomId) {
    $("messages").replaceChildren();
    loadMembers(roomId);
  }
  current = roomId;
  history.replaceState(null, "", `#room=${roomId}`);
  $("composer-input").disabled = false;
  $("send").disabled = false;
  $("attach").disabled = false;
  $("sidebar").classList.remove("open");
  $("rooms-toggle").setAttribute("aria-expanded", "false");
  run(session.openRoom(roomId));
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
    showNotice(`Could not create the room: ${errorText(err)}`);
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
    showNotice("Enter the email, name or user id of the person to add.");
    return;
  }
  if (current === null) return;
  try {
    const user = await findUser(who);
    const res = await api.call("POST", `/rooms/${current}/members`, { user_id: user.id });
    if (!/^[0-9]+$/.test(who)) session?.names.set(user.id, user.name);
    showNotice(res.added ? `${user.name} added.` : `${user.name} is already a member.`);
    $("add-member-id").value = "";
  } catch (err) {
    showNotice(`Could not add the member: ${err instanceof ApiError || !(err instanceof Error) ? errorText(err) : err.message}`);
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
    showNotice(`${file.name} sent.`);
    scrollToBottom();
  } catch (err) {
    showNotice(`Could not send ${file.name}: ${errorText(err)}`);
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
    showNotice(`Could not download ${data.name}: ${errorText(err)}`);
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
    const img = el("img", { alt: data.name, width: Math.min(data.width, 320), class: "preview" });
    fileUrl(data.file_id).then(
      (url) => (img.src = url),
      () => img.remove(),
    );
    card.prepend(img);
  }
  return card;
}

// -- composer --------------------------------------------------------------------------------

function onSend(ev) {
  ev.preventDefault();
  const box = $("composer-input");
  if (current === null || !box.value.trim()) return;
  run(session.sendText(current, box.value));
  box.value = "";
  autosize();
  scrollToBottom();
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
}

function render() {
  if (!session) return;
  renderRoomList();
  const room = current === null ? null : session.rooms.get(current);
  $("room-title").textContent = room ? room.name : "No room open";
  $("add-member").hidden = !room || room.ownerId !== session.userId;
  $("older").hidden = !room?.loaded || !room.hasOlder;
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
  const atBottom = log.scrollHeight - log.scrollTop - log.clientHeight < 60;
  renderMessages(room);
  if (keepScroll) {
    log.scrollTop = log.scrollHeight - keepScroll.height + keepScroll.top;
    keepScroll = null;
  } else if (atBottom) {
    scrollToBottom();
  }
  if (atBottom && document.visibilityState === "visible") run(session.markRead(room.id));
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
      const sig = `${room.name}|${room.kind}|${count}|${room.id === current}`;
      if (button.dataset.sig === sig) return;
      button.dataset.sig = sig;
      button.toggleAttribute("aria-current", room.id === current);
      if (room.id === current) button.setAttribute("aria-current", "page");
      const parts = [el("span", { class: "room-name", text: room.name })];
      if (room.kind === "assistant") parts.push(el("span", { class: "tag", text: "assistant" }));
      if (count) parts.push(el("span", { class: "badge", "aria-label": `${count} unread`, text: String(count) }));
      button.replaceChildren(...parts);
    },
  );
}

function renderMessages(room) {
  const items = new Map();
  const streamingPrompts = new Set([...room.streams.values()].map((s) => s.replyTo));
  for (const m of ordered(room)) items.set(`m${m.seq}`, { type: "message", m, streaming: streamingPrompts.has(m.replyTo) });
  for (const [prompt, position] of room.queued) items.set(`q${prompt}`, { type: "queued", prompt, position });
  for (const s of room.streams.values()) items.set(`s${s.messageId}`, { type: "stream", s });
  for (const p of session.pending.values()) if (p.roomId === room.id) items.set(`p${p.clientMsgId}`, { type: "pending", p });
  reconcile(
    $("messages"),
    [...items.keys()],
    () => el("li"),
    (li, key) => {
      const item = items.get(key);
      if (item.type === "message") updateMessage(li, item.m, room, item.streaming);
      else if (item.type === "queued") updateQueued(li, item);
      else if (item.type === "stream") updateStream(li, item.s);
      else updatePending(li, item.p);
    },
  );
}

function meta(who, when, state, stateLabel) {
  const parts = [el("span", { class: "who", text: who })];
  if (when) parts.push(el("time", { datetime: when, text: clock(when) }));
  if (state) parts.push(el("span", { class: "state", text: stateLabel }));
  return el("div", { class: "meta" }, ...parts);
}

function updateMessage(li, m, room, streaming) {
  const note = room.notes.get(m.messageId) ?? "";
  const who = m.role === "assistant" ? "Assistant" : m.role === "system" ? "" : nameOf(m.senderId);
  const sig = [m.content, m.deleted, m.status, m.superseded, m.editedAt, note, streaming, who].join("|");
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
  else body.textContent = m.content;
  const children = [meta(who, m.createdAt, mine, "✓ delivered"), body];
  if (m.kind === "file" && m.data && !m.deleted) children.push(fileCard(m.data));
  if (m.status === "cancelled") children.push(el("p", { class: "flag", text: "Stopped before the end." }));
  if (m.status === "error") children.push(el("p", { class: "flag", text: "The answer failed part way." }));
  if (m.superseded) children.push(el("p", { class: "flag", text: "Replaced by a newer answer." }));
  if (note) children.push(el("p", { class: "flag", text: note }));
  if (assistant && !m.superseded && !streaming) {
    const again = () => run(session.regenerate(m.messageId));
    children.push(el("div", { class: "actions" }, el("button", { type: "button", onclick: again, text: "Regenerate" })));
  }
  li.replaceChildren(...children);
}

function updateQueued(li, { prompt, position }) {
  const sig = `q|${position}`;
  if (li.dataset.sig === sig) return;
  li.dataset.sig = sig;
  li.className = "msg assistant queued";
  const stop = () => run(session.cancel(current, prompt));
  li.replaceChildren(
    meta("Assistant", null, false, ""),
    el("div", { class: "body", text: `Waiting (position ${position})…` }),
    el("div", { class: "actions" }, el("button", { type: "button", onclick: stop, text: "Stop" })),
  );
}

function updateStream(li, s) {
  const sig = `s|${s.text}|${s.ended}|${s.interrupted}`;
  if (li.dataset.sig === sig) return;
  const first = !li.dataset.sig;
  li.dataset.sig = sig;
  li.className = "msg assistant streaming";
  li.setAttribute("aria-busy", String(!s.ended));
  if (first) {
    const stop = () => run(session.cancel(current, s.messageId));
    li.replaceChildren(
      meta("Assistant", null, true, "writing…"),
      el("div", { class: "body" }),
      el("div", { class: "actions" }, el("button", { type: "button", class: "stop", onclick: stop, text: "Stop" })),
    );
  }
  renderMarkdown(li.querySelector(".body"), s.text);
  li.querySelector(".state").textContent = s.interrupted ? "reconnecting…" : s.ended ? "finishing…" : "writing…";
  li.querySelector(".stop").hidden = s.ended;
}

function updatePending(li, p) {
  const sig = `p|${p.state}|${p.error}`;
  if (li.dataset.sig === sig) return;
  li.dataset.sig = sig;
  li.className = `msg mine pending ${p.state}`;
  li.dataset.state = p.state === "acked" ? "acked" : p.state === "failed" ? "failed" : "pending";
  const label = { queued: "sending…", sent: "sending…", waiting: "retrying soon…", acked: "✓ sent", failed: `not sent: ${p.error}` }[p.state];
  li.replaceChildren(meta("You", null, true, label), el("div", { class: "body", text: p.content }));
}

// -- wiring ----------------------------------------------------------------------------------

function init() {
  $("signin-form").addEventListener("submit", onSignIn);
  $("signin-toggle").addEventListener("click", () => setRegistering(!registering));
  $("signout").addEventListener("click", async () => {
    await api.signOut();
  });
  $("create-room").addEventListener("submit", onCreateRoom);
  $("add-member").addEventListener("submit", onAddMember);
  $("attach").addEventListener("click", () => $("attach-input").click());
  $("attach-input").addEventListener("change", onAttach);
  $("rooms-refresh").addEventListener("click", () => loadRooms().catch((err) => showNotice(errorText(err))));
  $("composer").addEventListener("submit", onSend);
  $("composer-input").addEventListener("keydown", onKey);
  $("composer-input").addEventListener("input", onInput);
  $("older").addEventListener("click", () => current !== null && run(session.loadOlder(current)));
  $("log").addEventListener("scroll", () => {
    if ($("log").scrollTop < 40 && current !== null && session) run(session.loadOlder(current));
  });
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
