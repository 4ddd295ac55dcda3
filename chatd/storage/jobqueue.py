"""A fair, bounded, at-least-once job queue on Redis, shared by every worker and instance.

Why not one Redis stream: a stream is FIFO, so one user's burst of twenty
prompts would make everybody else wait behind it.  Here each user has a list
of job ids, and users take turns (a rotation list): a claim takes the next
job of the next user whose running count is under the per-user cap.

At-least-once: a claimed job gets a lease (a deadline in a sorted set) that
its worker renews while it runs.  If the worker dies, any worker's reaper
puts the job back at the head of its user's list once the lease expired.
Every transition is one Lua script, so concurrent workers never see a job in
two places.  ``positions`` estimates where a waiting job stands.  Redis
failures leave as ``errors.Unavailable`` (``chatd.kv``'s policy).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster

from chatd.core.keys import Keys
from chatd.storage.kv import guarded

# KEYS: depth, users, active   ARGV: max_depth, prefix, then (uid, jid, payload) per job
# Per job: {depth after it (-1: refused, the queue is full), its position (-1: not waiting, e.g. running)}.
# A job id already queued or running is not queued twice (two regenerates of one answer make one job).
_ENQUEUE = """
local out = {}
local max_depth = tonumber(ARGV[1])
for i = 3, #ARGV, 3 do
  local uid, jid = ARGV[i], ARGV[i + 1]
  local ulist = ARGV[2] .. 'q:user:' .. uid
  local jkey = ARGV[2] .. 'q:job:' .. jid
  local depth = tonumber(redis.call('GET', KEYS[1]) or '0')
  if redis.call('EXISTS', jkey) == 0 then
    if depth >= max_depth then
      depth = -1
    else
      redis.call('SET', jkey, ARGV[i + 2])
      redis.call('RPUSH', ulist, jid)
      if redis.call('SADD', KEYS[3], uid) == 1 then redis.call('RPUSH', KEYS[2], uid) end
      depth = redis.call('INCR', KEYS[1])
    end
  end
  local pos = -1
  if depth >= 0 then
    local idx = redis.call('LPOS', ulist, jid)
    if idx then pos = idx * redis.call('LLEN', KEYS[2]) + (redis.call('LPOS', KEYS[2], uid) or 0) + 1 end
  end
  table.insert(out, depth)
  table.insert(out, pos)
end
return out
"""

# KEYS: depth, users, active, leases   ARGV: now_ms, lease_ms, per_user_cap, prefix, max_jobs
# Users take turns: one job per turn, at most max_jobs in one call; stops when every user in the
# rotation is at its cap (``idle`` turns in a row without a claim) or the rotation is empty.
_CLAIM = """
local out = {}
local max_jobs = tonumber(ARGV[5])
local n = redis.call('LLEN', KEYS[2])
local idle = 0
while #out < 2 * max_jobs and idle < n do
  local uid = redis.call('LPOP', KEYS[2])
  if not uid then break end
  local ulist = ARGV[4] .. 'q:user:' .. uid
  if redis.call('LLEN', ulist) == 0 then
    redis.call('SREM', KEYS[3], uid)
    n = n - 1
  else
    local running = tonumber(redis.call('GET', ARGV[4] .. 'q:running:' .. uid) or '0')
    if running >= tonumber(ARGV[3]) then
      redis.call('RPUSH', KEYS[2], uid)
      idle = idle + 1
    else
      local jid = redis.call('LPOP', ulist)
      redis.call('INCR', ARGV[4] .. 'q:running:' .. uid)
      redis.call('ZADD', KEYS[4], tonumber(ARGV[1]) + tonumber(ARGV[2]), jid)
      redis.call('DECR', KEYS[1])
      if redis.call('LLEN', ulist) > 0 then
        redis.call('RPUSH', KEYS[2], uid)
      else
        redis.call('SREM', KEYS[3], uid)
        n = n - 1
      end
      table.insert(out, jid)
      table.insert(out, redis.call('GET', ARGV[4] .. 'q:job:' .. jid) or '')
      idle = 0
    end
  end
end
return out
"""

# KEYS: leases, running, job   ARGV: jid
_ACK = """
if redis.call('ZREM', KEYS[1], ARGV[1]) == 1 then
  if tonumber(redis.call('GET', KEYS[2]) or '0') > 0 then redis.call('DECR', KEYS[2]) end
end
redis.call('DEL', KEYS[3])
return 1
"""

# KEYS: leases, depth, users, active   ARGV: now_ms, prefix, limit
_REAP = """
local expired = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[3]))
for _, jid in ipairs(expired) do
  redis.call('ZREM', KEYS[1], jid)
  local payload = redis.call('GET', ARGV[2] .. 'q:job:' .. jid)
  if payload then
    local uid = cjson.decode(payload)['user_id']
    local running = ARGV[2] .. 'q:running:' .. uid
    if tonumber(redis.call('GET', running) or '0') > 0 then redis.call('DECR', running) end
    redis.call('LPUSH', ARGV[2] .. 'q:user:' .. uid, jid)
    redis.call('INCR', KEYS[2])
    if redis.call('SADD', KEYS[4], tostring(uid)) == 1 then redis.call('LPUSH', KEYS[3], tostring(uid)) end
  end
end
return expired
"""

# KEYS: user_list, job, depth   ARGV: jid
_REMOVE = """
if redis.call('LREM', KEYS[1], 1, ARGV[1]) == 1 then
  redis.call('DEL', KEYS[2])
  redis.call('DECR', KEYS[3])
  return 1
end
return 0
"""

# KEYS: users, user_list   ARGV: uid, jid
_POSITION = """
local idx = redis.call('LPOS', KEYS[2], ARGV[2])
if not idx then return -1 end
local turn = redis.call('LPOS', KEYS[1], ARGV[1]) or 0
return idx * redis.call('LLEN', KEYS[1]) + turn + 1
"""


@dataclass(frozen=True, slots=True)
class Job:
    id: str
    user_id: int
    data: dict[str, Any]


class JobQueue:
    def __init__(
        self, client: aioredis.Redis | RedisCluster, keys: Keys, clock: Callable[[], float] = time.time
    ) -> None:
        self.redis = client
        self.keys = keys
        self.clock = clock
        p = keys.queue_prefix
        self._depth, self._users, self._active, self._leases = (
            f"{p}q:depth",
            f"{p}q:users",
            f"{p}q:active",
            f"{p}q:leases",
        )
        self._enqueue = client.register_script(_ENQUEUE)
        self._claim = client.register_script(_CLAIM)
        self._ack = client.register_script(_ACK)
        self._reap = client.register_script(_REAP)
        self._remove = client.register_script(_REMOVE)
        self._position = client.register_script(_POSITION)

    def _user_list(self, user_id: int) -> str:
        return f"{self.keys.queue_prefix}q:user:{user_id}"

    def _job(self, job_id: str) -> str:
        return f"{self.keys.queue_prefix}q:job:{job_id}"

    def _now_ms(self) -> int:
        return int(self.clock() * 1000)

    async def enqueue(self, job: Job, max_depth: int) -> int | None:
        """Queue ``job``; the new depth, or None when the queue is full.  A job id already queued
        or running is not queued twice (two regenerates of one answer make one job)."""
        [(depth, _)] = await self.enqueue_many([job], max_depth)
        return depth

    @guarded("jobqueue")
    async def enqueue_many(self, jobs: list[Job], max_depth: int) -> list[tuple[int | None, int | None]]:
        """Queue many jobs in one call: per job ``(depth, position)``; depth None when the queue was
        full, position None when the job is not waiting (it was running already)."""
        args: list[Any] = [max_depth, self.keys.queue_prefix]
        for job in jobs:
            args += [job.user_id, job.id, json.dumps({"user_id": job.user_id, "data": job.data})]
        out = await self._enqueue(keys=[self._depth, self._users, self._active], args=args)
        return [
            (None if depth < 0 else int(depth), None if pos < 0 else int(pos))
            for depth, pos in zip(out[::2], out[1::2], strict=True)
        ]

    async def claim(self, lease_s: float, per_user_cap: int) -> Job | None:
        """The next job in fair order, leased to the caller; None when nothing may run now."""
        jobs = await self.claim_many(lease_s, per_user_cap, 1)
        return jobs[0] if jobs else None

    @guarded("jobqueue")
    async def claim_many(self, lease_s: float, per_user_cap: int, max_jobs: int) -> list[Job]:
        """Up to ``max_jobs`` jobs in fair order (users take turns), leased to the caller, in one call."""
        found = await self._claim(
            keys=[self._depth, self._users, self._active, self._leases],
            args=[self._now_ms(), int(lease_s * 1000), per_user_cap, self.keys.queue_prefix, max_jobs],
        )
        jobs = []
        for raw_id, payload in zip(found[::2], found[1::2], strict=True):
            if not payload:
                continue  # removed meanwhile
            job_id = raw_id.decode() if isinstance(raw_id, bytes) else str(raw_id)
            body = json.loads(payload)
            jobs.append(Job(job_id, int(body["user_id"]), body["data"]))
        return jobs

    @guarded("jobqueue")
    async def renew(self, job_ids: list[str], lease_s: float) -> None:
        if not job_ids:
            return
        deadline = self._now_ms() + int(lease_s * 1000)
        await self.redis.zadd(self._leases, dict.fromkeys(job_ids, deadline), xx=True)

    @guarded("jobqueue")
    async def ack(self, job: Job) -> None:
        """Done (answered, cancelled or failed for good): the job leaves the queue for ever."""
        running = f"{self.keys.queue_prefix}q:running:{job.user_id}"
        await self._ack(keys=[self._leases, running, self._job(job.id)], args=[job.id])

    @guarded("jobqueue")
    async def reap(self, limit: int = 50) -> list[str]:
        """Put jobs whose lease expired (their worker died) back at the head of their user's list."""
        expired = await self._reap(
            keys=[self._leases, self._depth, self._users, self._active],
            args=[self._now_ms(), self.keys.queue_prefix, limit],
        )
        return [j.decode() if isinstance(j, bytes) else str(j) for j in expired]

    @guarded("jobqueue")
    async def remove(self, job_id: str, user_id: int) -> bool:
        """Take a job that has not started out of the queue (cancel while queued)."""
        keys = [self._user_list(user_id), self._job(job_id), self._depth]
        return bool(await self._remove(keys=keys, args=[job_id]))

    @guarded("jobqueue")
    async def position(self, job_id: str, user_id: int) -> int | None:
        """1 = next to run (an estimate under round-robin); None once it left the queue."""
        pos = int(await self._position(keys=[self._users, self._user_list(user_id)], args=[user_id, job_id]))
        return None if pos < 0 else pos

    @guarded("jobqueue")
    async def update(self, job: Job, **data: Any) -> None:
        """Record progress in the job (e.g. the answer id of the current attempt) for a takeover."""
        payload = json.dumps({"user_id": job.user_id, "data": job.data | data})
        await self.redis.set(self._job(job.id), payload, xx=True)

    @guarded("jobqueue")
    async def retry_later(self, job: Job, delay_s: float, **data: Any) -> None:
        """Hand a claimed job back after a transient failure: its data updated, its lease set to expire
        in ``delay_s``; the reaper then puts it back at the head of its user's list (never acked)."""
        payload = json.dumps({"user_id": job.user_id, "data": job.data | data})
        pipe = self.redis.pipeline(transaction=True)
        pipe.set(self._job(job.id), payload, xx=True)
        pipe.zadd(self._leases, {job.id: self._now_ms() + int(delay_s * 1000)}, xx=True)
        await pipe.execute()

    @guarded("jobqueue")
    async def missing(self, job_ids: list[str]) -> list[str]:
        """The ids of ``job_ids`` that are neither waiting nor running (the outbox sweeper's question)."""
        if not job_ids:
            return []
        pipe = self.redis.pipeline(transaction=False)
        for job_id in job_ids:
            pipe.exists(self._job(job_id))
        found = await pipe.execute()
        return [job_id for job_id, n in zip(job_ids, found, strict=True) if not n]

    @guarded("jobqueue")
    async def update_many(self, updates: list[tuple[Job, dict[str, Any]]]) -> None:
        """``update`` for many jobs in one round trip."""
        pipe = self.redis.pipeline(transaction=False)
        for job, data in updates:
            pipe.set(self._job(job.id), json.dumps({"user_id": job.user_id, "data": job.data | data}), xx=True)
        await pipe.execute()

    @guarded("jobqueue")
    async def depth(self) -> int:
        return int(await self.redis.get(self._depth) or 0)
