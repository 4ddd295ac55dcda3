// The socket of the web app: connect with the access token, feed frames to the Session, run its
// actions, and reconnect with backoff (PROTOCOL.md §6, §10). Browsers hide WebSocket pings, so a
// socket silent for too long is probed with an application ping and replaced if that goes unanswered.
// Frames go out through a FrameGate (limits.js): never over the server's per-socket limits.
// Only an authentication the server refuses for good (a refresh answered 401) signs out; any other close
// is explained (onNotice) and followed by a reconnect.

import { FrameGate, frameLimits } from "./limits.js";
import { afterClose } from "./session.js";

const PROBE_AFTER_MS = 30000;
const PROBE_TIMEOUT_MS = 10000;

export class Connection {
  constructor(api, session, run, onStatus, onNotice) {
    this.api = api;
    this.session = session;
    this.run = run; // executes a list of session actions
    // "connecting" | "connected" | "offline" | "reconnecting in Ns" | "signed out" (then a second argument: why)
    this.onStatus = onStatus;
    this.onNotice = onNotice; // (text, level): what happened to the connection, in words
    this.ws = null;
    this.gate = new FrameGate();
    this.gateTimer = null;
    this.failures = 0;
    this.timer = null;
    this.stopped = false;
    this.lastFrameAt = 0;
    this.probeSentAt = null;
    addEventListener("offline", () => this.drop()); // nothing gets through anyway
    addEventListener("online", () => this.connectSoon(0));
    this.watchdog = setInterval(() => this.probe(), 5000);
  }

  start() {
    this.stopped = false;
    this.connectSoon(0);
  }

  stop() {
    this.stopped = true;
    clearTimeout(this.timer);
    clearTimeout(this.gateTimer);
    clearInterval(this.watchdog);
    this.ws?.close(1000, "bye");
  }

  send(frame) {
    if (this.ws?.readyState !== WebSocket.OPEN) return;
    this.write(this.gate.push(frame, performance.now()));
  }

  write(frames) {
    for (const frame of frames) this.ws.send(JSON.stringify(frame));
    const waitMs = this.gate.nextInMs(performance.now());
    if (waitMs !== null && this.gateTimer === null) {
      this.gateTimer = setTimeout(() => {
        this.gateTimer = null;
        if (this.ws?.readyState === WebSocket.OPEN) this.write(this.gate.release(performance.now()));
      }, waitMs);
    }
  }

  connectSoon(delayMs) {
    clearTimeout(this.timer);
    if (this.stopped || this.ws) return;
    this.timer = setTimeout(() => this.connect(), delayMs);
  }

  async connect() {
    if (this.stopped || this.ws) return;
    if (!navigator.onLine) {
      this.onStatus("offline");
      return; // the "online" event reconnects
    }
    this.onStatus("connecting");
    let token;
    try {
      token = await this.api.token();
    } catch (err) {
      if (err.status === 401) return this.onStatus("signed out", err.message);
      return this.retry(null, "");
    }
    const url = new URL("/ws", location.href);
    url.protocol = location.protocol === "https:" ? "wss:" : "ws:";
    url.searchParams.set("access_token", token); // browsers cannot set headers on a WebSocket
    const ws = new WebSocket(url);
    this.ws = ws;
    this.gate = new FrameGate(); // the server's limits are per socket
    clearTimeout(this.gateTimer);
    this.gateTimer = null;
    ws.onopen = () => {
      this.lastFrameAt = Date.now();
      this.probeSentAt = null;
      this.run(this.session.connectionOpened());
    };
    ws.onmessage = (ev) => {
      this.lastFrameAt = Date.now();
      this.probeSentAt = null;
      const frame = JSON.parse(ev.data);
      if (frame.type === "hello") {
        this.gate = new FrameGate(frameLimits(frame.limits)); // this server's limits, before its joins go out
        this.failures = 0;
        this.onStatus("connected");
      }
      this.run(this.session.receive(frame, performance.now()));
    };
    ws.onclose = (ev) => {
      if (this.ws !== ws) return;
      this.ws = null;
      this.run(this.session.connectionLost());
      this.retry(ev.code, ev.reason);
    };
  }

  drop() {
    // Give up on the socket now rather than after a close handshake that cannot complete.
    const ws = this.ws;
    if (!ws) return;
    this.ws = null;
    ws.onopen = ws.onmessage = ws.onclose = null;
    ws.close(4000, "dropped");
    this.run(this.session.connectionLost());
    this.retry(null, "");
  }

  async retry(code, reason) {
    if (this.stopped) return;
    const next = afterClose(code, reason, this.failures, Math.random());
    if (next.refreshFirst) {
      try {
        await this.api.refresh(); // token expired, session revoked, account banned: a refresh tells which
      } catch (err) {
        if (err.status === 401) return this.onStatus("signed out", err.message || reason);
      }
    }
    if (next.policy) {
      this.onNotice(
        "The server closed the connection because it refused too many requests from this app in a short time. Reconnecting…",
        "error",
      );
    }
    const delay = next.delayMs;
    this.failures += 1;
    if (!navigator.onLine) return this.onStatus("offline");
    this.onStatus(`reconnecting in ${Math.ceil(delay / 1000)}s`);
    this.connectSoon(delay);
  }

  probe() {
    const ws = this.ws;
    if (ws?.readyState !== WebSocket.OPEN) return;
    const now = Date.now();
    if (this.probeSentAt !== null && now - this.probeSentAt > PROBE_TIMEOUT_MS) {
      this.drop(); // a dead path
    } else if (this.probeSentAt === null && now - this.lastFrameAt > PROBE_AFTER_MS) {
      this.probeSentAt = now;
      this.send({ type: "ping", id: "probe" });
    }
  }
}
