"""The assistant's persistence in Postgres: answers, generations, usage, answers owed.

What a claimed job reads before it streams (``answer_inputs``: one pipelined
round trip for a whole claim), the answer written with its generation and
usage in one transaction (``persist_answer``), the ``answers_owed`` outbox
that keeps an acked prompt from being forgotten, and the day's token count
behind the budget.  Apart from ``messages``: only the assistant
(``chatd.assistant.answers``) writes answers, and these tables are its own.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from psycopg.types.json import Jsonb

from chatd.storage.assistants import ASSISTANT_COLUMNS
from chatd.storage.db import Database, Row, bounded, connection, fetch_all, fetch_one, transaction
from chatd.storage.messages import MESSAGE_COLUMNS
from chatd.storage.rooms import ROOM_COLUMNS

_ANSWER_SQL = (
    f"SELECT {', '.join('m.' + c.strip() for c in MESSAGE_COLUMNS.split(','))},"
    " g.stop_reason AS g_stop_reason, g.input_tokens AS g_input_tokens, g.output_tokens AS g_output_tokens,"
    " g.first_token_ms AS g_first_token_ms, g.latency_ms AS g_latency_ms, g.model AS g_model,"
    " coalesce(m.assistant_id, 0) AS a_id"
    " FROM messages m LEFT JOIN generations g ON g.answer_message_id = m.id"
    " WHERE m.reply_to_id = %s AND m.role = 'assistant' AND m.superseded_at IS NULL"
)


@bounded
async def answer_for(pool: Database, prompt_id: int) -> Row | None:
    """The live answer to a prompt, with its generation (``g_*`` columns, for ``stream_end_from_row``);
    the first one when several assistants answered it."""
    return await fetch_one(pool, _ANSWER_SQL + " ORDER BY m.id LIMIT 1", (prompt_id,))


@dataclass(frozen=True, slots=True)
class AnswerInputs:
    """What a claimed job needs from Postgres before it streams."""

    prompt: Row | None
    room: Row | None
    answer: Row | None  # the live answer of this job's assistant, if one is stored already
    history: list[Row]  # text messages up to the prompt, ascending, without deleted or superseded ones
    reserved_id: int  # an id for the answer (reserved whether it is used or not)
    assistant: Row | None = None  # the answering assistant (sql/0016); None: the server's default one


@bounded
async def answer_inputs(pool: Database, jobs: Sequence[tuple[int, int, int]], history_limit: int) -> list[AnswerInputs]:
    """For each ``(prompt id, room id, assistant id)``: prompt, room, the assistant's stored answer, recent
    history, the assistant and a reserved answer id.  Six statements for the whole list, in ONE round trip
    (pipeline mode): a burst of claimed jobs costs Postgres a few statements, not six per job."""
    prompt_ids, room_ids = [p for p, _, _ in jobs], [r for _, r, _ in jobs]
    assistant_ids = sorted({a for _, _, a in jobs if a})
    columns = ", ".join("h." + c.strip() for c in MESSAGE_COLUMNS.split(","))
    async with connection(pool) as conn:
        async with conn.pipeline():
            prompts = await conn.execute(f"SELECT {MESSAGE_COLUMNS} FROM messages WHERE id = ANY(%s)", (prompt_ids,))
            rooms = await conn.execute(f"SELECT {ROOM_COLUMNS} FROM rooms r WHERE r.id = ANY(%s)", (room_ids,))
            answers = await conn.execute(
                _ANSWER_SQL.replace("m.reply_to_id = %s", "m.reply_to_id = ANY(%s)"), (prompt_ids,)
            )
            history = await conn.execute(
                f"SELECT j.prompt_id AS for_prompt, {columns}"
                " FROM unnest(%s::bigint[], %s::bigint[]) AS j(prompt_id, room_id)"
                " CROSS JOIN LATERAL (SELECT * FROM messages m WHERE m.room_id = j.room_id"
                "   AND m.seq <= (SELECT seq FROM messages WHERE id = j.prompt_id) AND m.deleted_at IS NULL"
                "   AND m.superseded_at IS NULL AND m.kind = 'text' ORDER BY m.seq DESC LIMIT %s) h",
                (prompt_ids, room_ids, history_limit),
            )
            reserved = await conn.execute(
                "SELECT nextval(pg_get_serial_sequence('messages', 'id')) AS id FROM generate_series(1, %s)",
                (len(jobs),),
            )
            assistants = await conn.execute(
                f"SELECT {ASSISTANT_COLUMNS} FROM assistants a WHERE a.id = ANY(%s)", (assistant_ids,)
            )
        by_prompt = {r["id"]: r for r in await prompts.fetchall()}
        by_room = {r["id"]: r for r in await rooms.fetchall()}
        answered = {(r["reply_to_id"], r["a_id"]): r for r in await answers.fetchall()}
        histories: dict[int, list[Row]] = {}
        for r in await history.fetchall():
            histories.setdefault(r.pop("for_prompt"), []).append(r)
        ids = [int(r["id"]) for r in await reserved.fetchall()]
        by_assistant = {r["id"]: r for r in await assistants.fetchall()}
    return [
        AnswerInputs(
            by_prompt.get(p),
            by_room.get(r),
            answered.get((p, a)),
            list(reversed(histories.get(p, []))),
            i,
            by_assistant.get(a),
        )
        for (p, r, a), i in zip(jobs, ids, strict=True)
    ]


@bounded
async def settle_answer(pool: Database, prompt_id: int, assistant_id: int | None = None) -> bool:
    """No answer is owed any more (by ``assistant_id``; None: by any): refused (busy, quota), cancelled
    while queued, or dropped.

    True when one was owed."""
    row = await fetch_one(
        pool,
        "DELETE FROM answers_owed WHERE prompt_id = %s AND (%s::bigint IS NULL OR assistant_id = %s)"
        " RETURNING prompt_id",
        (prompt_id, assistant_id, assistant_id),
    )
    return row is not None


@bounded
async def owed_by(pool: Database, prompt_id: int) -> list[int]:
    """The assistants (0: the default one) that still owe ``prompt_id`` an answer."""
    rows = await fetch_all(
        pool, "SELECT assistant_id FROM answers_owed WHERE prompt_id = %s ORDER BY assistant_id", (prompt_id,)
    )
    return [int(r["assistant_id"]) for r in rows]


@bounded
async def answers_owed(pool: Database, older_than_s: float, limit: int) -> list[Row]:
    """Prompts still owed an answer for longer than ``older_than_s`` (oldest first): the sweeper's input."""
    return await fetch_all(
        pool,
        "SELECT prompt_id, room_id, requester_id, assistant_id FROM answers_owed"
        " WHERE created_at < now() - make_interval(secs => %s) ORDER BY created_at LIMIT %s",
        (older_than_s, limit),
    )


@dataclass(frozen=True, slots=True)
class Usage:
    provider: str
    model: str
    stop_reason: str
    input_tokens: int
    output_tokens: int
    first_token_ms: int | None
    latency_ms: int
    retrieved_ids: tuple[int, ...]
    assistant_id: int = 0  # 0: the server's default assistant


@bounded
async def persist_answer(
    pool: Database,
    *,
    message_id: int,
    room_id: int,
    prompt_id: int,
    requester_id: int | None,
    content: str,
    status: str,
    supersede_id: int | None,
    usage: Usage,
    data: dict[str, Any] | None = None,
) -> Row | None:
    """Write the answer with the room's next seq, its generation and usage, in one transaction.

    None when an answer to this prompt already exists (a job taken over after a
    crash finished twice): the unique index keeps the first one.
    """
    async with transaction(pool) as conn:
        cur = await conn.execute("SELECT last_seq FROM rooms WHERE id = %s FOR UPDATE", (room_id,))
        room = await cur.fetchone()
        if room is None:
            return None
        await conn.execute(  # answered
            "DELETE FROM answers_owed WHERE prompt_id = %s AND assistant_id = %s", (prompt_id, usage.assistant_id)
        )
        if supersede_id is not None:
            await conn.execute(
                "UPDATE messages SET superseded_at = now() WHERE id = %s AND superseded_at IS NULL", (supersede_id,)
            )
        cur = await conn.execute(
            "INSERT INTO messages (id, room_id, seq, sender_id, role, kind, content, reply_to_id, status,"
            " assistant_id, data)"
            " OVERRIDING SYSTEM VALUE VALUES (%s, %s, %s, NULL, 'assistant', 'text', %s, %s, %s, %s, %s)"
            " ON CONFLICT (reply_to_id, (coalesce(assistant_id, 0))) WHERE role = 'assistant'"
            " AND superseded_at IS NULL DO NOTHING"
            f" RETURNING {MESSAGE_COLUMNS}",
            (
                message_id,
                room_id,
                room["last_seq"] + 1,
                content,
                prompt_id,
                status,
                usage.assistant_id or None,
                Jsonb(data) if data is not None else None,
            ),
        )
        row = await cur.fetchone()
        if row is None:
            return None
        await conn.execute("UPDATE rooms SET last_seq = last_seq + 1 WHERE id = %s", (room_id,))
        await conn.execute(
            "INSERT INTO generations (room_id, prompt_message_id, answer_message_id, requester_id, provider, model,"
            " stop_reason, input_tokens, output_tokens, first_token_ms, latency_ms, retrieved_ids, assistant_id)"
            " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
            (
                room_id,
                prompt_id,
                message_id,
                requester_id,
                usage.provider,
                usage.model,
                usage.stop_reason,
                usage.input_tokens,
                usage.output_tokens,
                usage.first_token_ms,
                usage.latency_ms,
                list(usage.retrieved_ids),
                usage.assistant_id or None,
            ),
        )
        if requester_id is not None:
            await conn.execute(
                "INSERT INTO usage_daily AS u (day, user_id, room_id, answers, input_tokens, output_tokens)"
                " VALUES ((now() AT TIME ZONE 'UTC')::date, %s, %s, 1, %s, %s)"
                " ON CONFLICT (day, user_id, room_id) DO UPDATE SET answers = u.answers + 1,"
                " input_tokens = u.input_tokens + EXCLUDED.input_tokens,"
                " output_tokens = u.output_tokens + EXCLUDED.output_tokens",
                (requester_id, room_id, usage.input_tokens, usage.output_tokens),
            )
            await conn.execute(
                "INSERT INTO usage_assistants AS u (day, user_id, assistant_id, model, answers, input_tokens,"
                " output_tokens) VALUES ((now() AT TIME ZONE 'UTC')::date, %s, %s, %s, 1, %s, %s)"
                " ON CONFLICT (day, user_id, assistant_id, model) DO UPDATE SET answers = u.answers + 1,"
                " input_tokens = u.input_tokens + EXCLUDED.input_tokens,"
                " output_tokens = u.output_tokens + EXCLUDED.output_tokens",
                (requester_id, usage.assistant_id, usage.model, usage.input_tokens, usage.output_tokens),
            )
    return row


@bounded
async def tokens_used_today(pool: Database, user_id: int) -> int:
    row = await fetch_one(
        pool,
        "SELECT COALESCE(sum(input_tokens + output_tokens), 0) AS n FROM usage_daily"
        " WHERE user_id = %s AND day = (now() AT TIME ZONE 'UTC')::date",
        (user_id,),
    )
    return int(row["n"]) if row else 0
