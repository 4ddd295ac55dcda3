"""Plain-SQL migrations from ``sql/NNNN_name.sql``, applied in order.

Several instances may start at once: a session-level advisory lock makes the
second one wait and then find nothing left to do.  Each file runs in its own
transaction and is recorded in ``schema_migrations`` with its checksum, so an
edited, already-applied file is reported instead of silently ignored.
"""

from __future__ import annotations

import hashlib
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import psycopg

from chatd.process.logs import fields, server_log

# The source tree's sql/, or the copy a wheel install puts under <prefix>/share/chatd/sql.
SQL_DIR = next(
    (
        d
        for d in (Path(__file__).resolve().parents[2] / "sql", Path(sys.prefix) / "share" / "chatd" / "sql")
        if d.is_dir()
    ),
    Path(__file__).resolve().parents[2] / "sql",
)
# Any constant works; it only has to be the same for every chatd.
_LOCK_KEY = 0x63686174_64  # "chatd"
_NAME = re.compile(r"^(\d{4})_[a-z0-9_]+\.sql$")


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()


def discover(sql_dir: Path = SQL_DIR) -> list[Migration]:
    found: list[Migration] = []
    for path in sorted(sql_dir.glob("*.sql")):
        match = _NAME.match(path.name)
        if not match:
            raise ValueError(f"migration file name must look like 0001_name.sql: {path.name}")
        found.append(Migration(int(match.group(1)), path.name, path.read_text()))
    if not found:
        raise FileNotFoundError(f"no migrations in {sql_dir}: install chatd with its sql/ directory")
    versions = [m.version for m in found]
    if len(set(versions)) != len(versions):
        raise ValueError(f"duplicate migration numbers in {sql_dir}")
    return found


def apply(database_url: str, sql_dir: Path = SQL_DIR) -> list[str]:
    """Apply pending migrations; return the names applied by this call."""
    migrations = discover(sql_dir)
    applied_now: list[str] = []
    with psycopg.connect(database_url, autocommit=True, connect_timeout=10) as conn:
        conn.execute("SELECT pg_advisory_lock(%s)", (_LOCK_KEY,))
        try:
            conn.execute(
                """CREATE TABLE IF NOT EXISTS schema_migrations (
                       version integer PRIMARY KEY,
                       name text NOT NULL,
                       checksum text NOT NULL,
                       applied_at timestamptz NOT NULL DEFAULT now())"""
            )
            done = {row[0]: row[1] for row in conn.execute("SELECT version, checksum FROM schema_migrations")}
            for mig in migrations:
                if mig.version in done:
                    if done[mig.version] != mig.checksum:
                        server_log.warning("migration_changed_after_apply", extra=fields(name=mig.name))
                    continue
                with conn.transaction():
                    conn.execute(mig.sql.encode())  # type: ignore[call-overload]  # bytes: a script, not a template
                    conn.execute(
                        "INSERT INTO schema_migrations (version, name, checksum) VALUES (%s, %s, %s)",
                        (mig.version, mig.name, mig.checksum),
                    )
                applied_now.append(mig.name)
                server_log.info("migration_applied", extra=fields(name=mig.name))
        finally:
            conn.execute("SELECT pg_advisory_unlock(%s)", (_LOCK_KEY,))
    return applied_now
