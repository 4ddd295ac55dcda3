"""Client frame parse: today's FrameDecoder vs a msgspec tagged union (same fields, constraints as Meta).

The msgspec side is a sketch of the three frames measured, not chatd's code (docs/BENCHMARKS.md, issue 17).
Run: taskset -c 0 .venv/bin/python loadtest/bench_client_frames.py
"""
from __future__ import annotations

import timeit
from typing import Annotated

import msgspec

from chatd.core.client_frames import FrameDecoder

MAX = 2**53 - 1
Id = Annotated[int, msgspec.Meta(ge=1, le=MAX)]
Rid = Annotated[str, msgspec.Meta(min_length=1, max_length=64)] | Annotated[int, msgspec.Meta(ge=-MAX, le=MAX)] | None

class Send(msgspec.Struct, tag="send", tag_field="type", forbid_unknown_fields=False):
    room_id: Id
    content: Annotated[str, msgspec.Meta(min_length=1, max_length=4000)]
    client_msg_id: Annotated[str, msgspec.Meta(pattern=r"^[!-~]{1,64}$")]
    id: Rid = None

class Typing(msgspec.Struct, tag="typing", tag_field="type"):
    room_id: Id
    is_typing: bool
    id: Rid = None

class Ping(msgspec.Struct, tag="ping", tag_field="type"):
    id: Rid = None

dec = msgspec.json.Decoder(Send | Typing | Ping)
fd = FrameDecoder()
frames = {
    "send": '{"type":"send","room_id":7,"content":"hello there, how are you today?","client_msg_id":"c-12345","id":5}',
    "typing": '{"type":"typing","room_id":7,"is_typing":true}',
    "ping": '{"type":"ping","id":"p1"}',
}
for name, text in frames.items():
    raw = text.encode()
    n = 100_000
    a = min(timeit.repeat(lambda text=text: fd.decode(text), number=n, repeat=5)) / n * 1e6
    b = min(timeit.repeat(lambda raw=raw: dec.decode(raw), number=n, repeat=5)) / n * 1e6
    print(f"{name:7s} FrameDecoder {a:5.2f} us   msgspec {b:5.2f} us   ratio {a/b:4.1f}x")
