"""Pure assistant logic: what goes into the prompt, and how tokens become chunk frames.

No I/O, time injected.  ``build_context`` picks the newest messages that fit a
token budget, plus older relevant ones (retrieval), into a provider request.
``Coalescer`` turns a stream of tiny token deltas into at most one
``stream_chunk`` per interval, stretching the interval for large rooms and
when the worker falls behind, so fan-out cost stays bounded.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from chatd.assistant.providers import ChatMessage

# "@assistant" as a word: not inside an address like x@assistant.io
_MENTION = re.compile(r"(?<![\w.@])@assistant\b(?![.@]\w)", re.IGNORECASE)


def mentions_assistant(content: str) -> bool:
    """``@assistant`` as a word: in a room in mode "mention", such a message is owed an answer.

    The rule itself (which rooms answer which messages) is applied by the group commit, on the
    locked room row (sql/0012): this is the part of it that reads the text.
    """
    return _MENTION.search(content) is not None


def estimate_tokens(text: str) -> int:
    """A cheap, conservative estimate: ~4 chars per token for Latin text, ~1.5 for Hangul/CJK."""
    wide = sum(1 for ch in text if ord(ch) >= 0x1100)
    return max(1, math.ceil((len(text) - wide) / 4 + wide / 1.5))


@dataclass(frozen=True, slots=True)
class Context:
    system: str
    messages: tuple[ChatMessage, ...]
    recent_ids: tuple[int, ...]  # message ids included verbatim
    retrieved_ids: tuple[int, ...]  # older ids brought in by relevance
    estimated_tokens: int


def recent_window(history: Sequence[dict[str, Any]], budget_tokens: int) -> list[dict[str, Any]]:
    """The newest messages of ``history`` (ascending) that fit the budget; the last one always."""
    if not history:
        raise ValueError("history must contain the prompt message")
    chosen: list[dict[str, Any]] = []
    used = 0
    for row in reversed(history):
        cost = estimate_tokens(row["content"]) + 4
        if chosen and used + cost > budget_tokens:
            break
        chosen.append(row)
        used += cost
    chosen.reverse()
    return chosen


def build_context(
    system_prompt: str,
    history: Sequence[dict[str, Any]],
    retrieved: Sequence[dict[str, Any]],
    budget_tokens: int,
) -> Context:
    """System prompt + newest ``history`` within budget + ``retrieved`` (older) excerpts.

    ``history`` is ascending by seq and ends with the prompt message, which is
    always included.  Retrieved rows already in the recent window are skipped.
    """
    chosen = recent_window(history, budget_tokens)
    used = sum(estimate_tokens(row["content"]) + 4 for row in chosen)
    recent = {row["id"] for row in chosen}
    extra = [r for r in retrieved if r["id"] not in recent]
    system = system_prompt
    if extra:
        lines = "\n".join(f"- [{_role(r)} #{r['seq']}] {r['content']}" for r in sorted(extra, key=lambda r: r["seq"]))
        system += "\n\nEarlier messages of this conversation that may be relevant:\n" + lines
        used += sum(estimate_tokens(r["content"]) + 8 for r in extra)
    messages = tuple(ChatMessage("assistant" if r["role"] == "assistant" else "user", r["content"]) for r in chosen)
    return Context(system, messages, tuple(r["id"] for r in chosen), tuple(r["id"] for r in extra), used)


def _role(row: dict[str, Any]) -> str:
    return "assistant" if row["role"] == "assistant" else "user"


class Coalescer:
    """Collect deltas; release a chunk when the interval since the last one has passed.

    ``interval_s`` grows with the room (one more base interval per 200 joined
    sockets beyond the first 200) and doubles while the worker lags (a flush
    came due more than one interval late).
    """

    def __init__(self, base_interval_s: float, room_sockets: int = 1, max_interval_s: float = 0.5) -> None:
        self.base_interval_s = base_interval_s
        self.max_interval_s = max_interval_s
        self.interval_s = base_interval_s
        self.set_room_size(room_sockets)
        self._pending: list[str] = []
        self._last_flush: float | None = None
        self.index = 0

    def set_room_size(self, room_sockets: int) -> None:
        factor = 1 + max(0, room_sockets - 200) // 200
        self.interval_s = min(self.max_interval_s, self.base_interval_s * factor)

    def add(self, text: str, now: float) -> str | None:
        """Buffer ``text``; return a chunk to send now, or None to keep buffering."""
        self._pending.append(text)
        if self._last_flush is None:
            self._last_flush = now  # the first token goes out at once: first-token latency matters
            return self._take()
        due = self._last_flush + self.interval_s
        if now < due:
            return None
        if now - due > self.interval_s:
            self.interval_s = min(self.max_interval_s, self.interval_s * 2)  # behind: fewer, larger chunks
        self._last_flush = now
        return self._take()

    def due_in(self, now: float) -> float | None:
        """Seconds until buffered text should go out (None: nothing buffered)."""
        if not self._pending or self._last_flush is None:
            return None
        return max(0.0, self._last_flush + self.interval_s - now)

    def flush(self, now: float) -> str | None:
        """Whatever is buffered (end of stream, or the timer fired)."""
        if not self._pending:
            return None
        self._last_flush = now
        return self._take()

    def _take(self) -> str:
        text = "".join(self._pending)
        self._pending.clear()
        self.index += 1
        return text
