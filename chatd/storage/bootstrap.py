"""The one-shot, synchronous SQL of start-up (the master has no event loop): is Postgres there, and the
embedded server's database."""

from __future__ import annotations

import psycopg
from psycopg import sql


def server_version(url: str, timeout_s: float) -> str:
    """Connect once and return the server's version; ``psycopg.Error`` when it cannot."""
    with psycopg.connect(url, connect_timeout=max(1, round(timeout_s))) as conn:
        row = conn.execute("SHOW server_version").fetchone()
    assert row is not None
    return str(row[0])


def ensure_database(admin_url: str, name: str) -> None:
    """Create database ``name`` unless it exists (the embedded server's first start)."""
    with psycopg.connect(admin_url, autocommit=True, connect_timeout=10) as conn:
        if conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone() is None:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
