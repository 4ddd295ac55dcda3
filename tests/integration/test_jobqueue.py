"""The fair queue against a real Valkey (Lua scripts run server-side)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis

from chatd.core.keys import Keys
from chatd.storage.jobqueue import Job, JobQueue
from tests.conftest import Services


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def queue(services: Services) -> AsyncIterator[tuple[JobQueue, Clock]]:
    client = aioredis.Redis.from_url(services.redis_url)
    clock = Clock()
    yield JobQueue(client, Keys(f"jq{uuid.uuid4().hex[:8]}:"), clock), clock
    await client.aclose()


def job(user: int, n: int) -> Job:
    return Job(f"u{user}-{n}-{uuid.uuid4().hex[:6]}", user, {"n": n})


async def drain(q: JobQueue, cap: int = 100) -> list[Job]:
    out = []
    while (j := await q.claim(lease_s=30, per_user_cap=cap)) is not None:
        out.append(j)
        await q.ack(j)
    return out


async def test_round_robin_between_users(queue: tuple[JobQueue, Clock]) -> None:
    q, _ = queue
    for n in range(5):
        await q.enqueue(job(1, n), max_depth=100)  # user 1 bursts first
    await q.enqueue(job(2, 0), max_depth=100)
    await q.enqueue(job(3, 0), max_depth=100)
    order = [(j.user_id, j.data["n"]) for j in await drain(q)]
    assert order[:3] == [(1, 0), (2, 0), (3, 0)]  # the burst does not starve the others
    assert [n for u, n in order if u == 1] == [0, 1, 2, 3, 4]  # a user's own jobs stay in order


async def test_per_user_cap_skips_to_other_users(queue: tuple[JobQueue, Clock]) -> None:
    q, _ = queue
    for n in range(3):
        await q.enqueue(job(1, n), max_depth=100)
    await q.enqueue(job(2, 0), max_depth=100)
    a = await q.claim(30, per_user_cap=1)
    b = await q.claim(30, per_user_cap=1)
    assert a is not None and b is not None
    assert (a.user_id, b.user_id) == (1, 2)
    assert await q.claim(30, per_user_cap=1) is None  # user 1 at its cap, nobody else waiting
    await q.ack(a)
    c = await q.claim(30, per_user_cap=1)
    assert c is not None and (c.user_id, c.data["n"]) == (1, 1)


async def test_claim_many_takes_turns_and_respects_the_caps(queue: tuple[JobQueue, Clock]) -> None:
    q, _ = queue
    for user in (1, 2, 3):
        for n in range(3):
            await q.enqueue(job(user, n), max_depth=100)
    first = await q.claim_many(30, per_user_cap=2, max_jobs=4)
    assert [(j.user_id, j.data["n"]) for j in first] == [(1, 0), (2, 0), (3, 0), (1, 1)]
    rest = await q.claim_many(30, per_user_cap=2, max_jobs=10)  # stops when every user is at the cap
    assert [(j.user_id, j.data["n"]) for j in rest] == [(2, 1), (3, 1)]
    assert await q.claim_many(30, per_user_cap=2, max_jobs=10) == [] and await q.depth() == 3


async def test_depth_limit(queue: tuple[JobQueue, Clock]) -> None:
    q, _ = queue
    assert await q.enqueue(job(1, 0), max_depth=2) == 1
    assert await q.enqueue(job(2, 0), max_depth=2) == 2
    assert await q.enqueue(job(3, 0), max_depth=2) is None
    assert await q.depth() == 2


async def test_expired_lease_is_taken_over_once(queue: tuple[JobQueue, Clock]) -> None:
    q, clock = queue
    await q.enqueue(job(1, 0), max_depth=10)
    first = await q.claim(lease_s=10, per_user_cap=1)
    assert first is not None
    assert await q.reap() == []  # lease still valid
    await q.update(first, answer_id=77)
    clock.now += 11  # the worker died: nobody renewed
    assert await q.reap() == [first.id]
    again = await q.claim(lease_s=10, per_user_cap=1)  # running count was released too
    assert again is not None and again.id == first.id and again.data["answer_id"] == 77
    await q.ack(again)
    assert await q.claim(10, 1) is None and await q.depth() == 0


async def test_renew_keeps_the_lease(queue: tuple[JobQueue, Clock]) -> None:
    q, clock = queue
    await q.enqueue(job(1, 0), max_depth=10)
    j = await q.claim(lease_s=10, per_user_cap=1)
    assert j is not None
    clock.now += 8
    await q.renew([j.id], lease_s=10)
    clock.now += 8
    assert await q.reap() == []


async def test_positions_and_remove(queue: tuple[JobQueue, Clock]) -> None:
    q, _ = queue
    jobs = [job(1, 0), job(1, 1), job(2, 0)]
    for j in jobs:
        await q.enqueue(j, max_depth=10)
    positions = [await q.position(j.id, j.user_id) for j in jobs]
    assert positions == [1, 3, 2]
    assert await q.remove(jobs[1].id, 1) is True
    assert await q.remove(jobs[1].id, 1) is False
    assert await q.depth() == 2
    assert [j.id for j in await drain(q)] == [jobs[0].id, jobs[2].id]
