"""Postgres access under every SQL module: the pool, the deadline, the error policy.

The SQL of chatd lives in one module per aggregate (``users``, ``rooms``,
``messages``, ``answers``, ``retrieval``, ``search``, ``files``, ``admin``);
each function takes the worker's ``Database`` (a psycopg pool with a deadline)
and returns plain dicts (rows) or raises ``ChatdError``s, through the helpers
here.  One error policy: a Postgres that does not answer (down, restarting,
paused, pool exhausted) becomes ``Unavailable``, so a handler answers
``unavailable`` instead of hanging or leaking a driver error.  Every call has
a deadline (``storage.pg_query_timeout_s``), enforced on both sides: the
server's ``statement_timeout``, and the client (``bounded``), which runs the
call in a task of its own and abandons it on expiry: psycopg's own clean-up of
a cancelled query can wait up to 10 s on a server that does not answer, and
the caller must not.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import functools
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from typing import Any, ParamSpec, TypeVar, cast

import psycopg
from psycopg import AsyncConnection, sql
from psycopg.rows import DictRow, dict_row
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from chatd.core import errors, server_frames
from chatd.process import metrics
from chatd.process.config import StorageSettings
from chatd.process.logs import app_log, fields

Row = dict[str, Any]
P = ParamSpec("P")
R = TypeVar("R")


class Database(AsyncConnectionPool):
    """The worker's connection pool, and the deadline of every call made through it."""

    query_timeout_s: float = 5.0
    identity: str | None = None  # the cluster's system identifier, read once (messages.join_reads)


async def open_database(storage: StorageSettings, name: str) -> Database:
    """Opened without waiting: a worker starts and serves (readiness 503) while Postgres is down."""
    timeout_ms = int(storage.pg_query_timeout_s * 1000)
    db = Database(
        storage.database_url,
        min_size=storage.pg_pool_min,
        max_size=storage.pg_pool_max,
        timeout=min(storage.pg_timeout_s, storage.pg_query_timeout_s),
        kwargs={"autocommit": True, "row_factory": dict_row, "options": f"-c statement_timeout={timeout_ms}"},
        # No per-checkout check (a round trip on every query): connection() sweeps the pool with
        # pool.check() when a connection turns out broken, e.g. after a Postgres restart.
        open=False,
        name=name,
    )
    db.query_timeout_s = storage.pg_query_timeout_s
    await db.open(wait=False)
    return db


_abandoned: set[asyncio.Task[Any]] = set()  # calls past their deadline, left to clean up


def bounded(fn: Callable[P, Awaitable[R]]) -> Callable[P, Awaitable[R]]:
    """Give a store call its deadline: ``Unavailable`` when Postgres does not answer in time."""

    @functools.wraps(fn)
    async def call(*args: P.args, **kwargs: P.kwargs) -> R:
        db = args[0]
        timeout_s = db.query_timeout_s if isinstance(db, Database) else None
        task = asyncio.ensure_future(fn(*args, **kwargs))
        try:
            done, _ = await asyncio.wait((task,), timeout=timeout_s)
        except asyncio.CancelledError:
            task.cancel()
            raise
        if not done:
            task.cancel()
            _abandoned.add(task)
            task.add_done_callback(_forget)
            app_log.warning("postgres_timeout", extra=fields(call=fn.__name__, timeout_s=timeout_s))
            metrics.pg_errors.labels("deadline").inc()
            raise errors.Unavailable("database did not answer in time, try again")
        return task.result()

    return call


def _forget(task: asyncio.Task[Any]) -> None:
    _abandoned.discard(task)
    if not task.cancelled():
        task.exception()  # retrieved: the caller got 'unavailable' already


@contextlib.asynccontextmanager
async def connection(pool: Database) -> AsyncIterator[AsyncConnection[DictRow]]:
    """A pooled connection; driver failures become ``Unavailable``."""
    try:
        async with pool.connection() as conn:
            yield cast(AsyncConnection[DictRow], conn)  # the pool is built with row_factory=dict_row
    except psycopg.errors.QueryCanceled:
        app_log.warning("postgres_statement_timeout")
        metrics.pg_errors.labels("statement_timeout").inc()
        raise errors.Unavailable("database did not answer in time, try again") from None
    except (PoolTimeout, psycopg.OperationalError, psycopg.InterfaceError) as exc:
        app_log.warning("postgres_unavailable", extra=fields(error=str(exc)[:300]))
        metrics.pg_errors.labels("pool_timeout" if isinstance(exc, PoolTimeout) else "connection").inc()
        if not isinstance(exc, PoolTimeout):
            await _sweep(pool)
        raise errors.Unavailable("database unavailable, try again") from None


async def _sweep(pool: Database) -> None:
    """One connection broke (Postgres restarted?): drop every broken idle one, not one per request."""
    try:
        await pool.check()
    except Exception as exc:  # the sweep is best effort; the pool reconnects on its own
        app_log.debug("pool_check_failed", extra=fields(error=str(exc)[:200]))


@contextlib.asynccontextmanager
async def transaction(pool: Database) -> AsyncIterator[AsyncConnection[DictRow]]:
    async with connection(pool) as conn:
        try:
            async with conn.transaction():
                yield conn
        except psycopg.errors.QueryCanceled:
            raise
        except (psycopg.OperationalError, psycopg.InterfaceError) as exc:
            app_log.warning("postgres_unavailable", extra=fields(error=str(exc)[:300]))
            metrics.pg_errors.labels("connection").inc()
            await _sweep(pool)
            raise errors.Unavailable("database unavailable, try again") from None


async def fetch_one(pool: Database, query: str, params: Sequence[Any] | Mapping[str, Any] = ()) -> Row | None:
    async with connection(pool) as conn:
        cur = await conn.execute(query, params)  # type: ignore[arg-type]
        return await cur.fetchone()


async def fetch_all(pool: Database, query: str, params: Sequence[Any] = ()) -> list[Row]:
    async with connection(pool) as conn:
        cur = await conn.execute(query, params)  # type: ignore[arg-type]
        return await cur.fetchall()


async def probe(pool: Database, timeout_s: float) -> None:
    """The readiness check: a pooled connection answers ``SELECT 1`` (the caller bounds the wait)."""
    try:
        async with pool.connection(timeout=timeout_s) as conn:
            await conn.execute("SELECT 1")
    except Exception:
        await pool.check()  # drop connections a Postgres restart broke, so the next probe is honest
        raise


@bounded
async def ping(pool: Database) -> None:
    await fetch_one(pool, "SELECT 1")


def vector_sql(template: str, schema_name: str) -> sql.Composed:
    schema = sql.Identifier(schema_name)
    return sql.SQL(template).format(schema=schema, vector=sql.SQL("{}.vector").format(schema))


def iso(value: dt.datetime | None) -> str | None:
    return server_frames.iso(value)
