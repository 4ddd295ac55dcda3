// The server's per-socket frame limits (PROTOCOL.md §6, chatd/core/framelimits.py), kept on the client side
// so that the app never goes over them by itself: a refused frame counts as a violation, and the 50th
// within 10 s closes the socket with 1008. Pure: the caller passes `now` (ms) and writes what comes out.
// Sends are not limited here: they have their per-user quota, which the Session paces.

// [rate per second, burst]: the server says its own in `hello.limits`; until then (or from an older server)
// the ws.* defaults of chatd/process/config.py.
export const FRAME_LIMITS = Object.freeze({
  all: [30, 200], // ws.frame_rate_per_s, ws.frame_burst
  join: [10, 100], // ws.join_rate_per_s, ws.join_burst
  read: [5, 30], // ws.read_rate_per_s, ws.read_burst
  typing: [3, 10], // ws.typing_rate_per_s, ws.typing_burst
  control: [2, 20], // ws.control_rate_per_s, ws.control_burst
});
const GROUPS = {
  join: "join",
  leave: "join",
  read: "read",
  typing: "typing",
  edit: "control",
  delete: "control",
  react: "control",
  auth: "control",
  cancel: "control",
  regenerate: "control",
};
const HEADROOM = 0.8; // of each rate and burst: network jitter bunches frames up on the way

// `hello.limits` ({all: {per_s, burst}, …}) in FRAME_LIMITS' form; a bucket it does not name keeps its default.
export function frameLimits(limits) {
  const out = { ...FRAME_LIMITS };
  for (const name of Object.keys(FRAME_LIMITS)) {
    const l = limits?.[name];
    if (l && l.per_s > 0 && l.burst >= 1) out[name] = [l.per_s, l.burst];
  }
  return out;
}

class Bucket {
  constructor(ratePerS, burst) {
    this.rate = (ratePerS * HEADROOM) / 1000; // tokens per ms
    this.burst = Math.max(1, Math.floor(burst * HEADROOM));
    this.tokens = this.burst;
    this.stamp = null;
  }

  refill(now) {
    if (this.stamp !== null) this.tokens = Math.min(this.burst, this.tokens + (now - this.stamp) * this.rate);
    this.stamp = now;
  }

  waitMs(now) {
    this.refill(now);
    return this.tokens >= 1 ? 0 : Math.ceil((1 - this.tokens) / this.rate);
  }
}

// One socket's outgoing frames, in order: a frame over a limit waits (and so do the frames after it, so a
// resume barrier `ping` still comes after its `join`s). A waiting `read` or `typing` frame of a room is
// replaced by a newer one rather than queued twice.
export class FrameGate {
  constructor(limits = FRAME_LIMITS) {
    this.buckets = Object.fromEntries(Object.entries(limits).map(([k, [rate, burst]]) => [k, new Bucket(rate, burst)]));
    this.queue = [];
  }

  // Frames to write now, `frame` among them if it may go at once.
  push(frame, now) {
    if (frame.type === "read" || frame.type === "typing") {
      const same = this.queue.findIndex((f) => f.type === frame.type && f.room_id === frame.room_id);
      if (same >= 0) {
        this.queue[same] = frame;
        return this.release(now);
      }
    }
    this.queue.push(frame);
    return this.release(now);
  }

  // Frames whose turn has come.
  release(now) {
    const out = [];
    while (this.queue.length && this.waitFor(this.queue[0], now) === 0) {
      const frame = this.queue.shift();
      if (frame.type !== "send") {
        this.buckets.all.tokens -= 1;
        const group = this.buckets[GROUPS[frame.type]];
        if (group) group.tokens -= 1;
      }
      out.push(frame);
    }
    return out;
  }

  // Milliseconds until the first waiting frame may go; null when none waits.
  nextInMs(now) {
    return this.queue.length ? this.waitFor(this.queue[0], now) : null;
  }

  waitFor(frame, now) {
    if (frame.type === "send") return 0;
    const group = this.buckets[GROUPS[frame.type]];
    return Math.max(this.buckets.all.waitMs(now), group ? group.waitMs(now) : 0);
  }
}
