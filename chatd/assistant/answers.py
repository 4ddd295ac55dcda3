"""The assistant: queued generations streamed into rooms.

Flow of one answer (this module queues, claims and retries; ``generation`` carries one claim through):

1. A user message in an assistant room commits; ``enqueue`` puts a job on the
   fair Redis queue (``JobQueue``) or refuses with ``busy`` / ``quota_exceeded``.
   While it waits, the room gets ``queued`` frames with its position.
2. Some worker claims it (per-process ``concurrency``, per-user cap in the
   queue), builds the context (recent messages within a token budget + older
   relevant ones from ``Retriever``), reserves the answer's message id and
   publishes ``stream_start``.
3. Provider deltas are coalesced into ``stream_chunk`` frames (``Coalescer``);
   the text so far is kept in Redis so a socket joining mid-stream catches up.
   Provider failures are retried only before the first token.
4. The answer is written with the room's next seq (one live answer per
   prompt: a unique index), the ``message`` frame and ``stream_end`` go out,
   and the job is acked.  A ``cancel`` stops the provider within one event-loop
   turn on whichever worker runs it (Redis control channel) and keeps the
   partial text, marked ``cancelled``.

A worker that dies mid-job stops renewing its lease; another worker takes the
job over, ends the orphaned stream with ``stop_reason: "error"`` and answers
again (``stream_start`` with ``resumed: true``, ``supersedes``: the orphan).

Every ``stream_start`` gets a ``stream_end``.  Postgres or Redis failing
mid-job (``Unavailable``) ends the stream with ``error`` and hands the job back
for a retry with backoff, never acked: a finished text whose write failed is
kept in the job and written by the retry.  An acked prompt is never forgotten:
the commit records the answer it is owed (``answers_owed``, same transaction)
and a sweeper queues owed answers that have no job.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

from chatd.assistant.generation import HISTORY, Attempt, Generations
from chatd.assistant.providers import Provider
from chatd.assistant.streams import StreamRelay
from chatd.core import client_frames, errors, server_frames
from chatd.process import metrics
from chatd.process.config import Settings
from chatd.process.logs import assistant_log, fields
from chatd.process.state import Tasks
from chatd.realtime.fanout import Hub
from chatd.storage import answers as answers_db
from chatd.storage import messages as messages_db
from chatd.storage import rooms as rooms_db
from chatd.storage.db import Database
from chatd.storage.jobqueue import Job, JobQueue
from chatd.storage.kv import KV

_CLAIM_BATCH = 128  # jobs claimed per queue round trip at most


def answers_in(room: dict[str, Any]) -> bool:
    """Whether answers can stream in this room at all (a join checks for running ones only then)."""
    settings = room.get("assistant") or {}
    return room.get("kind") == "assistant" or settings.get("mode") == "mention" or bool(room.get("assistant_count"))


class Assistant:
    def __init__(
        self,
        db: Database,
        kv: KV,
        hub: Hub,
        provider: Provider,
        retriever: Any | None,
        settings: Settings,
        tasks: Tasks,
    ) -> None:
        self.db = db
        self.kv = kv
        self.settings = settings.assistant
        self.drain_timeout_s = settings.server.drain_timeout_s
        self.hub = hub
        self.provider = provider
        self.retriever = retriever
        self.tasks = tasks
        self.queue = JobQueue(kv.client, kv.keys)
        self.active = 0  # claimed jobs on this worker (a run registers under its message id a bit later)
        self.waiting: dict[str, tuple[int, int, int, int]] = {}  # job id -> (room, prompt, user, last position)
        self._wake = asyncio.Event()
        self._slot_free = asyncio.Event()
        self.streams = StreamRelay(hub, kv)
        self.generations = Generations(db, hub, provider, retriever, self.settings, self.queue, self.streams)
        self.running = self.generations.running  # by answer message id: what cancel stops, what the lease keeps
        # Prompts to queue, sent to Redis together (one script call and one PUBLISH pipeline per turn).
        self._to_enqueue: list[tuple[Job, int, asyncio.Future[tuple[int | None, int | None]]]] = []
        self._enqueue_task: asyncio.Task[None] | None = None
        self.stopping = False

    # -- lifecycle -----------------------------------------------------------------

    def start(self) -> None:
        self.hub.control_handlers["cancel"] = self._on_cancel
        self.tasks.supervise("assistant-claim", self._claim_loop)
        self.tasks.supervise("assistant-maintenance", self._maintenance_loop)
        self.tasks.supervise("assistant-outbox", self._outbox_loop)

    @staticmethod
    def answers_in(room: dict[str, Any]) -> bool:
        return answers_in(room)

    async def drain(self) -> None:
        """Shutdown: claim nothing more, let running answers finish, cancel what outlives the drain time."""
        self.stopping = True
        self._wake.set()
        deadline = time.monotonic() + self.drain_timeout_s * 0.8
        while self.active and time.monotonic() < deadline:  # noqa: ASYNC110  # shutdown only
            await asyncio.sleep(0.05)
        for run in list(self.running.values()):
            run.cancelled.set()  # partial text kept, marked cancelled
        while self.active:  # noqa: ASYNC110
            await asyncio.sleep(0.02)
        await self.generations.aclose()

    # -- enqueue ---------------------------------------------------------------------

    @staticmethod
    def job_id(prompt_id: int, supersede_id: int | None, assistant_id: int = 0) -> str:
        """One job per prompt and assistant (0: the server's default one, whose ids stay as they were)."""
        base = f"p{prompt_id}" if not assistant_id else f"p{prompt_id}-a{assistant_id}"
        return base if supersede_id is None else f"{base}-r{supersede_id}"

    async def enqueue(
        self,
        room_id: int,
        prompt_id: int,
        requester_id: int,
        supersede_id: int | None = None,
        assistant_id: int = 0,
    ) -> int:
        """Queue ``assistant_id``'s answer to ``prompt_id``; the position, or ``busy`` / ``quota_exceeded``."""
        budget = self.settings.daily_token_budget
        if budget and await answers_db.tokens_used_today(self.db, requester_id) >= budget:
            raise errors.QuotaExceeded(f"daily budget of {budget} tokens used up; it resets at 00:00 UTC")
        data: dict[str, Any] = {"room_id": room_id, "prompt_id": prompt_id, "supersede_id": supersede_id}
        if assistant_id:
            data["assistant_id"] = assistant_id
        job = Job(self.job_id(prompt_id, supersede_id, assistant_id), requester_id, data)
        done: asyncio.Future[tuple[int | None, int | None]] = asyncio.get_running_loop().create_future()
        self._to_enqueue.append((job, room_id, done))
        if self._enqueue_task is None or self._enqueue_task.done():
            self._enqueue_task = asyncio.ensure_future(self._enqueue_batches())
        depth, position = await done
        if depth is None:
            raise errors.Busy("the assistant is busy, try again later")
        return position or 1  # None: already running (a retried send re-enqueues)

    async def _enqueue_batches(self) -> None:
        """The prompts of a burst are queued together: one script call, one PUBLISH pipeline of
        ``queued`` frames (a job already running is not announced)."""
        while self._to_enqueue:
            batch, self._to_enqueue = self._to_enqueue, []
            try:
                results = await self.queue.enqueue_many([job for job, _, _ in batch], self.settings.queue_max_depth)
            except Exception as exc:  # Redis away (Unavailable), or a bug: nobody may wait for ever
                err = exc if isinstance(exc, errors.ChatdError) else errors.Unavailable("queue failed, try again")
                for _, _, done in batch:
                    if not done.done():
                        done.set_exception(err)
                continue
            frames = []
            for (job, room_id, done), (depth, position) in zip(batch, results, strict=True):
                if depth is not None and position is not None:
                    prompt_id = int(job.data["prompt_id"])
                    self.waiting[job.id] = (room_id, prompt_id, job.user_id, position)
                    frames.append(
                        (
                            room_id,
                            server_frames.queued(room_id=room_id, reply_to_message_id=prompt_id, position=position),
                        )
                    )
                if not done.done():
                    done.set_result((depth, position))
            self._wake.set()
            await self.hub.publish_room_frames(frames)

    async def settle(self, prompt_id: int, assistant_id: int | None = None) -> None:
        """``assistant_id``'s answer (None: any) owed to ``prompt_id`` will not come (refused): the sweeper
        must not queue it."""
        try:
            await answers_db.settle_answer(self.db, prompt_id, assistant_id)
        except errors.Unavailable:
            assistant_log.warning("settle_failed", extra=fields(prompt_id=prompt_id))

    async def _outbox_loop(self) -> None:
        """Queue the answers owed to acked prompts that have no job: the enqueue after the ack was lost
        (crash, shutdown, Redis down) or the job was dropped.  Every worker sweeps; the queue refuses a
        second job for the same prompt, and a job for an answered prompt is acked without a word."""
        while True:
            await asyncio.sleep(self.settings.outbox_sweep_s)
            if self.stopping:
                continue
            try:
                owed = await answers_db.answers_owed(self.db, self.settings.outbox_grace_s, 200)
                by_job = {self.job_id(int(r["prompt_id"]), None, int(r["assistant_id"])): r for r in owed}
                for job_id in await self.queue.missing(list(by_job)):
                    r = by_job[job_id]
                    room_id, prompt_id, user_id = int(r["room_id"]), int(r["prompt_id"]), int(r["requester_id"])
                    assistant_id = int(r["assistant_id"])
                    try:
                        await self.enqueue(room_id, prompt_id, user_id, assistant_id=assistant_id)
                    except errors.Busy:
                        break  # next sweep
                    except errors.QuotaExceeded as err:
                        await answers_db.settle_answer(self.db, prompt_id, assistant_id)
                        await self.hub.publish_user(user_id, server_frames.error(err, reply_to=None))
                        continue
                    assistant_log.info("answer_requeued", extra=fields(prompt_id=prompt_id, room_id=room_id))
            except errors.Unavailable:
                pass  # logged by the store / Redis adapter; the next sweep tries again

    # -- control (cancel / regenerate) -----------------------------------------------

    async def control(
        self, user_id: int, is_admin: bool, frame: client_frames.Cancel | client_frames.Regenerate
    ) -> None:
        if isinstance(frame, client_frames.Regenerate):
            await self.regenerate(user_id, frame.message_id)
        else:
            await self.cancel(user_id, is_admin, frame.message_id)

    async def cancel(self, user_id: int, is_admin: bool, message_id: int) -> None:
        """Stop a streaming answer (its message id) or a queued one (its prompt's id)."""
        state = await self.kv.stream_state(message_id)
        if state:
            allowed = {int(state[b"requester"] or 0), int(state[b"owner"] or 0)}
            # Outside the room, a running answer looks like no answer at all (forbidden would reveal it).
            if not is_admin and await rooms_db.room_for_member(self.db, int(state[b"room"] or 0), user_id) is None:
                raise errors.NotFound("no such generation")
            if user_id not in allowed and not is_admin:
                raise errors.Forbidden("only the requester or the room owner may cancel")
            await self.hub.control("cancel", message_id=message_id)
            return
        prompt = await messages_db.message_by_id(self.db, message_id)
        if prompt is not None and prompt["sender_id"] is not None:
            room = await rooms_db.room_for_member(self.db, prompt["room_id"], user_id)
            if room is not None and (user_id in (prompt["sender_id"], room["owner_id"]) or is_admin):
                # The default assistant's job first, as before (no extra round trip), then the room assistants'.
                cancelled = await self._cancel_queued(prompt, 0)
                for assistant_id in await answers_db.owed_by(self.db, message_id):
                    if assistant_id:
                        cancelled = await self._cancel_queued(prompt, assistant_id) or cancelled
                if cancelled:
                    # Every member's "waiting" indicator goes: no stream_start will come.
                    frame = server_frames.cancelled(room_id=prompt["room_id"], reply_to_message_id=message_id)
                    await self.hub.publish_room(prompt["room_id"], frame)
                    return
        raise errors.NotFound("no such generation")

    async def _cancel_queued(self, prompt: dict[str, Any], assistant_id: int) -> bool:
        """Drop ``assistant_id``'s queued answer to ``prompt``; whether one was queued or owed."""
        job_id = self.job_id(prompt["id"], None, assistant_id)
        removed = await self.queue.remove(job_id, prompt["sender_id"])
        # Owed but not queued (its enqueue was lost): cancelling settles it too.
        if removed or (
            await self.queue.missing([job_id]) and await answers_db.settle_answer(self.db, prompt["id"], assistant_id)
        ):
            self.waiting.pop(job_id, None)
            if removed:
                await self.settle(prompt["id"], assistant_id)
            return True
        return False

    def _on_cancel(self, head: dict[str, Any]) -> None:
        run = self.running.get(int(head["message_id"]))
        if run is not None:
            run.cancelled.set()

    async def regenerate(self, user_id: int, message_id: int) -> int:
        answer = await messages_db.message_by_id(self.db, message_id)
        if answer is None or await rooms_db.room_for_member(self.db, answer["room_id"], user_id) is None:
            raise errors.NotFound("message not found")
        if answer["role"] != "assistant" or answer["reply_to_id"] is None:
            raise errors.BadRequest("only an assistant answer can be regenerated")
        if answer["superseded_at"] is not None:
            raise errors.Conflict("this answer was already regenerated")
        by = (answer.get("data") or {}).get("answered_by") or {}  # the same assistant answers again
        room_id, prompt_id, assistant_id = answer["room_id"], answer["reply_to_id"], int(by.get("id") or 0)
        return await self.enqueue(room_id, prompt_id, user_id, supersede_id=message_id, assistant_id=assistant_id)

    # -- the worker side -------------------------------------------------------------

    async def _claim_loop(self) -> None:
        while True:
            if self.stopping:
                await asyncio.sleep(3600)  # draining: a supervised loop must not return
                continue
            if self.active >= self.settings.concurrency:
                self._slot_free.clear()
                await self._slot_free.wait()
                continue
            free = min(self.settings.concurrency - self.active, _CLAIM_BATCH)
            try:  # a burst of prompts is claimed in a few round trips, not one per job
                jobs = await self.queue.claim_many(self.settings.job_lease_s, self.settings.per_user_concurrency, free)
            except errors.Unavailable:
                jobs = []
                await asyncio.sleep(1)
            if not jobs or self.stopping:
                if jobs:
                    with contextlib.suppress(errors.Unavailable):  # give them straight back: the reaper requeues
                        await self.queue.renew([job.id for job in jobs], 0)
                self._wake.clear()
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), 0.25)  # other workers' jobs: poll
                continue
            for job in jobs:
                self.waiting.pop(job.id, None)
                self.active += 1
            self.tasks.spawn(self._start(jobs), "assistant-start")

    async def _start(self, jobs: list[Job]) -> None:
        """The inputs of a claim's jobs in one round trip, then one task per job."""
        claimed = time.monotonic()
        inputs: list[answers_db.AnswerInputs | None] = [None] * len(jobs)
        fresh: set[str] = set()
        try:
            keys = [
                (int(job.data["prompt_id"]), int(job.data["room_id"]), int(job.data.get("assistant_id") or 0))
                for job in jobs
            ]
            inputs = list(await answers_db.answer_inputs(self.db, keys, HISTORY))
            # Fresh jobs name their answer id in one round trip (a taker ends that stream if we die).
            # Not a taken-over or retried job: its orphan id must stay in it until that stream is ended.
            updates = [
                (job, {"answer_id": got.reserved_id})
                for job, got in zip(jobs, inputs, strict=True)
                if got is not None and not job.data.get("answer_id") and not job.data.get("pending")
            ]
            await self.queue.update_many(updates)
            fresh = {job.id for job, _ in updates}
        except Exception as exc:  # each job reads its own then, and handles the failure itself
            assistant_log.warning("answer_inputs_failed", extra=fields(jobs=len(jobs), error=repr(exc)[:200]))
        for job, got in zip(jobs, inputs, strict=True):
            self.tasks.spawn(self._run_job(job, got, job.id in fresh, claimed), f"assistant-job-{job.id}")

    async def _maintenance_loop(self) -> None:
        """Renew our leases, take over dead workers' jobs, tell waiting rooms their position."""
        interval_s = max(0.5, self.settings.job_lease_s / 3)
        last_renew = 0.0
        while True:
            await asyncio.sleep(0.5)
            try:
                now = time.monotonic()
                if now - last_renew >= interval_s:
                    await self.queue.renew([r.job.id for r in self.running.values()], self.settings.job_lease_s)
                    last_renew = now
                if await self.queue.reap():
                    self._wake.set()
                metrics.queue_depth.set(await self.queue.depth())
                await self._publish_positions()
            except errors.Unavailable:
                pass  # logged by the Redis adapter; the next round tries again

    async def _publish_positions(self) -> None:
        for job_id, (room_id, prompt_id, user_id, last) in list(self.waiting.items()):
            pos = await self.queue.position(job_id, user_id)
            if pos is None:
                self.waiting.pop(job_id, None)  # claimed (here or elsewhere) or cancelled
            elif pos != last:
                self.waiting[job_id] = (room_id, prompt_id, user_id, pos)
                frame = server_frames.queued(room_id=room_id, reply_to_message_id=prompt_id, position=pos)
                await self.hub.publish_room(room_id, frame)

    async def _run_job(
        self, job: Job, inputs: answers_db.AnswerInputs | None = None, recorded: bool = False, claimed: float = 0.0
    ) -> None:
        attempt = Attempt(job, inputs=inputs, recorded=recorded, claimed=claimed or time.monotonic())
        try:
            await self.generations.run(attempt)
        except errors.Unavailable as exc:  # Postgres or Redis away: end what members see, retry later
            assistant_log.warning("generation_deferred", extra=fields(job=job.id, error=exc.message))
            await self.generations.end_failed(attempt)
            await self._retry_later(attempt)
        except Exception as exc:
            assistant_log.error("generation_crashed", exc_info=exc, extra=fields(job=job.id))
            await self.generations.end_failed(attempt)
            with contextlib.suppress(Exception):
                await self.queue.ack(job)  # a poisoned job must not loop for ever
                await answers_db.settle_answer(  # nor come back by the sweeper
                    self.db, int(job.data["prompt_id"]), int(job.data.get("assistant_id") or 0)
                )
        finally:
            if attempt.run is not None:
                self.running.pop(attempt.run.message_id, None)
            self.active -= 1
            self._slot_free.set()
            self._wake.set()

    async def _retry_later(self, attempt: Attempt) -> None:
        """Hand the job back with a backoff (never acked): the reaper requeues it when its lease ends."""
        job = attempt.job
        tries = int(job.data.get("tries") or 0) + 1
        delay_s = min(self.settings.retry_max_backoff_s, 2.0 ** (tries - 1))
        update: dict[str, Any] = {"tries": tries}
        if attempt.ended or (attempt.run is None and attempt.recorded):
            update["answer_id"] = None  # its stream is ended, or never started: a retry has no orphan to end
        if attempt.pending is not None:
            update["pending"] = attempt.pending
        try:
            await self.queue.retry_later(job, delay_s, **update)
        except errors.Unavailable:
            pass  # Redis away too: the lease runs out by itself and the reaper requeues the job as it was
        assistant_log.info("generation_retry_scheduled", extra=fields(job=job.id, tries=tries, delay_s=delay_s))

    # -- catch-up for sockets joining mid-stream -----------------------------------------

    async def live_streams(self, room_id: int) -> list[tuple[int, int, list[dict[str, Any]]]]:
        """``(message_id, index, frames)`` to bring a joining socket up to date with running streams."""
        return await self.streams.live(room_id)

    async def attach(self, room_id: int, prompt_id: int) -> tuple[list[dict[str, Any]], int] | None:
        """Where the answer to ``prompt_id`` stands, for a retried SSE request: ``(frames, last chunk
        index)`` to catch up with (the running stream's text so far, or the stored answer with its
        ``stream_end``), or None while it is still queued or owed (its frames then come live)."""
        for _, index, frames in await self.live_streams(room_id):
            if frames[0]["reply_to_message_id"] == prompt_id:
                return frames, index
        stored = await answers_db.answer_for(self.db, prompt_id)
        if stored is None:
            return None
        model = stored.get("g_model") or ""
        frames = [
            server_frames.stream_start(
                room_id=room_id, message_id=stored["id"], reply_to_message_id=prompt_id, model=model
            )
        ]
        if stored["content"]:
            frames.append(
                server_frames.stream_chunk(room_id=room_id, message_id=stored["id"], index=0, content=stored["content"])
            )
        frames.append(server_frames.stream_end_from_row(stored))
        return frames, 0
