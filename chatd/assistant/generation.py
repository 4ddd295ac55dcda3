"""One generation: context → provider → coalesced chunks → the stored answer → ``stream_end``.

``Assistant`` (``answers``) queues, claims and retries jobs; each claimed job becomes an ``Attempt``
that ``Generations.run`` carries as far as it gets:

1. the job's inputs (prompt, room, history; read with the other jobs of its claim) decide whether
   there is anything to do: a deleted prompt or a stored answer acks the job; a dead worker's
   orphaned stream is ended first (``stream_end`` ``error``), and a retried job whose answer was
   generated but not written writes it without generating again;
2. the context (recent messages within a token budget + older relevant ones from the retriever),
   then ``stream_start`` and the provider's deltas, coalesced into ``stream_chunk`` frames
   (``StreamRelay``); provider failures are retried only before the first token;
3. the answer is written with the room's next seq (retried for ``assistant.persist_retry_s``), the
   ``message`` frame and ``stream_end`` go out, and the job is acked.

``running`` (by answer message id) is what a ``cancel`` stops and what the lease renewal keeps.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from chatd.assistant.context import Coalescer, build_context, recent_window
from chatd.assistant.providers import (
    Finished,
    GenerationRequest,
    Provider,
    ProviderError,
    StreamEvent,
    TextDelta,
    make_provider,
)
from chatd.assistant.streams import StreamRelay
from chatd.core import errors, server_frames
from chatd.process import metrics
from chatd.process.config import AssistantSettings
from chatd.process.logs import assistant_log, fields
from chatd.realtime.fanout import Hub
from chatd.storage import answers as answers_db
from chatd.storage.db import Database
from chatd.storage.jobqueue import Job, JobQueue

_RETRY_BACKOFF_S = (0.2, 0.5, 1.0, 2.0)
HISTORY = 200  # newest messages read for a prompt's context (the budget picks from them)


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
    flush_timer: asyncio.TimerHandle | None = None  # buffered text goes out when due
    supersedes: int | None = None  # the orphaned stream of a takeover, which this attempt replaces
    provider: Provider | None = None  # None: the server's default provider
    answered_by: dict[str, Any] | None = None  # a room assistant: {id, name, model}; None: the default one


@dataclass(eq=False)
class Attempt:
    """One claim of a job, as far as it got: what the failure handling of ``_run_job`` must undo."""

    job: Job
    run: Run | None = None
    ended: bool = False  # this attempt's stream_end went out
    pending: dict[str, Any] | None = None  # a finished answer whose write failed: kept for the retry
    claimed: float = field(default_factory=time.monotonic)
    inputs: answers_db.AnswerInputs | None = None  # fetched with the other jobs of its claim
    recorded: bool = False  # the job names inputs.reserved_id as its answer id already (for a takeover)


async def _persist_answer(db: Database, answer: dict[str, Any]) -> dict[str, Any] | None:
    usage = answer["usage"]
    return await answers_db.persist_answer(
        db,
        message_id=answer["message_id"],
        room_id=answer["room_id"],
        prompt_id=answer["prompt_id"],
        requester_id=answer["requester_id"],
        content=answer["content"],
        status=answer["status"],
        supersede_id=answer["supersede_id"],
        usage=answers_db.Usage(
            provider=usage["provider"],
            model=usage["model"],
            stop_reason=usage["stop_reason"],
            input_tokens=usage["input_tokens"],
            output_tokens=usage["output_tokens"],
            first_token_ms=usage["first_token_ms"],
            latency_ms=usage["latency_ms"],
            retrieved_ids=tuple(usage["retrieved_ids"]),
            assistant_id=int(usage.get("assistant_id") or 0),
        ),
        data=answer.get("data"),
    )


class _Unconfigured:
    """A room assistant whose provider this server cannot reach (no key or URL configured): each answer
    fails at once, not retried, and says so in the room; the other assistants are not affected."""

    def __init__(self, name: str, reason: str) -> None:
        self.name = name
        self.reason = reason

    async def stream(self, request: GenerationRequest) -> AsyncIterator[StreamEvent]:
        raise ProviderError(f"{self.name}: not configured: {self.reason}", retryable=False)
        yield  # pragma: no cover  # an async generator, like the real providers

    async def aclose(self) -> None:
        pass


def relabel_history(history: list[dict[str, Any]], me: int) -> list[dict[str, Any]]:
    """The room's history as assistant ``me`` (0: the default one) should read it: its own answers are its
    turns; another assistant's answers are what someone else said, so they become user turns naming it
    (a model must not take them for its own words)."""
    out = []
    for row in history:
        by = (row.get("data") or {}).get("answered_by") if row["role"] == "assistant" else None
        author = int(by["id"]) if by else 0
        if row["role"] == "assistant" and author != me:
            name = f"@{by['name']}" if by else "the default assistant"
            row = row | {"role": "user", "content": f"[{name} answered:] {row['content']}"}
        out.append(row)
    return out


class Generations:
    """The answers generated on this worker."""

    def __init__(
        self,
        db: Database,
        hub: Hub,
        provider: Provider,
        retriever: Any | None,
        settings: AssistantSettings,
        queue: JobQueue,
        streams: StreamRelay,
    ) -> None:
        self.db = db
        self.hub = hub
        self.provider = provider
        self.retriever = retriever
        self.settings = settings
        self.queue = queue
        self.streams = streams
        self.running: dict[int, Run] = {}  # by answer message id
        # One client per provider kind, made when a room assistant first needs it (the SDKs cost imports).
        self.providers: dict[str, Provider] = {provider.name: provider}

    def provider_for(self, kind: str) -> Provider:
        provider = self.providers.get(kind)
        if provider is None:
            try:
                provider = make_provider(dataclasses.replace(self.settings, provider=kind))
            except errors.ConfigError as exc:
                provider = _Unconfigured(kind, str(exc))
            self.providers[kind] = provider
        return provider

    async def aclose(self) -> None:
        for provider in self.providers.values():
            await provider.aclose()

    async def run(self, attempt: Attempt) -> None:
        job = attempt.job
        data = job.data
        room_id, prompt_id = int(data["room_id"]), int(data["prompt_id"])
        supersede_id = data.get("supersede_id")
        orphan = int(data["answer_id"]) if data.get("answer_id") else None  # a dead worker's stream
        assistant_id = int(data.get("assistant_id") or 0)
        pg = self.db
        inputs = (
            attempt.inputs or (await answers_db.answer_inputs(pg, [(prompt_id, room_id, assistant_id)], HISTORY))[0]
        )
        prompt, room, named = inputs.prompt, inputs.room, inputs.assistant
        if prompt is None or room is None or prompt["deleted_at"] is not None or (assistant_id and named is None):
            if orphan is not None:
                await self._end_orphan(room_id, orphan)
            await answers_db.settle_answer(pg, prompt_id, assistant_id)
            await self.queue.ack(job)
            return
        if supersede_id is None:
            stored = inputs.answer
            if stored is not None:  # answered already: a worker died after storing it, or a duplicate job
                if orphan is not None and orphan != stored["id"]:
                    await self._end_orphan(room_id, orphan)
                await self.queue.ack(job)
                return
        if data.get("pending"):
            await self._persist_pending(attempt, data["pending"])
            return
        if orphan is not None:
            await self._end_orphan(room_id, orphan)  # taken over from a dead worker
        cfg = room["assistant"] or {}
        provider = self.provider
        answered_by: dict[str, Any] | None = None
        if named is not None:  # a room assistant: its own provider, model and system prompt
            provider = self.provider_for(named["provider"])
            cfg = {"model": named["model"], "system_prompt": named["system_prompt"]}
        # The offline provider says so wherever a model name shows.
        model = "offline" if provider.name == "offline" else (cfg.get("model") or self.settings.model)
        if named is not None:
            answered_by = {"id": assistant_id, "name": named["name"], "model": model}
        history = relabel_history([h for h in inputs.history if h["id"] != supersede_id], assistant_id)
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
        message_id = inputs.reserved_id
        if not attempt.recorded:
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
            supersedes=orphan,
            provider=provider,
            answered_by=answered_by,
        )
        attempt.run = run
        self.running[message_id] = run
        setup_ms = (time.monotonic() - attempt.claimed) * 1000
        assistant_log.info(
            "generation_started",
            extra=fields(
                message_id=message_id,
                room_id=room_id,
                prompt_id=prompt_id,
                job=job.id,
                # where a slow first token comes from: waiting for a claim, or the setup after it
                queued_ms=round((time.time() - prompt["created_at"].timestamp()) * 1000 - setup_ms),
                setup_ms=round(setup_ms),
            ),
        )
        await self._stream(attempt, request, room["owner_id"], ctx.retrieved_ids, supersede_id)

    async def _stream(
        self,
        attempt: Attempt,
        request: GenerationRequest,
        owner_id: int,
        retrieved: tuple[int, ...],
        supersede_id: Any,
    ) -> None:
        run = attempt.run
        assert run is not None
        state = {
            "room": run.room_id,
            "reply_to": run.prompt_id,
            "model": run.model,
            "requester": run.requester_id or 0,
            "owner": owner_id,
            "index": -1,
        }
        if run.answered_by is not None:  # late joiners' catch-up names it too (StreamRelay.live)
            state |= {"assistant_id": run.answered_by["id"], "assistant_name": run.answered_by["name"]}
        start = server_frames.stream_start(
            room_id=run.room_id,
            message_id=run.message_id,
            reply_to_message_id=run.prompt_id,
            model=run.model,
            supersedes=run.supersedes,
            answered_by=run.answered_by,
        )
        self.streams.start(run.room_id, run.message_id, start, state)

        stop_reason = "end_turn"
        failure: dict[str, Any] | None = None
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
            # The provider's own words stay in the log: they can name keys, hosts, quotas or models.
            assistant_log.warning(
                "provider_failed", extra=fields(message_id=run.message_id, error=str(exc)[:300], status=exc.status)
            )
            if run.answered_by is not None:  # a room assistant's failure is told in the room, by name
                who = f"@{run.answered_by['name']}"
                failure = errors.LLMUnavailable(f"{who} could not answer this time; try again later").to_dict()
            if run.requester_id is not None:
                err = errors.LLMUnavailable("the assistant could not answer this time; try again later")
                await self.hub.publish_user(run.requester_id, server_frames.error(err, reply_to=None))
        finally:
            cancel_wait.cancel()
            if not generation.done():  # cancelled from outside (shutdown): the provider call stops too
                generation.cancel()
        await self._finish(attempt, stop_reason, retrieved, supersede_id, failure)

    async def _generate(self, run: Run, request: GenerationRequest) -> None:
        for attempt in range(self.settings.provider_retries + 1):
            try:
                async for event in (run.provider or self.provider).stream(request):
                    if isinstance(event, TextDelta):
                        if run.first_token_ms is None:
                            run.first_token_ms = int((time.monotonic() - run.started) * 1000)
                        run.parts.append(event.text)
                        self._add(run, event.text)
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

    def _add(self, run: Run, text: str) -> None:
        """Synchronous, like everything from a token to its local delivery: no lock, no task per token."""
        chunk = run.coalescer.add(text, time.monotonic())
        if chunk is not None:
            self._emit(run, chunk, run.coalescer.index - 1)
            return
        if run.flush_timer is None:
            delay = run.coalescer.due_in(time.monotonic())
            if delay is not None:
                run.flush_timer = asyncio.get_running_loop().call_later(delay, self._flush_due, run)

    def _flush_due(self, run: Run) -> None:
        run.flush_timer = None
        chunk = run.coalescer.flush(time.monotonic())
        if chunk is not None:
            self._emit(run, chunk, run.coalescer.index - 1)

    def _emit(self, run: Run, content: str, index: int) -> None:
        self.streams.chunk(run.room_id, run.message_id, index, content)

    async def _finish(
        self,
        attempt: Attempt,
        stop_reason: str,
        retrieved: tuple[int, ...],
        supersede_id: Any,
        failure: dict[str, Any] | None = None,
    ) -> None:
        run = attempt.run
        assert run is not None
        if run.flush_timer is not None:
            run.flush_timer.cancel()
            run.flush_timer = None
        rest = run.coalescer.flush(time.monotonic())
        if rest is not None:
            self._emit(run, rest, run.coalescer.index - 1)
        await self.streams.idle()  # elsewhere too, the chunks come before the message and stream_end
        latency_ms = int((time.monotonic() - run.started) * 1000)
        usage: dict[str, Any] = {
            "provider": (run.provider or self.provider).name,
            "model": run.model,
            "stop_reason": stop_reason,
            "input_tokens": run.finished.input_tokens if run.finished else 0,
            "output_tokens": run.finished.output_tokens if run.finished else len(run.parts),
            "first_token_ms": run.first_token_ms,
            "latency_ms": latency_ms,
            "retrieved_ids": list(retrieved),
            "assistant_id": run.answered_by["id"] if run.answered_by else 0,
        }
        answer: dict[str, Any] = {  # JSON: kept in the job when the write fails
            "message_id": run.message_id,
            "room_id": run.room_id,
            "prompt_id": run.prompt_id,
            "requester_id": run.requester_id,
            "content": "".join(run.parts),
            "status": {"cancelled": "cancelled", "error": "error"}.get(stop_reason, "final"),
            "supersede_id": int(supersede_id) if supersede_id else None,
            "usage": usage,
        }
        if run.answered_by is not None:  # who answered, kept with the message (history, replay, REST)
            answer["data"] = {"answered_by": run.answered_by} | ({"error": failure} if failure else {})
        row = await self._persist(attempt, answer)
        seq = 0
        if row is not None:
            seq = int(row["seq"])
            self.hub.publish_messages(
                [(run.room_id, seq, server_frames.encode_bytes(server_frames.message_from_row(row)))]
            )
        end = server_frames.stream_end(
            room_id=run.room_id,
            message_id=run.message_id,
            seq=seq,
            stop_reason=stop_reason,  # type: ignore[arg-type]
            input_tokens=usage["input_tokens"],
            output_tokens=usage["output_tokens"],
            first_token_ms=run.first_token_ms,
            latency_ms=latency_ms,
            error=failure,
        )
        attempt.ended = True
        await self.hub.publish_room(run.room_id, end)
        await self.streams.clear(run.room_id, run.message_id)
        # Stored: if Redis cannot take the ack now, the lease runs out and the retry finds the answer.
        with contextlib.suppress(errors.Unavailable):
            await self.queue.ack(run.job)
        metrics.generations.labels(stop_reason).inc()
        metrics.count_tokens(run.model, usage["input_tokens"], usage["output_tokens"])
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
                output_tokens=usage["output_tokens"],
            ),
        )

    async def _persist(self, attempt: Attempt, answer: dict[str, Any]) -> dict[str, Any] | None:
        """Write the answer, retried for ``persist_retry_s`` while Postgres is away; then ``Unavailable``
        with the answer kept in ``attempt.pending`` (the job's retry writes it)."""
        deadline = time.monotonic() + self.settings.persist_retry_s
        delay_s = 0.25
        while True:
            try:
                return await _persist_answer(self.db, answer)
            except errors.Unavailable:
                if time.monotonic() + delay_s > deadline:
                    attempt.pending = answer
                    raise
                assistant_log.info("persist_retry", extra=fields(message_id=answer["message_id"]))
                await asyncio.sleep(delay_s)
                delay_s = min(2.0, delay_s * 2)

    async def _persist_pending(self, attempt: Attempt, answer: dict[str, Any]) -> None:
        """A retried job whose answer was generated but not written: write it now, no new generation.

        Its stream already ended (``error``, seq 0); the stored ``message`` now follows."""
        attempt.pending = answer
        row = await _persist_answer(self.db, answer)
        if row is not None:
            frame = server_frames.encode_bytes(server_frames.message_from_row(row))
            self.hub.publish_messages([(int(row["room_id"]), int(row["seq"]), frame)])
        assistant_log.info("generation_persisted_late", extra=fields(message_id=answer["message_id"]))
        with contextlib.suppress(errors.Unavailable):
            await self.queue.ack(attempt.job)

    async def _end_orphan(self, room_id: int, message_id: int) -> None:
        """The worker we took this job from died mid-stream: end its stream for the clients."""
        assistant_log.warning("generation_taken_over", extra=fields(room_id=room_id, orphan_message_id=message_id))
        end = server_frames.stream_end(
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
        await self.streams.clear(room_id, message_id)

    async def end_failed(self, attempt: Attempt) -> None:
        """Members saw a stream_start: they get its stream_end (``error``, seq 0: nothing stored)."""
        run = attempt.run
        if run is None or attempt.ended:
            return
        attempt.ended = True
        if run.flush_timer is not None:
            run.flush_timer.cancel()
            run.flush_timer = None
        end = server_frames.stream_end(
            room_id=run.room_id,
            message_id=run.message_id,
            seq=0,
            stop_reason="error",
            input_tokens=0,
            output_tokens=len(run.parts),
            first_token_ms=run.first_token_ms,
            latency_ms=int((time.monotonic() - run.started) * 1000),
        )
        with contextlib.suppress(Exception):  # local sockets get it even without Redis
            await self.streams.idle()
            await self.hub.publish_room(run.room_id, end)
        await self.streams.clear(run.room_id, run.message_id)
        metrics.generations.labels("error").inc()
