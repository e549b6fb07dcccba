"""PostgreSQL fixtures: one throwaway server per session, fresh migrated databases per test, and the
`store_backend` parameter that runs a backend-neutral test on SQLite and on PostgreSQL."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from careservice.settings import StoreConfig
from careservice.storeadmin import migrate
from tests.postgres import Postgres
from tests.postgres import unavailable


@pytest.fixture(scope="session")
def postgres() -> Iterator[Postgres]:
    why = unavailable()
    if why:
        pytest.skip(why)
    server = Postgres().start()
    try:
        yield server
    finally:
        server.destroy()


@pytest.fixture
def pg_store(postgres: Postgres) -> StoreConfig:
    """A migrated pair of databases (cases, keys), each its own role's, for one test."""
    url, keys_url = postgres.databases()
    config = StoreConfig(url, keys_url, lease_seconds=5)
    migrate(config)
    return config


@pytest.fixture(params=["sqlite", "postgresql"])
def store_backend(request: pytest.FixtureRequest) -> StoreConfig:
    if request.param == "sqlite":
        return StoreConfig()
    return request.getfixturevalue("pg_store")
