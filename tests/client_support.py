"""Support for the client tests: a loopback TCP proxy that can cut connections, and a terminal screen."""

from __future__ import annotations

import asyncio
import os
import re
import socket
import sys
import threading
import time
from collections.abc import Callable, Sequence

import pexpect
import psycopg
import pyte

from tests.support import ROOT


class CuttingProxy:
    """Forwards 127.0.0.1:<port> to a chatd; can hold the server's bytes and cut every connection.

    ``hold()`` drops what the server sends (e.g. the ``ack`` of a send it stored) while the
    client's bytes still go through; ``cut()`` closes every connection and refuses new ones
    until ``restore()``: a network drop in the middle of a conversation, on loopback only.
    """

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self._listener.getsockname()[1])
        self._lock = threading.Lock()
        self._pairs: list[tuple[socket.socket, socket.socket]] = []
        self._holding = False
        self._refusing = False
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            if self._refusing:
                client.close()
                continue
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=5)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            with self._lock:
                self._pairs.append((client, upstream))
            threading.Thread(target=self._pump, args=(client, upstream, False), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, True), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, from_server: bool) -> None:
        try:
            while data := src.recv(65536):
                if from_server and self._holding:
                    continue  # lost in the network
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                s.close()

    def hold(self) -> None:
        self._holding = True

    def cut(self) -> None:
        """Close every connection and refuse new ones."""
        self._refusing = True
        with self._lock:
            pairs, self._pairs = self._pairs, []
        for pair in pairs:
            for s in pair:
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def restore(self) -> None:
        self._holding = False
        self._refusing = False

    def close(self) -> None:
        self._closed = True
        self.cut()
        self._listener.close()


class Terminal:
    """``chatd chat`` in a pseudo-terminal, its output rendered by a VT100 emulator (pyte)."""

    def __init__(self, args: Sequence[str], env: dict[str, str], rows: int = 60, cols: int = 120) -> None:
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("CHATD_")}
        # No cursor-position requests: the emulator does not answer them.
        full_env.update({"TERM": "xterm", "PROMPT_TOOLKIT_NO_CPR": "1", "PYTHONUNBUFFERED": "1", **env})
        self.screen = pyte.Screen(cols, rows)
        self._stream = pyte.ByteStream(self.screen)
        self.child = pexpect.spawn(
            sys.executable, ["-m", "chatd", *args], cwd=str(ROOT), env=full_env, dimensions=(rows, cols)
        )

    def pump(self) -> None:
        while True:
            try:
                data = self.child.read_nonblocking(65536, timeout=0)
            except (pexpect.TIMEOUT, pexpect.EOF):
                return
            self._stream.feed(data)

    def lines(self) -> list[str]:
        self.pump()
        return [line.rstrip() for line in self.screen.display]

    def text(self) -> str:
        return "\n".join(self.lines())

    async def wait_for(self, what: str | Callable[[str], bool], timeout_s: float = 20) -> str:
        deadline = time.monotonic() + timeout_s
        check = what if callable(what) else (lambda text: what in text)
        while time.monotonic() < deadline:
            text = self.text()
            if check(text):
                return text
            if not self.child.isalive():
                break
            await asyncio.sleep(0.05)
        raise AssertionError(f"terminal never showed {what!r} within {timeout_s}s; screen:\n{self.text()}")

    def type(self, text: str) -> None:
        self.child.send(text)

    def line(self, text: str) -> None:
        self.child.send(text + "\r")

    def close(self) -> None:
        if self.child.isalive():
            self.child.terminate(force=True)


_MESSAGE = re.compile(r"^\d\d:\d\d ([^:]+): (.*)$")  # you, a name, "user 7" (unknown), assistant, system


def chat_lines(screen_text: str) -> list[tuple[str, str]]:
    """(author, text) of every message line the terminal printed, in screen order."""
    return [(m[1], m[2]) for line in screen_text.splitlines() if (m := _MESSAGE.match(line))]


# Access tokens of 30 s (the minimum) with the warning 27 s before expiry: `token_expiring`
# arrives ~3 s after each connect, so every client test also runs the refresh + `auth` path.
SHORT_TOKENS = {"CHATD_AUTH_ACCESS_TTL_S": "30", "CHATD_AUTH_TOKEN_EXPIRING_WARNING_S": "27"}


def refresh_counts(database_url: str, user_id: int) -> tuple[int, int]:
    """(refresh tokens used, refresh tokens revoked) of a user: a reuse would revoke a family."""
    with psycopg.connect(database_url) as conn:
        row = conn.execute(
            "SELECT count(used_at), count(revoked_at) FROM refresh_tokens WHERE user_id = %s", (user_id,)
        ).fetchone()
    assert row is not None
    return int(row[0]), int(row[1])
