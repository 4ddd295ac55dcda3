from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import psycopg

from chatd.storage import migrations
from tests.conftest import Services
from tests.support import create_database


def test_concurrent_starts_apply_each_migration_once(services: Services) -> None:
    url = create_database(services.admin_url, "mig")
    expected = [m.name for m in migrations.discover()]
    with ThreadPoolExecutor(6) as pool:
        results = list(pool.map(lambda _: migrations.apply(url), range(6)))
    applied = [name for result in results for name in result]
    assert sorted(applied) == sorted(expected)  # each file by exactly one caller
    with psycopg.connect(url) as conn:
        rows = conn.execute("SELECT name FROM schema_migrations ORDER BY version").fetchall()
    assert [r[0] for r in rows] == expected
    assert migrations.apply(url) == []  # idempotent
