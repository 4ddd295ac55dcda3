"""Content rules on the send path: what ``Rooms.submit`` adds per message (docs/BENCHMARKS.md, "Content rules").

Measures ``RuleSet.screen`` (chatd/core/content_rules.py) as the send path calls it: no rules (the one
attribute test), then 10, 100 and 500 rules (words and regexes, a third each of block, flag and mask, none
matching, the common case), on a 60-character message and on a 4,000-character one (ws.max_message_chars),
and a message that a mask rule matches.  For comparison, the same combined alternation with Python's ``re``.
Each figure is the best of 5 x N calls, in µs per call.

Run: taskset -c 0 .venv/bin/python loadtest/bench_content_rules.py
"""

from __future__ import annotations

import argparse
import functools
import random
import re
import string
import timeit
from collections.abc import Callable

from chatd.core.content_rules import EMPTY, Rule, RuleSet, source

SHORT = "hey, are we still on for the review at 3? bring the slides"
LONG = ("the quick brown fox jumps over the lazy dog and then some more words follow here " * 60)[:4000]


def rules(n: int, seed: int = 7) -> list[Rule]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        word = "".join(rng.choice(string.ascii_lowercase) for _ in range(9))  # never in the messages
        kind = "regex" if i % 2 else "word"
        pattern = f"{word}[0-9]+" if kind == "regex" else word
        out.append(Rule(i + 1, kind, pattern, ("block", "flag", "mask")[i % 3]))
    return out


def per_call(fn: Callable[[], object], number: int) -> float:
    return min(timeit.repeat(fn, number=number, repeat=5)) / number * 1e6


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--number", type=int, default=20_000)
    args = parser.parse_args()
    n = args.number
    print("| rules | message | RE2 screen µs/send | Python re (same alternation) µs/send |")
    print("|---|---|---|---|")
    print(f"| 0 | any | {per_call(lambda: EMPTY.empty or EMPTY.screen(SHORT), n * 10):.3f} | — |")
    for count in (10, 100, 500):
        ruleset = RuleSet.compile(1, rules(count))
        py = re.compile("|".join(f"(?:{source(r.kind, r.pattern)})" for r in ruleset.rules), re.IGNORECASE)
        for name, text in (("60 chars", SHORT), ("4,000 chars", LONG)):
            number = n if len(text) < 100 else max(200, n // 20)
            ours = per_call(functools.partial(ruleset.screen, text), number)
            theirs = per_call(functools.partial(py.search, text), number)
            print(f"| {count} | {name} | {ours:.2f} | {theirs:.2f} (search only) |")
    ruleset = RuleSet.compile(1, [*rules(99), Rule(100, "word", "slides", "mask")])
    masked = per_call(lambda: ruleset.screen(SHORT), n)
    print(f"| 100 | 60 chars, one mask match | {masked:.2f} | — |")


if __name__ == "__main__":
    main()
