"""Sans-I/O client state of docs/PROTOCOL.md: frames, REST pages and user intents in, actions out.

Nothing here reads a socket, a clock or a random source: the caller passes ``now`` and
performs the returned actions (send a frame, fetch a page of history, refresh the token),
feeding their results back in.  That keeps the resume rules (§10) testable without I/O,
in the style of python-websockets' sans-I/O core.  ``chatd/client/terminal.py`` drives it
with asyncio; the web app's ``chatd/static/js/session.js`` is the same machine in JavaScript.

Invariants:

- ``Room.last_seq`` is the highest seq such that every message up to it was applied (from
  ``message`` frames and REST pages, never from ``ack``).  Messages are applied in seq order,
  each once: lower seqs are duplicates, higher ones wait in ``Room.buffer`` until the gap is
  filled by the replay, live frames or a REST page.
- A send stays in ``pending`` (and is resent with the same ``client_msg_id`` after every
  reconnect, or after ``retry_after_ms`` on ``busy`` / ``rate_limited``) until its ``ack``
  arrives or its message is applied, whichever comes first: the server dedupes by
  ``client_msg_id``, so a resend never doubles a line.
- Limits (issue 22): sends go out in order, never over the server's send quota by themselves
  (``hello.limits.send``: ``count`` per ``window_ms``, plus a tenth of the window of slack), and
  none before a ``busy`` / ``rate_limited`` / ``unavailable``'s ``retry_after_ms`` passed (then one
  at a time for a window).  Typing says ``true`` at most once per TYPING_RESEND_S, and ``false``
  only after a ``true``.

tests/vectors/session/*.json are run against both twins (tests/unit/client/test_vectors.py,
tests/js/vectors.test.mjs): a change of behaviour here goes there, and into session.js.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from chatd.client.model import (
    PAGE,
    Action,
    FetchPage,
    Message,
    Notice,
    Pending,
    Reacted,
    Redraw,
    RefreshToken,
    Reset,
    Room,
    RoomRemoved,
    SendFrame,
    Show,
    ShowOlder,
    Stream,
)

RESUME_ID = "resume"
TYPING_TTL_S = 6.0  # ws.typing_ttl_s: a remote indicator expires without news
# At most one `true` per 3 s: the server relays one per ws.typing_interval_s (2 s) anyway, and a remote
# indicator lasts ws.typing_ttl_s (6 s). Against ws.typing_rate_per_s = 3 with `false` after each `true`.
TYPING_RESEND_S = 3.0
TYPING_IDLE_S = 4.0  # after this long without input, say we stopped
SEND_LIMIT = 20  # ws.send_rate_count, until `hello.limits.send` says
SEND_WINDOW_S = 10.0  # ws.send_rate_window_s, likewise
WINDOW_SLACK = 1.1  # plus a tenth of the window, in which the server counts sends across its workers
GAP_GRACE_S = 1.5  # the server fills its own gaps within ~0.25 s; after this, fill over REST
JOIN_RETRY_S = 2.0
UNAVAILABLE_RETRY_S = 2.0
FILL_PAGE = 200  # REST maximum, for catch-up


# ---------------------------------------------------------------------------------------------- session


@dataclass
class _Typing:
    room_id: int
    input_at: float  # the last change of the composer
    shown: bool = False  # a `true` went out and no `false` since


class ClientSession:
    """The state of one signed-in client across reconnects."""

    def __init__(self, client_id: str) -> None:
        self.client_id = client_id  # prefix of client_msg_ids: unique per client instance
        self.user_id: int | None = None
        self.private_reads = False  # read markers for your own devices only: no receipts to other members
        self.connected = False  # socket open
        self.live = False  # resume barrier passed: sends go out directly
        self.rooms: dict[int, Room] = {}
        self.pending: dict[str, Pending] = {}  # insertion order = send order
        self._counter = 0
        self._acked: dict[str, tuple[int, int]] = {}  # client_msg_id -> (room, seq): recent acks
        self._typing: _Typing | None = None  # the composer of one room, while it has text
        self._typing_sent_at = -math.inf  # the last `true`, whatever its room
        self._send_log: deque[float] = deque()  # times of the sends written: pacing to the quota
        self.send_limit = SEND_LIMIT
        self.send_window_s = SEND_WINDOW_S * WINDOW_SLACK
        self._hold_until = 0.0  # after busy / rate_limited / unavailable: no send before
        self._probe_until = 0.0  # and until then one send at a time: the server counts sends we cannot see
        self.names: dict[int, str] = {}  # user id -> display name (roster pages, member events)

    # -- rooms ----------------------------------------------------------------------------

    def set_rooms(self, rooms: Iterable[Mapping[str, Any]]) -> list[Action]:
        """The room list from ``GET /api/v1/rooms``: new rooms are joined, vanished ones dropped."""
        out: list[Action] = []
        seen = set()
        for r in rooms:
            seen.add(int(r["id"]))
            out.extend(self._upsert_room(r))
        for rid in [rid for rid in self.rooms if rid not in seen]:
            del self.rooms[rid]
            out.append(RoomRemoved(rid))
        out.append(Redraw())
        return out

    def _upsert_room(self, r: Mapping[str, Any]) -> list[Action]:
        """A REST room object in: a new room is joined when connected."""
        rid = int(r["id"])
        out: list[Action] = []
        room = self.rooms.get(rid)
        if room is None:
            room = self.rooms[rid] = Room(rid)
            if self.connected:
                out.append(self._join(room))
        room.name = str(r.get("name", ""))
        room.kind = str(r.get("kind", "group"))
        room.owner_id = r.get("owner_id")
        room.status = str(r.get("status", "active"))
        room.read_seq = max(room.read_seq, int(r.get("read_seq", 0)))
        room.mention_count = int(r.get("mention_count", room.mention_count))
        room.latest_seq = max(room.latest_seq, int(r.get("last_seq", 0)))
        return out

    def set_members(self, members: Iterable[Mapping[str, Any]]) -> list[Action]:
        """A page of ``GET /rooms/{id}/members``: the names senders are shown with."""
        for m in members:
            self.names[int(m["id"])] = str(m.get("name", ""))
        return [Redraw()]

    def name_of(self, user_id: int | None) -> str:
        if user_id is None:
            return ""
        return self.names.get(user_id) or f"user {user_id}"

    def open_room(self, room_id: int) -> list[Action]:
        """Load a room's newest history (once); it is then rejoined with ``since_seq``."""
        room = self.rooms.get(room_id)
        if room is None or room.loaded or room.fetching:
            return []
        room.fetching = "latest"
        return [FetchPage(room_id, "latest", limit=PAGE)]

    def load_older(self, room_id: int) -> list[Action]:
        room = self.rooms.get(room_id)
        if room is None or not room.loaded or not room.has_older or room.fetching:
            return []
        room.fetching = "older"
        return [FetchPage(room_id, "older", before_seq=room.first_seq, limit=PAGE)]

    def page(self, room_id: int, purpose: str, messages: Iterable[Mapping[str, Any]], has_more: bool) -> list[Action]:
        """A REST page asked for by a ``FetchPage`` arrived (messages in ascending seq)."""
        room = self.rooms.get(room_id)
        if room is None:
            return []
        room.fetching = None
        msgs = [Message.from_json(m) for m in messages]
        out: list[Action] = []
        if purpose == "older":
            older = tuple(m for m in msgs if m.seq < room.first_seq)
            for m in older:
                room.messages[m.seq] = m
            if older:
                room.first_seq = older[0].seq
            room.has_older = has_more and bool(older)
            return [ShowOlder(room_id, older), Redraw()]
        if purpose == "latest":
            newest = msgs[-1].seq if msgs else 0
            if not room.loaded or (msgs and msgs[0].seq > room.last_seq + 1):
                # First load, or a gap too large to replay: start over from the newest page.
                was_loaded = room.loaded
                room.messages.clear()
                room.buffer = {s: m for s, m in room.buffer.items() if s > newest}
                room.loaded = True
                room.last_seq = msgs[0].seq - 1 if msgs else 0
                room.first_seq = msgs[0].seq if msgs else 1
                room.has_older = has_more
                if was_loaded:
                    out.append(Reset(room_id))
            for m in msgs:
                out += self._apply(room, m)
            if self.connected:
                out.append(self._join(room))  # replays whatever came after the page
            out.append(Redraw())
            return out
        # fill: catch-up after a gap or resync, forward from last_seq.
        for m in msgs:
            out += self._apply(room, m)
        if has_more and room.last_seq < room.latest_seq and msgs:
            room.fetching = "fill"
            out.append(FetchPage(room_id, "fill", after_seq=room.last_seq, limit=FILL_PAGE))
        out.append(Redraw())
        return out

    def page_failed(self, room_id: int) -> list[Action]:
        room = self.rooms.get(room_id)
        if room is not None:
            room.fetching = None
            room.gap_since = None  # the gap timer asks again
        return [Redraw()]

    # -- connection -------------------------------------------------------------------------

    def connection_opened(self) -> list[Action]:
        self.connected = True
        self.live = False
        return [Redraw()]

    def connection_lost(self) -> list[Action]:
        self.connected = False
        self.live = False
        for p in self.pending.values():
            if p.state == "sent":
                p.state = "queued"  # resent after the next resume barrier
        for room in self.rooms.values():
            room.joined = False
            room.typing.clear()
            room.queued.clear()  # join does not resend `queued`
            for s in room.streams.values():
                s.interrupted = True
        self._typing = None
        return [Redraw()]

    def token_refreshed(self, access_token: str) -> list[Action]:
        if not self.connected:
            return []
        return [SendFrame({"type": "auth", "id": "auth", "token": access_token})]

    # -- user intents ----------------------------------------------------------------------

    def send_text(self, room_id: int, content: str, now: float = 0.0) -> list[Action]:
        self._counter += 1
        cmid = f"{self.client_id}-{self._counter}"
        self.pending[cmid] = Pending(room_id, cmid, content)
        out: list[Action] = self._stop_typing()
        out += self._flush(now)
        out.append(Redraw())
        return out

    def input_changed(self, room_id: int, empty: bool, now: float) -> list[Action]:
        """The composer changed: `typing` true at most every TYPING_RESEND_S, false when cleared."""
        if empty:
            return self._stop_typing()
        out = self._stop_typing() if self._typing is not None and self._typing.room_id != room_id else []
        if self._typing is None:
            self._typing = _Typing(room_id, now)
        self._typing.input_at = now
        if self.live and now - self._typing_sent_at >= TYPING_RESEND_S:
            out.append(self._typing_on(now))
        return out

    def mark_read(self, room_id: int) -> list[Action]:
        room = self.rooms.get(room_id)
        if room is None or not room.loaded or room.last_seq <= room.read_seq:
            return []
        room.read_seq = room.last_seq
        room.mention_count = 0  # read to the end: no mention left after it
        out: list[Action] = [Redraw()]
        if self.connected:
            frame: dict[str, Any] = {"type": "read", "room_id": room_id, "seq": room.last_seq}
            if self.private_reads:
                frame["private"] = True
            out.append(SendFrame(frame))
        return out

    def cancel(self, room_id: int) -> list[Action]:
        """Stop the room's newest answer: the streaming one, else the queued prompt."""
        room = self.rooms.get(room_id)
        if room is None or not self.connected:
            return []
        live = [s for s in room.streams.values() if not s.ended and not s.interrupted]
        if live:
            target = max(live, key=lambda s: s.message_id).message_id
        elif room.queued:
            target = max(room.queued)
        else:
            return [Notice("nothing to stop", room_id)]
        return [SendFrame({"type": "cancel", "id": f"x:{target}", "message_id": target})]

    def react(self, room_id: int, message_id: int, emoji: str) -> list[Action]:
        """Toggle the user's ``emoji`` on a message: removed if theirs already, else added.  The counts change
        when the room's ``message_updated`` comes (this socket gets it too), not before."""
        room = self.rooms.get(room_id)
        msg = next((m for m in room.messages.values() if m.message_id == message_id), None) if room else None
        if msg is None or not self.connected:
            return []
        add = not msg.reacted(self.user_id, emoji)
        return [
            SendFrame({"type": "react", "id": f"e:{message_id}", "message_id": message_id, "emoji": emoji, "add": add})
        ]

    def regenerate(self, room_id: int, message_id: int | None = None) -> list[Action]:
        """Answer again: the given assistant message, or the room's newest live answer."""
        room = self.rooms.get(room_id)
        if room is None or not self.connected:
            return []
        if message_id is None:
            answers = [m for m in room.ordered() if m.role == "assistant" and not m.superseded]
            if not answers:
                return [Notice("no answer to regenerate", room_id)]
            message_id = answers[-1].message_id
        return [SendFrame({"type": "regenerate", "id": f"r:{message_id}", "message_id": message_id})]

    # -- time ---------------------------------------------------------------------------------

    def tick(self, now: float) -> list[Action]:
        """Call about every 0.25 s: expiries, send retries, join retries, gap fills."""
        out: list[Action] = []
        changed = False
        t = self._typing
        if t is not None and now - t.input_at >= TYPING_IDLE_S:
            out += self._stop_typing()
        elif (
            t is not None
            and self.live
            and t.input_at > self._typing_sent_at
            and now - self._typing_sent_at >= TYPING_RESEND_S
        ):
            # Typed since the last `true` (held back by the throttle, or the indicator is about to expire): say it.
            out.append(self._typing_on(now))
        for room in self.rooms.values():
            for uid in [u for u, exp in room.typing.items() if exp <= now]:
                del room.typing[uid]
                changed = True
            if not self.live:
                continue
            if room.join_retry_at is not None and room.join_retry_at <= now:
                out.append(self._join(room))
            if room.loaded and room.joined and not room.fetching and room.latest_seq > room.last_seq:
                if room.gap_since is None:
                    room.gap_since = now
                elif now - room.gap_since >= GAP_GRACE_S:
                    room.gap_since = None
                    room.fetching = "fill"
                    out.append(FetchPage(room.id, "fill", after_seq=room.last_seq, limit=FILL_PAGE))
            else:
                room.gap_since = None
        sent = self._flush(now)
        if sent:
            out += sent
            changed = True
        if changed:
            out.append(Redraw())
        return out

    # -- frames ---------------------------------------------------------------------------------

    def receive(self, frame: Mapping[str, Any], now: float) -> list[Action]:
        handler = _HANDLERS.get(str(frame.get("type")))
        if handler is None:
            return []  # unknown frame types are ignored (forward compatibility)
        return handler(self, frame, now)

    def _on_hello(self, f: Mapping[str, Any], now: float) -> list[Action]:
        self.user_id = int(f["user_id"])
        quota = (f.get("limits") or {}).get("send") or {}
        count, window_ms = quota.get("count"), quota.get("window_ms")
        if isinstance(count, int) and count > 0 and isinstance(window_ms, (int, float)) and window_ms > 0:
            self.send_limit = count
            self.send_window_s = window_ms / 1000 * WINDOW_SLACK
        out: list[Action] = [self._join(room) for room in self.rooms.values()]
        out.append(SendFrame({"type": "ping", "id": RESUME_ID}))  # barrier (§10 step 4)
        return out

    def _on_joined(self, f: Mapping[str, Any], now: float) -> list[Action]:
        room = self.rooms.get(int(f["room_id"]))
        if room is None:
            return []
        room.joined = True
        room.join_retry_at = None
        room.online = {int(u) for u in f.get("online", [])}
        if isinstance(f.get("edit_rev"), int):
            room.edit_rev = int(f["edit_rev"])  # the changes before it came ahead of `joined`
        epoch = f.get("epoch")
        if isinstance(epoch, str) and room.epoch is not None and epoch != room.epoch and room.loaded:
            # Another history of the room (a restore, a failover): what we hold is not its past.
            room.epoch = epoch
            room.messages.clear()
            room.buffer.clear()
            room.loaded, room.last_seq, room.latest_seq = False, 0, int(f.get("last_seq", 0))
            room.fetching = "latest"
            return [FetchPage(room.id, "latest", limit=PAGE), Redraw()]
        if isinstance(epoch, str):
            room.epoch = epoch
        room.latest_seq = max(room.latest_seq, int(f.get("last_seq", 0)))
        return [Redraw()]

    def _on_left(self, f: Mapping[str, Any], now: float) -> list[Action]:
        rid = int(f["room_id"])
        if f.get("reply_to") is not None:
            room = self.rooms.get(rid)
            if room is not None:
                room.joined = False
            return [Redraw()]
        if self.rooms.pop(rid, None) is None:  # removed from the room by its owner
            return []
        return [RoomRemoved(rid), Notice("you were removed from this room", rid), Redraw()]

    def _on_room_added(self, f: Mapping[str, Any], now: float) -> list[Action]:
        r = f.get("room") or {}
        if "id" not in r:
            return []
        known = int(r["id"]) in self.rooms
        out = self._upsert_room(r)
        if not known:
            out.append(Notice(f"you were added to {r.get('name', 'a room')}", int(r["id"])))
        out.append(Redraw())
        return out

    def _on_room_removed(self, f: Mapping[str, Any], now: float) -> list[Action]:
        rid = int(f["room_id"])
        if self.rooms.pop(rid, None) is None:  # already gone (its `left` came first)
            return []
        text = "you left this room" if f.get("reason") == "left" else "you were removed from this room"
        return [RoomRemoved(rid), Notice(text, rid), Redraw()]

    def _on_room_updated(self, f: Mapping[str, Any], now: float) -> list[Action]:
        r = f.get("room") or {}
        if "id" not in r or int(r["id"]) not in self.rooms:
            return []
        return [*self._upsert_room(r), Redraw()]

    def _on_announcement(self, f: Mapping[str, Any], now: float) -> list[Action]:
        return [Notice(f"announcement: {f.get('content', '')}")]

    def _on_resync(self, f: Mapping[str, Any], now: float) -> list[Action]:
        room = self.rooms.get(int(f["room_id"]))
        if room is None:
            return []
        room.latest_seq = max(room.latest_seq, int(f.get("last_seq", 0)))
        if not room.loaded or room.fetching == "latest":
            return [Redraw()]  # not loaded yet, or reloading already (a new epoch)
        # Too far behind to replay: reload the newest page, then rejoin from there.
        room.fetching = "latest"
        return [FetchPage(room.id, "latest", limit=PAGE)]

    def _on_ack(self, f: Mapping[str, Any], now: float) -> list[Action]:
        p = self.pending.get(str(f.get("client_msg_id")))
        room = self.rooms.get(int(f["room_id"]))
        seq = int(f["seq"])
        if room is not None:
            room.latest_seq = max(room.latest_seq, seq)
        self._acked[str(f.get("client_msg_id"))] = (int(f["room_id"]), seq)  # an assistant refusal may follow
        if len(self._acked) > 256:
            del self._acked[next(iter(self._acked))]
        if p is None:
            return []
        if room is None or not room.loaded or room.last_seq >= seq:
            del self.pending[p.client_msg_id]  # its message is already shown (or never will be here)
        else:
            p.state, p.seq = "acked", seq
        return [Redraw()]

    def _on_message(self, f: Mapping[str, Any], now: float) -> list[Action]:
        room = self.rooms.get(int(f["room_id"]))
        if room is None:
            return []
        msg = Message.from_json(f)
        room.latest_seq = max(room.latest_seq, msg.seq)
        if msg.kind == "system" and msg.data and msg.data.get("user_id") and msg.data.get("name"):
            self.names[int(msg.data["user_id"])] = str(msg.data["name"])  # member_joined / member_left
        if not room.loaded:
            self._settle_pending(msg)
            if msg.role == "assistant":
                room.streams.pop(msg.message_id, None)
            return [Redraw()]
        return [*self._apply(room, msg), Redraw()]

    def _on_updated(self, f: Mapping[str, Any], now: float) -> list[Action]:
        room = self.rooms.get(int(f["room_id"]))
        msg = room.messages.get(int(f.get("seq", 0))) if room else None
        if msg is None or msg.message_id != f.get("message_id"):
            return []
        rev = f.get("rev")
        if isinstance(rev, int):
            if rev < msg.rev:
                return []  # an older state than the one shown (a late publish after the join's repair)
            msg.rev = rev
        before = msg.reactions
        if f["type"] == "message_deleted":
            msg.deleted, msg.content, msg.reactions = True, "", []
        else:
            msg.content, msg.edited_at = str(f.get("content", "")), f.get("edited_at")
            msg.reactions = list(f.get("reactions") or ())
        if msg.reactions != before and not msg.deleted:
            return [Reacted(msg), Redraw()]
        return [Redraw()]

    def _on_typing(self, f: Mapping[str, Any], now: float) -> list[Action]:
        room = self.rooms.get(int(f["room_id"]))
        uid = int(f["user_id"])
        if room is None or uid == self.user_id:
            return []
        if f.get("is_typing"):
            room.typing[uid] = now + TYPING_TTL_S
        else:
            room.typing.pop(uid, None)
        return [Redraw()]

    def _on_presence(self, f: Mapping[str, Any], now: float) -> list[Action]:
        room = self.rooms.get(int(f["room_id"]))
        if room is None:
            return []
        room.online |= {int(u) for u in f["online"]}
        room.online -= {int(u) for u in f["offline"]}
        return [Redraw()]

    def _on_read(self, f: Mapping[str, Any], now: float) -> list[Action]:
        room = self.rooms.get(int(f["room_id"]))
        if room is None:
            return []
        if int(f["seq"]) >= room.read_seq:
            room.read_seq = int(f["seq"])
            room.mention_count = int(f.get("mention_count", 0))
        return [Redraw()]

    def _on_pong(self, f: Mapping[str, Any], now: float) -> list[Action]:
        if f.get("reply_to") != RESUME_ID or not self.connected:
            return []
        self.live = True
        out: list[Action] = []
        for room in self.rooms.values():
            # Streams not re-announced during the resume ended while we were away (§10).
            for mid in [mid for mid, s in room.streams.items() if s.interrupted]:
                del room.streams[mid]
            if room.loaded and room.joined and not room.fetching and room.last_seq < room.latest_seq:
                room.fetching = "fill"  # defensive (§10 step 6); the replay normally covered it
                out.append(FetchPage(room.id, "fill", after_seq=room.last_seq, limit=FILL_PAGE))
        out += self._flush(now)
        out.append(Redraw())
        return out

    def _on_token_expiring(self, f: Mapping[str, Any], now: float) -> list[Action]:
        return [RefreshToken()]

    def _on_error(self, f: Mapping[str, Any], now: float) -> list[Action]:
        reply_to = f.get("reply_to")
        code, text = str(f.get("code", "")), str(f.get("message", ""))
        if isinstance(reply_to, str) and reply_to.startswith("s:"):
            return self._send_error(reply_to[2:], code, text, f.get("retry_after_ms"), now)
        if isinstance(reply_to, str) and reply_to.startswith("j:"):
            rid = int(reply_to[2:])
            if code == "not_found":
                if self.rooms.pop(rid, None) is not None:
                    return [RoomRemoved(rid), Redraw()]
                return []
            room = self.rooms.get(rid)
            if room is not None:
                room.join_retry_at = now + JOIN_RETRY_S
            return []
        if isinstance(reply_to, str) and reply_to[:2] in ("x:", "r:", "e:"):
            return [Notice(f"{code}: {text}", level="error")]
        if code == "rate_limited":
            return []  # a typing or read frame refused as too soon: nothing the user can act on
        if code == "llm_unavailable":
            return [Notice(f"the assistant could not answer: {text}", level="error")]
        return [Notice(f"{code}: {text}", level="error")]

    def _send_error(self, cmid: str, code: str, text: str, retry_after_ms: Any, now: float) -> list[Action]:
        p = self.pending.get(cmid)
        if p is None or p.state == "acked":
            # After the ack: the message is stored, but the assistant refused to answer it (§5).
            room_id, seq = self._acked.get(cmid, (None, None))
            room = self.rooms.get(room_id) if room_id is not None else None
            msg = room.messages.get(seq) if room is not None and seq is not None else None
            if room is not None and msg is not None:
                room.notes[msg.message_id] = f"the assistant did not answer: {text}"
            return [Notice(f"the assistant did not answer: {text}", room_id, "error"), Redraw()]
        if code in ("rate_limited", "busy", "unavailable"):
            # Over the quota, overloaded or Postgres down: nothing stored; no send goes out before
            # retry_after_ms, then this one again with the same client_msg_id, in its place.
            delay = retry_after_ms / 1000 if isinstance(retry_after_ms, int) else UNAVAILABLE_RETRY_S
            p.state, p.retry_at = "waiting", now + delay
            self._hold_until = max(self._hold_until, p.retry_at)
            self._probe_until = self._hold_until + self.send_window_s
            return [Redraw()]
        p.state, p.error = "failed", text
        return [Notice(f"not sent: {text}", p.room_id, "error"), Redraw()]

    def _on_queued(self, f: Mapping[str, Any], now: float) -> list[Action]:
        room = self.rooms.get(int(f["room_id"]))
        if room is None:
            return []
        room.queued[int(f["reply_to_message_id"])] = int(f.get("position", 1))
        return [Redraw()]

    def _on_cancelled(self, f: Mapping[str, Any], now: float) -> list[Action]:
        """A queued answer was cancelled before it started: its waiting indicator goes."""
        room = self.rooms.get(int(f["room_id"]))
        if room is None or room.queued.pop(int(f["reply_to_message_id"]), None) is None:
            return []
        return [Redraw()]

    def _on_stream_start(self, f: Mapping[str, Any], now: float) -> list[Action]:
        room = self.rooms.get(int(f["room_id"]))
        if room is None:
            return []
        prompt = int(f["reply_to_message_id"])
        room.queued.pop(prompt, None)
        mid = int(f["message_id"])
        # A fresh bubble, also when re-announced on join: the catch-up chunk then holds the whole
        # text so far with an index > -1, so "append when the index is new" rebuilds it exactly.
        by = f.get("answered_by") or {}
        room.streams[mid] = Stream(room.id, mid, prompt, str(f.get("model", "")), str(by.get("name", "")))
        return [Redraw()]

    def _on_stream_chunk(self, f: Mapping[str, Any], now: float) -> list[Action]:
        room = self.rooms.get(int(f["room_id"]))
        stream = room.streams.get(int(f["message_id"])) if room else None
        index = int(f.get("index", 0))
        if stream is None or index <= stream.last_index:
            return []
        stream.text += str(f.get("content", ""))
        stream.last_index = index
        return [Redraw()]

    def _on_stream_end(self, f: Mapping[str, Any], now: float) -> list[Action]:
        room = self.rooms.get(int(f["room_id"]))
        stream = room.streams.get(int(f["message_id"])) if room else None
        if room is None or stream is None:
            return []  # not open: e.g. an orphan's end after a takeover
        seq = int(f.get("seq", 0))
        room.latest_seq = max(room.latest_seq, seq)
        stored = seq > 0 and room.messages.get(seq) is not None
        if seq == 0 or stored or not room.loaded:
            del room.streams[stream.message_id]  # nothing stored, or the stored answer is shown already
        else:
            stream.ended, stream.stop_reason = True, str(f.get("stop_reason", ""))
        return [Redraw()]

    # -- internals ------------------------------------------------------------------------------

    def _join(self, room: Room) -> SendFrame:
        room.join_retry_at = None
        frame: dict[str, Any] = {"type": "join", "id": f"j:{room.id}", "room_id": room.id}
        if room.loaded:
            frame["since_seq"] = room.last_seq
            if room.epoch is not None:
                frame["epoch"] = room.epoch
            if room.edit_rev is not None:
                frame["since_rev"] = room.edit_rev  # edits, deletes and reactions missed meanwhile
        return SendFrame(frame)

    def _flush(self, now: float) -> list[Action]:
        """Sends due, in order, as many as the quota allows now; the rest go from a later tick."""
        if not self.live:
            return []
        probing = now < self._probe_until  # after a refusal: the next send waits for the answer to this one
        if probing and any(p.state == "sent" for p in self.pending.values()):
            return []
        out: list[Action] = []
        for p in self.pending.values():
            if p.state != "queued" and not (p.state == "waiting" and p.retry_at is not None and p.retry_at <= now):
                continue
            if not self._may_send(now):
                break
            out.append(self._send(p, now))
            if probing:
                break
        return out

    def _may_send(self, now: float) -> bool:
        if now < self._hold_until:
            return False
        while self._send_log and self._send_log[0] <= now - self.send_window_s:
            self._send_log.popleft()
        return len(self._send_log) < self.send_limit

    def _send(self, p: Pending, now: float) -> SendFrame:
        p.state, p.retry_at = "sent", None
        self._send_log.append(now)
        return SendFrame(
            {
                "type": "send",
                "id": f"s:{p.client_msg_id}",
                "room_id": p.room_id,
                "content": p.content,
                "client_msg_id": p.client_msg_id,
            }
        )

    def _typing_on(self, now: float) -> SendFrame:
        assert self._typing is not None
        self._typing_sent_at = now
        self._typing.shown = True
        return SendFrame({"type": "typing", "room_id": self._typing.room_id, "is_typing": True})

    def _stop_typing(self) -> list[Action]:
        t, self._typing = self._typing, None
        if t is None or not t.shown or not self.connected:
            return []
        return [SendFrame({"type": "typing", "room_id": t.room_id, "is_typing": False})]

    def _settle_pending(self, msg: Message) -> None:
        if msg.client_msg_id is not None and msg.sender_id is not None and msg.sender_id == self.user_id:
            p = self.pending.get(msg.client_msg_id)
            if p is not None and p.room_id == msg.room_id and p.state != "failed":
                del self.pending[msg.client_msg_id]  # stored: never resend it

    def _apply(self, room: Room, msg: Message) -> list[Action]:
        """Apply in seq order: duplicates refresh the stored copy, later seqs wait for the gap."""
        if msg.seq <= room.last_seq:
            known = room.messages.get(msg.seq)
            if known is not None and known.message_id == msg.message_id:
                known.content, known.status, known.deleted = msg.content, msg.status, msg.deleted
                known.reactions = msg.reactions
                known.superseded = known.superseded or msg.superseded
            self._settle_pending(msg)
            return []
        if msg.seq > room.last_seq + 1:
            room.buffer[msg.seq] = msg
            return []
        out: list[Action] = []
        nxt: Message | None = msg
        while nxt is not None:
            room.messages[nxt.seq] = nxt
            if nxt.sender_id is not None:
                room.typing.pop(nxt.sender_id, None)  # sent: no longer typing it
            room.last_seq = nxt.seq
            room.gap_since = None
            self._settle_pending(nxt)
            if nxt.role == "assistant":
                room.streams.pop(nxt.message_id, None)
                if nxt.reply_to_message_id is not None:
                    # A new answer to the same prompt replaces the older ones (no live frame says so).
                    for old in room.messages.values():
                        if (
                            old is not nxt
                            and old.role == "assistant"
                            and old.reply_to_message_id == nxt.reply_to_message_id
                        ):
                            old.superseded = True
            out.append(Show(nxt))
            nxt = room.buffer.pop(room.last_seq + 1, None)
        for s in [s for s in room.buffer if s <= room.last_seq]:
            del room.buffer[s]
        return out


_HANDLERS = {
    "hello": ClientSession._on_hello,
    "joined": ClientSession._on_joined,
    "left": ClientSession._on_left,
    "resync_required": ClientSession._on_resync,
    "ack": ClientSession._on_ack,
    "message": ClientSession._on_message,
    "message_updated": ClientSession._on_updated,
    "message_deleted": ClientSession._on_updated,
    "typing": ClientSession._on_typing,
    "presence": ClientSession._on_presence,
    "read": ClientSession._on_read,
    "pong": ClientSession._on_pong,
    "token_expiring": ClientSession._on_token_expiring,
    "error": ClientSession._on_error,
    "queued": ClientSession._on_queued,
    "cancelled": ClientSession._on_cancelled,
    "stream_start": ClientSession._on_stream_start,
    "stream_chunk": ClientSession._on_stream_chunk,
    "stream_end": ClientSession._on_stream_end,
    "room_added": ClientSession._on_room_added,
    "room_removed": ClientSession._on_room_removed,
    "room_updated": ClientSession._on_room_updated,
    "announcement": ClientSession._on_announcement,
}
