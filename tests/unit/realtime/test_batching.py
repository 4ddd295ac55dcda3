"""Batched: calls that arrive during one call go together in the next (no I/O: an in-memory call)."""

from __future__ import annotations

import asyncio

import pytest

from chatd.core import errors
from chatd.realtime.batching import Batched


class Recorder:
    def __init__(self) -> None:
        self.calls: list[list[int]] = []
        self.release = asyncio.Event()

    async def __call__(self, items: list[int]) -> list[int]:
        self.calls.append(items)
        await self.release.wait()
        return [i * 10 for i in items]


async def test_first_request_goes_alone_and_the_rest_wait_for_the_next_call() -> None:
    call = Recorder()
    batched: Batched[int, int] = Batched(call, max_batch=3)
    runner = asyncio.ensure_future(batched.run())
    await asyncio.sleep(0)
    first = batched(1)
    await asyncio.sleep(0)
    assert call.calls == [[1]]  # an idle batcher adds no delay
    later = [batched(i) for i in (2, 3, 4, 5)]  # arrive while [1] is in flight
    call.release.set()
    assert await first == 10
    assert [await f for f in later] == [20, 30, 40, 50]
    assert call.calls == [[1], [2, 3, 4], [5]]  # at most max_batch per call, in arrival order
    runner.cancel()


async def test_a_failed_call_fails_its_batch_only() -> None:
    outcomes = iter([ValueError("down"), None])

    async def flaky(items: list[int]) -> list[int]:
        failure = next(outcomes)
        if failure is not None:
            raise failure
        return items

    batched: Batched[int, int] = Batched(flaky)
    runner = asyncio.ensure_future(batched.run())
    await asyncio.sleep(0)
    with pytest.raises(ValueError, match="down"):
        await batched(1)
    assert await batched(2) == 2
    runner.cancel()


async def test_callers_that_gave_up_are_left_out_and_shutdown_releases_the_rest() -> None:
    call = Recorder()
    batched: Batched[int, int] = Batched(call)
    runner = asyncio.ensure_future(batched.run())
    await asyncio.sleep(0)
    busy = batched(1)
    await asyncio.sleep(0)
    gone, kept = batched(2), batched(3)
    gone.cancel()
    call.release.set()
    assert await busy == 10 and await kept == 30
    assert call.calls == [[1], [3]]
    call.release.clear()
    in_flight = batched(4)
    await asyncio.sleep(0)
    queued = batched(5)
    runner.cancel()  # shutdown while [4] is in flight and [5] waits
    await asyncio.gather(runner, return_exceptions=True)
    for fut in (in_flight, queued, batched(6)):  # nobody is left waiting, also after the loop stopped
        with pytest.raises(errors.Unavailable):
            await fut


async def test_the_queue_is_bounded_and_refuses_at_once_beyond_it() -> None:
    call = Recorder()
    batched: Batched[int, int] = Batched(call, max_batch=2, max_queue=3)
    runner = asyncio.ensure_future(batched.run())
    await asyncio.sleep(0)
    first = batched(1)
    await asyncio.sleep(0)  # [1] in flight: the queue fills behind it
    queued = [batched(i) for i in (2, 3, 4)]
    refused = batched(5)
    assert refused.done() and isinstance(refused.exception(), errors.Unavailable)
    call.release.set()
    assert await first == 10 and [await f for f in queued] == [20, 30, 40]
    assert await batched(6) == 60  # room again
    runner.cancel()
