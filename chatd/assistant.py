"""The assistant: queued generations streamed into rooms.

Flow of one answer (``Assistant._run``):

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
job over, ends the orphaned stream with ``stop_reason: "error"`` and answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from dataclasses import dataclass, field
from typing import Any

from chatd import errors, metrics, protocol, store
from chatd.config import Settings
from chatd.context import Coalescer, build_context, recent_window
from chatd.fanout import Hub
from chatd.jobqueue import Job, JobQueue
from chatd.kv import KV
from chatd.logs import assistant_log, fields
from chatd.providers import Finished, GenerationRequest, Provider, ProviderError, TextDelta
from chatd.state import Tasks
from chatd.store import Database

# "@assistant" as a word: not inside an address like x@assistant.io
_MENTION = re.compile(r"(?<![\w.@])@assistant\b(?![.@]\w)", re.IGNORECASE)
_RETRY_BACKOFF_S = (0.2, 0.5, 1.0, 2.0)


def wants_answer(room: dict[str, Any], content: str) -> bool:
    """Assistant rooms answer every user message (mode "always"); mention mode needs @assistant."""
    settings = room.get("assistant") or {}
    mode = settings.get("mode", "always" if room.get("kind") == "assistant" else None)
    if mode == "always":
        return room.get("kind") == "assistant"
    if mode == "mention":
        return _MENTION.search(content) is not None
    return False


def answers_in(room: dict[str, Any]) -> bool:
    """Whether answers can stream in this room at all (a join checks for running ones only then)."""
    settings = room.get("assistant") or {}
    return room.get("kind") == "assistant" or settings.get("mode") == "mention"


@dataclass(eq=False)
class Run:
    """One generation running on this worker."""

    job: Job
    room_id: int
    prompt_id: int
    message_id: int
    requester_id: int | None
    model: str
    coalescer: Coalescer
    started: float = field(default_factory=time.monotonic)
    parts: list[str] = field(default_factory=list)
    first_token_ms: int | None = None
    finished: Finished | None = None
    cancelled: asyncio.Event = field(default_factory=asyncio.Event)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    flush_task: asyncio.Task[None] | None = None


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
        self.running: dict[int, Run] = {}  # by answer message id
        self.active = 0  # claimed jobs on this worker (a run registers under its message id a bit later)
        self.waiting: dict[str, tuple[int, int, int, int]] = {}  # job id -> (room, prompt, user, last position)
        self._wake = asyncio.Event()
        self._slot_free = asyncio.Event()
        self.stopping = False

    # -- lifecycle -----------------------------------------------------------------

    def start(self) -> None:
        self.hub.control_handlers["cancel"] = self._on_cancel
        self.tasks.supervise("assistant-claim", self._claim_loop)
        self.tasks.supervise("assistant-maintenance", self._maintenance_loop)

    @staticmethod
    def wants_answer(room: dict[str, Any], content: str) -> bool:
        return wants_answer(room, content)

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
        await self.provider.aclose()

    # -- enqueue ---------------------------------------------------------------------

    @staticmethod
    def job_id(prompt_id: int, supersede_id: int | None) -> str:
        return f"p{prompt_id}" if supersede_id is None else f"p{prompt_id}-r{supersede_id}"

    async def enqueue(self, room_id: int, prompt_id: int, requester_id: int, supersede_id: int | None = None) -> int:
        """Queue an answer to ``prompt_id``; the position, or ``busy`` / ``quota_exceeded``."""
        budget = self.settings.daily_token_budget
        if budget and await store.tokens_used_today(self.db, requester_id) >= budget:
            raise errors.QuotaExceeded(f"daily budget of {budget} tokens used up; it resets at 00:00 UTC")
        job = Job(
            self.job_id(prompt_id, supersede_id),
            requester_id,
            {"room_id": room_id, "prompt_id": prompt_id, "supersede_id": supersede_id},
        )
        depth = await self.queue.enqueue(job, self.settings.queue_max_depth)
        position = await self.queue.position(job.id, requester_id) if depth is not None else None
        if depth is None:
            raise errors.Busy("the assistant is busy, try again later")
        pos = position or 1
        self.waiting[job.id] = (room_id, prompt_id, requester_id, pos)
        await self.hub.publish_room(
            room_id, protocol.queued(room_id=room_id, reply_to_message_id=prompt_id, position=pos)
        )
        self._wake.set()
        return pos

    # -- control (cancel / regenerate) -----------------------------------------------

    async def control(self, user_id: int, is_admin: bool, frame: protocol.Cancel | protocol.Regenerate) -> None:
        if isinstance(frame, protocol.Regenerate):
            await self.regenerate(user_id, frame.message_id)
        else:
            await self.cancel(user_id, is_admin, frame.message_id)

    async def cancel(self, user_id: int, is_admin: bool, message_id: int) -> None:
        """Stop a streaming answer (its message id) or a queued one (its prompt's id)."""
        state = await self.kv.stream_state(message_id)
        if state:
            allowed = {int(state[b"requester"] or 0), int(state[b"owner"] or 0)}
            # Outside the room, a running answer looks like no answer at all (forbidden would reveal it).
            if not is_admin and await store.room_for_member(self.db, int(state[b"room"] or 0), user_id) is None:
                raise errors.NotFound("no such generation")
            if user_id not in allowed and not is_admin:
                raise errors.Forbidden("only the requester or the room owner may cancel")
            await self.hub.control("cancel", message_id=message_id)
            return
        prompt = await store.message_by_id(self.db, message_id)
        if prompt is not None and prompt["sender_id"] is not None:
            room = await store.room_for_member(self.db, prompt["room_id"], user_id)
            if room is not None and (user_id in (prompt["sender_id"], room["owner_id"]) or is_admin):
                if await self.queue.remove(self.job_id(message_id, None), prompt["sender_id"]):
                    self.waiting.pop(self.job_id(message_id, None), None)
                    return
        raise errors.NotFound("no such generation")

    def _on_cancel(self, head: dict[str, Any]) -> None:
        run = self.running.get(int(head["message_id"]))
        if run is not None:
            run.cancelled.set()

    async def regenerate(self, user_id: int, message_id: int) -> int:
        answer = await store.message_by_id(self.db, message_id)
        if answer is None or await store.room_for_member(self.db, answer["room_id"], user_id) is None:
            raise errors.NotFound("message not found")
        if answer["role"] != "assistant" or answer["reply_to_id"] is None:
            raise errors.BadRequest("only an assistant answer can be regenerated")
        if answer["superseded_at"] is not None:
            raise errors.Conflict("this answer was already regenerated")
        return await self.enqueue(answer["room_id"], answer["reply_to_id"], user_id, supersede_id=message_id)

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
            try:
                job = await self.queue.claim(self.settings.job_lease_s, self.settings.per_user_concurrency)
            except errors.Unavailable:
                job = None
                await asyncio.sleep(1)
            if job is None or self.stopping:
                if job is not None:
                    with contextlib.suppress(errors.Unavailable):
                        await self.queue.renew([job.id], 0)  # give it straight back: the reaper requeues it
                self._wake.clear()
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), 0.25)  # other workers' jobs: poll
                continue
            self.waiting.pop(job.id, None)
            self.active += 1
            self.tasks.spawn(self._run_job(job), f"assistant-job-{job.id}")

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
                frame = protocol.queued(room_id=room_id, reply_to_message_id=prompt_id, position=pos)
                await self.hub.publish_room(room_id, frame)

    async def _run_job(self, job: Job) -> None:
        try:
            await self._run(job)
        except Exception as exc:
            assistant_log.error("generation_crashed", exc_info=exc, extra=fields(job=job.id))
            run = next((r for r in self.running.values() if r.job.id == job.id), None)
            with contextlib.suppress(Exception):
                if run is not None:  # clients must not wait for an end that never comes
                    await self._end_orphan(run.room_id, run.message_id)
                await self.queue.ack(job)  # a poisoned job must not loop for ever
        finally:
            self.active -= 1
            self._slot_free.set()
            self._wake.set()

    async def _run(self, job: Job) -> None:
        data = job.data
        room_id, prompt_id = int(data["room_id"]), int(data["prompt_id"])
        supersede_id = data.get("supersede_id")
        if data.get("answer_id"):
            await self._end_orphan(room_id, int(data["answer_id"]))  # taken over from a dead worker
        pg = self.db
        prompt = await store.message_by_id(pg, prompt_id)
        room = await store.room_by_id(pg, room_id)
        if prompt is None or room is None or prompt["deleted_at"] is not None:
            await self.queue.ack(job)
            return
        if supersede_id is None and await store.answer_for(pg, prompt_id) is not None:
            await self.queue.ack(job)  # answered already (by the worker we took over from)
            return
        cfg = room["assistant"] or {}
        # The offline provider says so wherever a model name shows.
        model = "offline" if self.provider.name == "offline" else (cfg.get("model") or self.settings.model)
        history = await store.recent_messages(pg, room_id, prompt["seq"], 200)
        history = [h for h in history if h["id"] != supersede_id]
        retrieved: list[dict[str, Any]] = []
        window = recent_window(history, self.settings.context_budget_tokens)
        if self.retriever is not None and self.settings.retrieval_top_k and window[0]["seq"] > 1:
            try:  # relevant messages older than what the recent window already carries
                retrieved = await self.retriever.relevant(
                    room_id, prompt["content"], window[0]["seq"], self.settings.retrieval_top_k
                )
            except Exception as exc:  # retrieval is an improvement, never a reason to fail
                assistant_log.warning("retrieval_failed", extra=fields(error=str(exc)[:200]))
        ctx = build_context(
            cfg.get("system_prompt") or self.settings.system_prompt,
            history,
            retrieved,
            self.settings.context_budget_tokens,
        )
        request = GenerationRequest(
            model, ctx.system, ctx.messages, self.settings.max_tokens, self.settings.temperature
        )
        assistant_log.debug(
            "assistant_request",
            extra=fields(
                room_id=room_id,
                prompt_id=prompt_id,
                model=model,
                retrieved_ids=list(ctx.retrieved_ids),
                recent_ids=list(ctx.recent_ids),
                system=ctx.system,
                estimated_tokens=ctx.estimated_tokens,
            ),
        )
        message_id = await store.reserve_message_id(pg)
        await self.queue.update(job, answer_id=message_id)
        local = self.hub.rooms.get(room_id)
        run = Run(
            job,
            room_id,
            prompt_id,
            message_id,
            prompt["sender_id"],
            model,
            Coalescer(self.settings.chunk_interval_ms / 1000, local.sockets if local else 1),
        )
        self.running[message_id] = run
        assistant_log.info(
            "generation_started", extra=fields(message_id=message_id, room_id=room_id, prompt_id=prompt_id, job=job.id)
        )
        try:
            await self._stream(run, request, room["owner_id"], ctx.retrieved_ids, supersede_id)
        finally:
            self.running.pop(message_id, None)

    async def _stream(
        self, run: Run, request: GenerationRequest, owner_id: int, retrieved: tuple[int, ...], supersede_id: Any
    ) -> None:
        await self.kv.stream_begin(
            run.message_id,
            run.room_id,
            {
                "room": run.room_id,
                "reply_to": run.prompt_id,
                "model": run.model,
                "requester": run.requester_id or 0,
                "owner": owner_id,
                "index": -1,
            },
            3600,
        )
        start = protocol.stream_start(
            room_id=run.room_id, message_id=run.message_id, reply_to_message_id=run.prompt_id, model=run.model
        )
        await self.hub.publish_room(run.room_id, start, stream=(run.message_id, -1))

        stop_reason = "end_turn"
        generation = asyncio.ensure_future(self._generate(run, request))
        cancel_wait = asyncio.ensure_future(run.cancelled.wait())
        try:
            done, _ = await asyncio.wait({generation, cancel_wait}, return_when=asyncio.FIRST_COMPLETED)
            if generation not in done:
                generation.cancel()
                with contextlib.suppress(asyncio.CancelledError, ProviderError):
                    await generation
                stop_reason = "cancelled"
            else:
                generation.result()
                stop_reason = run.finished.stop_reason if run.finished else "end_turn"
        except ProviderError as exc:
            stop_reason = "error"
            assistant_log.warning(
                "provider_failed", extra=fields(message_id=run.message_id, error=str(exc)[:300], status=exc.status)
            )
            if run.requester_id is not None:
                err = errors.LLMUnavailable(f"the assistant could not answer: {exc}"[:300])
                await self.hub.publish_user(run.requester_id, protocol.error(err, reply_to=None))
        finally:
            cancel_wait.cancel()
        await self._finish(run, stop_reason, retrieved, supersede_id)

    async def _generate(self, run: Run, request: GenerationRequest) -> None:
        for attempt in range(self.settings.provider_retries + 1):
            try:
                async for event in self.provider.stream(request):
                    if isinstance(event, TextDelta):
                        if run.first_token_ms is None:
                            run.first_token_ms = int((time.monotonic() - run.started) * 1000)
                        run.parts.append(event.text)
                        await self._add(run, event.text)
                    else:
                        run.finished = event
                return
            except ProviderError as exc:
                if run.parts or not exc.retryable or attempt >= self.settings.provider_retries:
                    raise
                backoff_s = _RETRY_BACKOFF_S[min(attempt, len(_RETRY_BACKOFF_S) - 1)]
                assistant_log.info(
                    "provider_retry", extra=fields(message_id=run.message_id, attempt=attempt + 1, error=str(exc)[:200])
                )
                await asyncio.sleep(backoff_s)

    async def _add(self, run: Run, text: str) -> None:
        async with run.lock:
            chunk = run.coalescer.add(text, time.monotonic())
            if chunk is not None:
                await self._emit(run, chunk, run.coalescer.index - 1)
                return
        if run.flush_task is None or run.flush_task.done():
            run.flush_task = asyncio.ensure_future(self._flush_later(run))

    async def _flush_later(self, run: Run) -> None:
        delay = run.coalescer.due_in(time.monotonic())
        if delay is None:
            return
        await asyncio.sleep(delay)
        async with run.lock:
            chunk = run.coalescer.flush(time.monotonic())
            if chunk is not None:
                await self._emit(run, chunk, run.coalescer.index - 1)

    async def _emit(self, run: Run, content: str, index: int) -> None:
        # The catch-up state holds exactly chunks 0..index (MULTI: text and index move together).
        with contextlib.suppress(errors.Unavailable):  # only the catch-up of late joiners misses this chunk
            await self.kv.stream_append(run.message_id, content, index)
        frame = protocol.stream_chunk(room_id=run.room_id, message_id=run.message_id, index=index, content=content)
        await self.hub.publish_room(run.room_id, frame, stream=(run.message_id, index))

    async def _finish(self, run: Run, stop_reason: str, retrieved: tuple[int, ...], supersede_id: Any) -> None:
        if run.flush_task is not None:
            run.flush_task.cancel()
        async with run.lock:
            rest = run.coalescer.flush(time.monotonic())
            if rest is not None:
                await self._emit(run, rest, run.coalescer.index - 1)
        text = "".join(run.parts)
        latency_ms = int((time.monotonic() - run.started) * 1000)
        usage = store.Usage(
            provider=self.provider.name,
            model=run.model,
            stop_reason=stop_reason,
            input_tokens=run.finished.input_tokens if run.finished else 0,
            output_tokens=run.finished.output_tokens if run.finished else len(run.parts),
            first_token_ms=run.first_token_ms,
            latency_ms=latency_ms,
            retrieved_ids=retrieved,
        )
        status = {"cancelled": "cancelled", "error": "error"}.get(stop_reason, "final")
        row = await store.persist_answer(
            self.db,
            message_id=run.message_id,
            room_id=run.room_id,
            prompt_id=run.prompt_id,
            requester_id=run.requester_id,
            content=text,
            status=status,
            supersede_id=int(supersede_id) if supersede_id else None,
            usage=usage,
        )
        seq = 0
        if row is not None:
            seq = int(row["seq"])
            await self.hub.publish_messages([(run.room_id, seq, protocol.encode_bytes(protocol.message_from_row(row)))])
        end = protocol.stream_end(
            room_id=run.room_id,
            message_id=run.message_id,
            seq=seq,
            stop_reason=stop_reason,  # type: ignore[arg-type]
            input_tokens=usage.input_tokens,
            output_tokens=usage.output_tokens,
            first_token_ms=run.first_token_ms,
            latency_ms=latency_ms,
        )
        await self.hub.publish_room(run.room_id, end)
        await self._clear_stream(run.room_id, run.message_id)
        await self.queue.ack(run.job)
        metrics.generations.labels(stop_reason).inc()
        metrics.count_tokens(run.model, usage.input_tokens, usage.output_tokens)
        if run.first_token_ms is not None:
            metrics.first_token.observe(run.first_token_ms / 1000)
        assistant_log.info(
            "generation_done",
            extra=fields(
                message_id=run.message_id,
                room_id=run.room_id,
                stop_reason=stop_reason,
                first_token_ms=run.first_token_ms,
                latency_ms=latency_ms,
                output_tokens=usage.output_tokens,
            ),
        )

    async def _clear_stream(self, room_id: int, message_id: int) -> None:
        with contextlib.suppress(errors.Unavailable):
            await self.kv.stream_clear(room_id, message_id)

    async def _end_orphan(self, room_id: int, message_id: int) -> None:
        """The worker we took this job from died mid-stream: end its stream for the clients."""
        assistant_log.warning("generation_taken_over", extra=fields(room_id=room_id, orphan_message_id=message_id))
        end = protocol.stream_end(
            room_id=room_id,
            message_id=message_id,
            seq=0,
            stop_reason="error",
            input_tokens=0,
            output_tokens=0,
            first_token_ms=None,
            latency_ms=0,
        )
        await self.hub.publish_room(room_id, end)
        await self._clear_stream(room_id, message_id)

    # -- catch-up for sockets joining mid-stream -----------------------------------------

    async def live_streams(self, room_id: int) -> list[tuple[int, int, list[dict[str, Any]]]]:
        """``(message_id, index, frames)`` to bring a joining socket up to date with running streams."""
        out: list[tuple[int, int, list[dict[str, Any]]]] = []
        try:
            streams = await self.kv.room_streams(room_id)
        except errors.Unavailable:
            return out  # a late joiner misses the text so far; the final message comes anyway
        for mid, st, text in streams:
            index = int(st[b"index"])
            frames = [
                protocol.stream_start(
                    room_id=room_id,
                    message_id=mid,
                    reply_to_message_id=int(st[b"reply_to"]),
                    model=st[b"model"].decode(),
                )
            ]
            if index >= 0:
                frames.append(
                    protocol.stream_chunk(room_id=room_id, message_id=mid, index=index, content=text.decode())
                )
            out.append((mid, index, frames))
        return out
