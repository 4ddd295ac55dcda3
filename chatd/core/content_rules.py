"""Content rules, compiled: what the send and edit paths apply to a message before it is stored.

Pure (no I/O): ``RuleSet.compile`` turns the admin's list into at most three RE2 programs, one per action,
built once per worker per version of the list; ``RuleSet.screen`` runs on every send, so with no rules
it costs one attribute test and with rules one linear-time scan per action (docs/BENCHMARKS.md,
"Content rules").  RE2 (google-re2) rather than ``re``: its matching time is linear in the text
whatever the pattern, so an admin's ``(a|a)*x`` or ``\\w*\\w*x`` cannot stall a worker (with ``re``
the latter takes over a minute on one 4000-character message).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import re2

from chatd.core import errors

ACTIONS = ("block", "flag", "mask")
KINDS = ("word", "regex")
MAX_PATTERN_CHARS = 200
MASK = "***"
_PROGRAM_MEM = 8 << 20  # RE2's memory budget per combined program: a huge alternation fails to compile, not the send


def _options() -> Any:
    opts = re2.Options()
    opts.case_sensitive = False
    opts.max_mem = _PROGRAM_MEM
    return opts


def _word_chars(ch: str) -> bool:
    return ch.isascii() and (ch.isalnum() or ch == "_")


def source(kind: str, pattern: str) -> str:
    """The RE2 source of one rule.  A word is literal and case-insensitive, bounded by ``\\b`` at each end that
    is an ASCII word character (RE2's ``\\b`` is ASCII-only, so a word ending in ``ü`` matches as a substring)."""
    if kind == "word":
        body = str(re2.escape(pattern))
        return ("\\b" if _word_chars(pattern[0]) else "") + body + ("\\b" if _word_chars(pattern[-1]) else "")
    return pattern


def validate(kind: Any, pattern: Any, action: Any) -> tuple[str, str, str]:
    """A rule as the admin API accepts it, or ``BadRequest`` saying what is wrong (nothing is stored)."""
    if kind not in KINDS:
        raise errors.BadRequest("kind must be word or regex")
    if action not in ACTIONS:
        raise errors.BadRequest("action must be block, flag or mask")
    if not isinstance(pattern, str) or not pattern.strip() or len(pattern) > MAX_PATTERN_CHARS:
        raise errors.BadRequest(f"pattern must be a non-blank string of at most {MAX_PATTERN_CHARS} characters")
    if kind == "word" and pattern != pattern.strip():
        raise errors.BadRequest("pattern: a word has no leading or trailing whitespace")
    try:
        program = re2.compile(source(kind, pattern), _options())
    except re2.error as exc:
        detail = exc.args[0].decode() if exc.args and isinstance(exc.args[0], bytes) else str(exc)
        raise errors.BadRequest(f"pattern is not a valid RE2 regex: {detail[:200]}") from None
    if program.search("") is not None:
        raise errors.BadRequest("pattern matches the empty string (it would match every message)")
    return kind, pattern, action


@dataclass(frozen=True, slots=True)
class Rule:
    id: int
    kind: str
    pattern: str
    action: str


@dataclass(frozen=True, slots=True)
class Screened:
    content: str  # masked if a mask rule matched
    flagged: tuple[int, ...] = ()  # ids of the flag rules that matched (a report is raised after the commit)
    masked: bool = False


class RuleSet:
    """The compiled rules of one version of the list."""

    __slots__ = ("_block", "_flag", "_mask", "empty", "rules", "version")

    def __init__(self, version: int, rules: Sequence[Rule]) -> None:
        self.version = version
        self.rules = tuple(rules)
        self.empty = not self.rules
        self._block = self._combine("block")
        self._mask = self._combine("mask")
        self._flag = self._combine("flag")

    @classmethod
    def compile(cls, version: int, rules: Sequence[Rule]) -> RuleSet:
        return cls(version, rules)

    def _combine(self, action: str) -> Any:
        chosen = [r for r in self.rules if r.action == action]
        if not chosen:
            return None
        return re2.compile("|".join(f"(?:{source(r.kind, r.pattern)})" for r in chosen), _options())

    def _which(self, action: str, content: str) -> tuple[int, ...]:
        """The rules of ``action`` that match (only after the combined program said one does: rare)."""
        opts = _options()
        return tuple(
            r.id
            for r in self.rules
            if r.action == action and re2.compile(source(r.kind, r.pattern), opts).search(content) is not None
        )

    def screen(self, content: str) -> Screened:
        """Block (``errors.ContentBlocked``), else mask the matches; and which flag rules matched the original."""
        if self.empty:
            return Screened(content)
        if self._block is not None and self._block.search(content) is not None:
            raise errors.ContentBlocked(details={"rules": list(self._which("block", content))})
        flagged: tuple[int, ...] = ()
        if self._flag is not None and self._flag.search(content) is not None:
            flagged = self._which("flag", content)
        if self._mask is not None:
            masked = self._mask.sub(MASK, content)
            if masked != content:
                return Screened(masked, flagged, True)
        return Screened(content, flagged)


EMPTY = RuleSet(0, ())
