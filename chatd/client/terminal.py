"""``chatd chat``: the terminal client.  A thin asyncio layer around ``ClientSession``.

Finished messages are printed above the input line, once each, in seq order (so the
terminal's own scrollback is the history); streaming answers, pending sends, typing and
presence live in a small area redrawn under them.  The socket is reconnected with
backoff and resumed (join with ``since_seq``, resend of unacked sends) by the session.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import secrets
import time
from collections.abc import Coroutine
from datetime import datetime
from typing import Any

import httpx2
import websockets
from prompt_toolkit import PromptSession
from prompt_toolkit.application import Application
from prompt_toolkit.buffer import Buffer
from prompt_toolkit.filters import Condition
from prompt_toolkit.formatted_text import FormattedText, StyleAndTextTuples
from prompt_toolkit.key_binding import KeyBindings, KeyPressEvent
from prompt_toolkit.layout import ConditionalContainer, HSplit, Layout, Window
from prompt_toolkit.layout.controls import BufferControl, FormattedTextControl
from prompt_toolkit.layout.processors import BeforeInput
from prompt_toolkit.shortcuts import print_formatted_text
from prompt_toolkit.styles import Style
from websockets.asyncio.client import ClientConnection, connect

from chatd.client.model import (
    Action,
    FetchPage,
    Message,
    Notice,
    Reacted,
    Redraw,
    RefreshToken,
    Reset,
    Room,
    RoomRemoved,
    SendFrame,
    Show,
    ShowOlder,
    after_close,
)
from chatd.client.rest import Api, ApiError
from chatd.client.session import (
    ClientSession,
)

HELP = """commands:
  /rooms                 unread and mention counts     /join NAME|ID   switch room
  /create NAME [assistant]  new room (assistant: every message answered)
  /add NAME|EMAIL|ID     add a member (owner)          /me             your user id
  /more                  older messages                /who            who is online
  /stop                  stop the assistant's answer   /regen          answer again
  /react N EMOJI         toggle your reaction on the N-th newest message (1 = the last), e.g. /react 1 👍
  /report N REASON       report the N-th newest message to the room's owner and the admins
  /private on|off        private read receipts: only your devices see how far you read
  /quit                  leave (also Ctrl-D)"""

STYLE = Style.from_dict(
    {
        "time": "#888888",
        "me": "bold ansigreen",
        "user": "bold ansiblue",
        "assistant": "bold ansimagenta",
        "notice": "italic #888888",
        "status": "reverse",
        "pending": "#888888",
        "failed": "ansired",
    }
)


def _clock(created_at: str) -> str:
    try:
        return datetime.fromisoformat(created_at.replace("Z", "+00:00")).astimezone().strftime("%H:%M")
    except ValueError:
        return "--:--"


class TerminalChat:
    def __init__(self, base_url: str, room: str | None = None) -> None:
        self.api = Api(base_url)
        self.ws_url = base_url.rstrip("/").replace("http://", "ws://", 1).replace("https://", "wss://", 1) + "/ws"
        self.wanted_room = room
        self.session = ClientSession(secrets.token_hex(4))
        self.current: int | None = None
        self.conn_state = "connecting"
        self._outbox: asyncio.Queue[dict[str, Any]] | None = None
        self._ws: ClientConnection | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._stop = asyncio.Event()
        self.input = Buffer(multiline=False, accept_handler=self._accept, on_text_changed=self._typed)
        self.app: Application[None] = self._application()

    # -- screen -------------------------------------------------------------------------

    def _application(self) -> Application[None]:
        keys = KeyBindings()

        @keys.add("c-d")
        @keys.add("c-c")
        def _quit(event: KeyPressEvent) -> None:
            self._stop.set()
            event.app.exit()

        live = Window(FormattedTextControl(self._live_area), wrap_lines=True, dont_extend_height=True)
        body = HSplit(
            [
                ConditionalContainer(live, filter=Condition(lambda: bool(self._live_area()))),
                Window(FormattedTextControl(self._status_line), height=1, style="class:status"),
                Window(BufferControl(self.input, input_processors=[BeforeInput("> ")]), height=1),
            ]
        )
        return Application(layout=Layout(body), key_bindings=keys, style=STYLE, full_screen=False)

    def _name(self, user_id: int | None, role: str = "user") -> str:
        """The sender as people know them: the name from the room's roster (or its member events)."""
        if role == "assistant":
            return "assistant"
        if user_id is None:
            return role
        return "you" if user_id == self.session.user_id else self.session.name_of(user_id)

    def _format(self, m: Message) -> StyleAndTextTuples:
        who = self._name(m.sender_id, m.role)
        if m.answered_by:  # one of the room's assistants: its @name and model
            who = f"@{m.answered_by.get('name', '')} ({m.answered_by.get('model', '')})"
        style = "class:assistant" if m.role == "assistant" else ("class:me" if who == "you" else "class:user")
        text = "(deleted)" if m.deleted else m.content
        if m.status == "cancelled":
            text += " [stopped]"
        elif m.status == "error":
            text += " [failed]"
        line: StyleAndTextTuples = [("class:time", _clock(m.created_at) + " "), (style, who), ("", f": {text}")]
        return [*line, *self._reactions(m), ("", "\n")]

    def _reactions(self, m: Message) -> StyleAndTextTuples:
        """`  👍 2  🎉 1`, yours in the "me" colour (the frames say who; "me" is known here)."""
        out: StyleAndTextTuples = []
        for r in m.reactions:
            mine = self.session.user_id in r.get("users", ())
            out.append(("class:me" if mine else "class:time", f"  {r.get('emoji', '')} {r.get('count', 0)}"))
        return out

    def _room(self) -> Room | None:
        return self.session.rooms.get(self.current) if self.current is not None else None

    def _live_area(self) -> StyleAndTextTuples:
        room = self._room()
        out: StyleAndTextTuples = []
        if room is None:
            return out
        for _prompt, position in sorted(room.queued.items()):
            out.append(("class:notice", f"assistant: waiting (position {position})\n"))
        for s in room.streams.values():
            tail = " [interrupted]" if s.interrupted else ("" if s.ended else " ▍")
            who = f"@{s.assistant}" if s.assistant else "assistant"
            out += [("class:assistant", who), ("", f" ▸ {s.text}{tail}\n")]
        for p in self.session.pending.values():
            if p.room_id != room.id:
                continue
            if p.state == "failed":
                out.append(("class:failed", f"✗ {p.content} (not sent: {p.error})\n"))
            elif p.state == "acked":
                out.append(("class:pending", f"✓ {p.content}\n"))
            else:
                out.append(("class:pending", f"… {p.content}\n"))
        return out

    def _status_line(self) -> StyleAndTextTuples:
        room = self._room()
        parts = [f"#{room.name}" if room else "no room (/rooms, /join NAME)"]
        if room is not None:
            online = sorted(room.online, key=lambda u: (u != self.session.user_id, u))
            parts.append("online: " + (", ".join(self._name(u) for u in online) or "-"))
            typing = [self._name(u) for u in sorted(room.typing)]
            if typing:
                parts.append(", ".join(typing) + (" is typing" if len(typing) == 1 else " are typing"))
        unread = sum(r.unread for r in self.session.rooms.values() if r.id != self.current)
        mentions = sum(r.mention_count for r in self.session.rooms.values() if r.id != self.current)
        if unread:
            parts.append(f"{unread} unread elsewhere" + (f" ({mentions} @)" if mentions else ""))
        parts.append(self.conn_state)
        return [("class:status", " " + " · ".join(parts) + " ")]

    def _print(self, lines: StyleAndTextTuples) -> None:
        if lines:
            print_formatted_text(FormattedText(lines), style=STYLE, end="")

    def _notice(self, text: str) -> None:
        self._print([("class:notice", text + "\n")])

    # -- actions --------------------------------------------------------------------------

    def do(self, actions: list[Action]) -> None:
        lines: StyleAndTextTuples = []
        read = False
        for a in actions:
            if isinstance(a, SendFrame):
                if self._outbox is not None:
                    self._outbox.put_nowait(a.frame)
            elif isinstance(a, FetchPage):
                self._spawn(self._fetch(a))
            elif isinstance(a, RefreshToken):
                self._spawn(self._refresh())
            elif isinstance(a, Show):
                if a.message.room_id == self.current:
                    lines += self._format(a.message)
                    read = True
            elif isinstance(a, ShowOlder):
                if a.room_id == self.current and a.messages:
                    lines.append(("class:notice", "── older messages ──\n"))
                    for m in a.messages:
                        lines += self._format(m)
                    lines.append(("class:notice", "── end of older messages ──\n"))
                elif a.room_id == self.current:
                    lines.append(("class:notice", "no older messages\n"))
            elif isinstance(a, Reset):
                if a.room_id == self.current:
                    lines.append(("class:notice", "── too many new messages: the newest follow (/more for older) ──\n"))
            elif isinstance(a, Notice):
                if a.room_id is None or a.room_id == self.current:
                    lines.append(("class:notice", a.text + "\n"))
            elif isinstance(a, Reacted):
                m = a.message
                if m.room_id == self.current:  # printed lines stay: a line says what changed on which message
                    snippet = (m.content[:30] + "…") if len(m.content) > 30 else m.content
                    counts = self._reactions(m) or [("class:time", "  none")]
                    lines += [
                        ("class:notice", f"  ↳ reactions on {self._name(m.sender_id, m.role)}: {snippet}:"),
                        *counts,
                    ]
                    lines.append(("", "\n"))
            elif isinstance(a, RoomRemoved):
                if a.room_id == self.current:
                    self.current = None
        self._print(lines)
        if read and self.current is not None:
            self.do(self.session.mark_read(self.current))
        if any(isinstance(a, Redraw) for a in actions) or lines:
            self.app.invalidate()

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _fetch(self, a: FetchPage) -> None:
        try:
            page = await self.api.call("GET", f"/rooms/{a.room_id}/messages", params=a.query())
        except (ApiError, OSError, httpx2.HTTPError) as exc:
            self._notice(f"could not load messages: {exc}")
            await asyncio.sleep(1)
            self.do(self.session.page_failed(a.room_id))
            return
        self.do(self.session.page(a.room_id, a.purpose, page["messages"], page["has_more"]))

    async def _refresh(self) -> None:
        try:
            token = await self.api.refresh()
        except (ApiError, OSError, httpx2.HTTPError) as exc:
            self._notice(f"token refresh failed: {exc}")
            return
        self.do(self.session.token_refreshed(token))

    async def _load_members(self, room_id: int) -> None:
        """The room's roster: the names its messages, typing and presence are shown with."""
        cursor = None
        try:
            while True:
                query: dict[str, Any] = {"limit": 200, **({"cursor": cursor} if cursor is not None else {})}
                body = await self.api.call("GET", f"/rooms/{room_id}/members", params=query)
                self.do(self.session.set_members(body["members"]))
                cursor = body.get("next_cursor")
                if cursor is None:
                    return
        except (ApiError, OSError, httpx2.HTTPError) as exc:
            self._notice(f"could not load the members' names ({exc}): shown as user ids")

    async def _find_user(self, who: str) -> tuple[int, str]:
        """A user id and name from an id, an email or a name (prefix), as the web app does (GET /users?q=)."""
        if who.isdigit():
            return int(who), self.session.name_of(int(who))
        users = (await self.api.call("GET", "/users", params={"q": who}))["users"]
        exact = [u for u in users if str(u["name"]).lower() == who.lower()]
        if len(users) == 1 or len(exact) == 1:
            user = users[0] if len(users) == 1 else exact[0]
            return int(user["id"]), str(user["name"])
        if not users:
            raise LookupError(f'no one found for "{who}"')
        found = ", ".join(f"{u['name']} (#{u['id']})" for u in users)
        raise LookupError(f"several people match: {found}; use the email or id")

    async def _reload_rooms(self) -> None:
        body = await self.api.call("GET", "/rooms", params={"limit": 200})
        self.do(self.session.set_rooms(body["rooms"]))

    # -- commands -----------------------------------------------------------------------------

    def _accept(self, buf: Buffer) -> bool:
        text = buf.text.strip()
        if text.startswith("/"):
            self._spawn(self._command(text))
        elif text:
            if self.current is None:
                self._notice("join a room first: /rooms, /join NAME")
            else:
                self.do(self.session.send_text(self.current, buf.text, time.monotonic()))
        return False  # clear the line

    def _typed(self, buf: Buffer) -> None:
        if self.current is not None and not buf.text.startswith("/"):
            self.do(self.session.input_changed(self.current, not buf.text.strip(), time.monotonic()))

    async def _command(self, text: str) -> None:
        cmd, _, arg = text.partition(" ")
        arg = arg.strip()
        try:
            await self._run_command(cmd, arg)
        except ApiError as exc:
            self._notice(f"{cmd}: {exc.message}")
        except LookupError as exc:
            self._notice(f"{cmd}: {exc}")
        except (OSError, httpx2.HTTPError) as exc:
            self._notice(f"{cmd}: {exc}")

    async def _run_command(self, cmd: str, arg: str) -> None:
        s = self.session
        if cmd in ("/quit", "/exit"):
            self._stop.set()
            self.app.exit()
        elif cmd == "/help":
            self._notice(HELP)
        elif cmd == "/me":
            self._notice(f"you are user {s.user_id} ({self.api.user.get('email', '')})")
        elif cmd == "/rooms":
            await self._reload_rooms()
            rows = [
                f"  {r.id:>5}  {r.name}{' (assistant)' if r.kind == 'assistant' else ''}"
                + (f"  {r.unread} unread" if r.unread else "")
                + (f"  {r.mention_count} @" if r.mention_count else "")
                for r in s.rooms.values()
            ]
            self._notice("rooms:\n" + ("\n".join(rows) or "  none yet: /create NAME"))
        elif cmd == "/join":
            await self._reload_rooms()
            await self._open(arg)
        elif cmd == "/create":
            name, _, kind = arg.rpartition(" ") if arg.endswith(" assistant") else (arg, "", "group")
            room = await self.api.call("POST", "/rooms", {"name": name, "kind": kind})
            await self._reload_rooms()
            await self._open(str(room["id"]))
        elif cmd == "/add":
            room_id = self.current
            if room_id is None or (len(arg) < 2 and not arg.isdigit()):
                self._notice("usage: /add NAME, EMAIL or USER_ID (in a room you own)")
                return
            user_id, name = await self._find_user(arg)
            res = await self.api.call("POST", f"/rooms/{room_id}/members", {"user_id": user_id})
            if not arg.isdigit():
                s.names[user_id] = name  # found by name or email: its name is known (an id's comes with member_joined)
            self._notice(f"{name} {'added' if res['added'] else 'is already a member'}")
        elif cmd == "/private" and arg in ("on", "off"):
            s.private_reads = arg == "on"
            self._notice(f"private read receipts {arg}")
        elif cmd == "/who":
            room = self._room()
            if room is not None:
                self._notice("online: " + ", ".join(self._name(u) for u in sorted(room.online)))
        elif cmd == "/more" and self.current is not None:
            self.do(s.load_older(self.current) or [Notice("no older messages")])
        elif cmd == "/stop" and self.current is not None:
            self.do(s.cancel(self.current))
        elif cmd == "/regen" and self.current is not None:
            self.do(s.regenerate(self.current))
        elif cmd == "/react" and self._room() is not None:
            self.do(self._react(arg))
        elif cmd == "/report" and self._room() is not None:
            await self._report(arg)
        else:
            self._notice(f"unknown command {cmd} (/help)")

    def _react(self, arg: str) -> list[Action]:
        room = self._room()
        back, _, emoji = arg.partition(" ")
        shown = [m for m in room.ordered() if not m.deleted] if room else []
        if room is None or not back.isdigit() or not 1 <= int(back) <= len(shown) or not emoji.strip():
            return [Notice("usage: /react N EMOJI (N = 1 for the last message, 2 for the one before...)")]
        return self.session.react(room.id, shown[-int(back)].message_id, emoji.strip())

    async def _report(self, arg: str) -> None:
        """``/report N REASON``: REST (POST .../reports); reporting the same message again finds the first report."""
        room = self._room()
        back, _, reason = arg.partition(" ")
        shown = [m for m in room.ordered() if not m.deleted] if room else []
        if room is None or not back.isdigit() or not 1 <= int(back) <= len(shown) or not reason.strip():
            self._notice("usage: /report N REASON (N = 1 for the last message, 2 for the one before...)")
            return
        msg = shown[-int(back)]
        path = f"/rooms/{room.id}/messages/{msg.message_id}/reports"
        report = await self.api.call("POST", path, {"reason": reason.strip()})
        self._notice(f"reported message {msg.seq} (report {report['id']}): the room's owner and the admins see it")

    async def _open(self, name_or_id: str) -> None:
        rooms = self.session.rooms.values()
        room = next((r for r in rooms if r.name == name_or_id), None) or next(
            (r for r in rooms if str(r.id) == name_or_id), None
        )
        if room is None:
            self._notice(f"no room {name_or_id!r} (/rooms lists yours, /create NAME makes one)")
            return
        await self._load_members(room.id)  # before the history: printed lines are not redrawn
        self.current = room.id
        self._notice(f"── #{room.name} (room {room.id}) ──")
        if room.loaded:
            self.do([Show(m) for m in room.ordered()[-20:]])
        else:
            self.do(self.session.open_room(room.id))
        self.app.invalidate()

    # -- socket -----------------------------------------------------------------------------------

    async def _connection_loop(self) -> None:
        failures = 0
        while not self._stop.is_set():
            code: int | None = None
            reason = ""
            try:
                token = await self.api.token()
                async with connect(
                    self.ws_url,
                    additional_headers={"Authorization": f"Bearer {token}"},
                    proxy=None,
                    open_timeout=10,
                    max_size=2**20,
                ) as ws:
                    code, reason = await self._serve(ws)
                    if self.session.user_id is not None:
                        failures = 0
            except ApiError as exc:
                if exc.status == 401:
                    self._notice("your session ended: sign in again")
                    self._stop.set()
                    self.app.exit()
                    return
            except (OSError, websockets.WebSocketException, TimeoutError, httpx2.HTTPError):
                pass
            finally:
                self._ws, self._outbox = None, None
                self.do(self.session.connection_lost())
            if self._stop.is_set():
                return
            nxt = after_close(code, reason, failures, random.random())
            if nxt.refresh_first:  # token expired, session revoked, account banned: a refresh tells which
                try:
                    await self.api.refresh()
                except ApiError as exc:
                    if exc.status == 401:
                        self._notice(f"your session ended ({reason or exc.message}): sign in again")
                        self._stop.set()
                        self.app.exit()
                        return
                except (OSError, httpx2.HTTPError):
                    pass
            if nxt.policy:
                self._notice("the server closed the connection: it refused too many requests from this client")
            delay = nxt.delay
            failures += 1
            self.conn_state = f"reconnecting in {delay:.1f}s"
            self.app.invalidate()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), delay)
            self.conn_state = "connecting"
            self.app.invalidate()

    async def _serve(self, ws: ClientConnection) -> tuple[int | None, str]:
        outbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._ws, self._outbox = ws, outbox
        writer = asyncio.get_running_loop().create_task(self._write(ws, outbox))
        self.conn_state = "connected"
        self.do(self.session.connection_opened())
        try:
            async for raw in ws:
                frame = json.loads(raw)
                self.do(self.session.receive(frame, time.monotonic()))
        except websockets.ConnectionClosed:
            pass
        finally:
            writer.cancel()
        return ws.close_code, ws.close_reason or ""

    async def _write(self, ws: ClientConnection, outbox: asyncio.Queue[dict[str, Any]]) -> None:
        with contextlib.suppress(websockets.ConnectionClosed):
            while True:
                await ws.send(json.dumps(await outbox.get()))

    async def _ticker(self) -> None:
        while not self._stop.is_set():
            self.do(self.session.tick(time.monotonic()))
            await asyncio.sleep(0.25)

    # -- main -------------------------------------------------------------------------------------

    async def run(self, email: str, password: str, register_name: str | None) -> int:
        try:
            user = await self.api.sign_in(email, password, register_name)
            await self._reload_rooms()
        except ApiError as exc:
            print(f"chatd chat: {exc.message}")
            await self.api.aclose()
            return 1
        except (OSError, httpx2.HTTPError) as exc:
            print(f"chatd chat: cannot reach {self.api.base_url}: {exc}")
            await self.api.aclose()
            return 1
        print(f"signed in as {user.get('name')} <{user.get('email')}>, user {user.get('id')}. /help for commands.")
        if self.wanted_room:
            await self._open(self.wanted_room)
        elif self.session.rooms:
            self._notice("your rooms: " + ", ".join(r.name for r in self.session.rooms.values()) + " (/join NAME)")
        else:
            self._notice("no rooms yet: /create NAME [assistant]")
        self._spawn(self._connection_loop())
        self._spawn(self._ticker())
        try:
            await self.app.run_async()
        finally:
            self._stop.set()
            if self._ws is not None:
                await self._ws.close()
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            await self.api.aclose()
        return 0


async def _ask(email: str | None, password: str | None) -> tuple[str, str]:
    prompt: PromptSession[str] = PromptSession()
    email = email or await prompt.prompt_async("email: ")
    password = password or await prompt.prompt_async("password: ", is_password=True)
    return email.strip(), password


def main(url: str, room: str | None, register: bool) -> int:
    """Sign in (CHATD_EMAIL / CHATD_PASSWORD, else prompts) and chat until Ctrl-D."""

    async def go() -> int:
        email, password = await _ask(os.environ.get("CHATD_EMAIL"), os.environ.get("CHATD_PASSWORD"))
        name = (os.environ.get("CHATD_NAME") or email.partition("@")[0]) if register else None
        return await TerminalChat(url, room).run(email, password, name)

    try:
        return asyncio.run(go())
    except (KeyboardInterrupt, EOFError):
        return 130
