"""Client frame parse, before / after: ``FrameDecoder.decode`` of two chatd trees, each in its own process.

"after" is this tree, "before" another checkout (e.g. ``git worktree add --detach /work/before 8f8906c``: the
hand-written parser).  Runs alternate before, after, ...; each run is the best of 5 x 100,000 decodes per frame;
the table is the median of the runs (docs/BENCHMARKS.md, "client frames as msgspec models").

Run: taskset -c 0 .venv/bin/python loadtest/bench_client_frames.py --before /work/before [--runs 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import timeit
from pathlib import Path

SEND = '{"type":"send","room_id":7,"content":"hello there, how are you today?","client_msg_id":"c-12345","id":5'
FRAMES = {
    "send": SEND + "}",
    "typing": '{"type":"typing","room_id":7,"is_typing":true}',
    "ping": '{"type":"ping","id":"p1"}',
    "join": '{"type":"join","id":"j:7","room_id":7,"since_seq":120,"epoch":"3f2a9c"}',
    "send, unknown member": SEND + ',"v":2}',  # valid, but not every member declared: the slow path
    "send, room_id 0": SEND.replace('"room_id":7', '"room_id":0') + "}",  # a field error (FrameError)
}
NUMBER = 100_000


def measure() -> dict[str, float]:
    """µs per decode of each frame with the ``chatd`` on sys.path (best of 5)."""
    from chatd.core.client_frames import FrameDecoder, FrameError

    decoder = FrameDecoder()

    def decode(text: str) -> None:
        try:
            decoder.decode(text)
        except FrameError:
            pass

    out: dict[str, float] = {}
    for name, text in FRAMES.items():
        def one(text: str = text) -> None:
            decode(text)

        out[name] = min(timeit.repeat(one, number=NUMBER, repeat=5)) / NUMBER * 1e6
    return out


def run(tree: Path) -> dict[str, float]:
    env = dict(os.environ, PYTHONPATH=str(tree))
    out = subprocess.run(
        [sys.executable, __file__, "--child"], env=env, cwd=tree, check=True, capture_output=True, text=True
    ).stdout
    result: dict[str, float] = json.loads(out)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", type=Path, required="--child" not in sys.argv, help="the other chatd checkout")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure()))
        return
    after = Path(__file__).resolve().parents[1]
    runs: dict[str, list[dict[str, float]]] = {"before": [], "after": []}
    for i in range(args.runs):
        for label, tree in (("before", args.before.resolve()), ("after", after)):
            runs[label].append(run(tree))
            print(f"run {i + 1} {label}: " + ", ".join(f"{k} {v:.2f}" for k, v in runs[label][-1].items()))
    print(f"\nmedian of {args.runs} runs, µs per frame (best of 5 x {NUMBER:,} each)")
    print("| frame | before | after | ratio |\n|---|---|---|---|")
    for name in FRAMES:
        before = statistics.median(r[name] for r in runs["before"])
        now = statistics.median(r[name] for r in runs["after"])
        print(f"| {name} | {before:.2f} | {now:.2f} | {before / now:.1f}x |")


if __name__ == "__main__":
    main()
