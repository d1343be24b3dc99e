"""Fixtures giving each log-DB test a fresh database on SQLite and on PostgreSQL.

PostgreSQL must be reachable (CI guarantees it): when it is not, the PostgreSQL variants fail
instead of silently skipping.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager

import pytest
import pytest_asyncio
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from services.shared.db import make_engine, make_session_factory, upgrade
from tests.databases import connect_postgres_admin, fresh_database_url, terminate_connections

# Short, so a test that provokes lock failures does not wait long for each one.
SQLITE_BUSY_TIMEOUT_MS = 100


@pytest_asyncio.fixture(params=["sqlite", "postgresql"])
async def database_url(request: pytest.FixtureRequest, tmp_path) -> AsyncIterator[str]:
    """URL of a fresh, empty database; PostgreSQL ones are dropped afterwards."""
    async with fresh_database_url(request.param, tmp_path) as url:
        yield url


@pytest_asyncio.fixture
async def migrated_url(database_url: str) -> str:
    await asyncio.to_thread(upgrade, database_url)
    return database_url


@pytest_asyncio.fixture
async def engine(migrated_url: str) -> AsyncIterator[AsyncEngine]:
    engine = make_engine(migrated_url, sqlite_busy_timeout_ms=SQLITE_BUSY_TIMEOUT_MS)
    yield engine
    await engine.dispose()


@pytest.fixture
def session_factory(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    return make_session_factory(engine)


@pytest.fixture
def database_outage() -> Callable[[str], AbstractAsyncContextManager[None]]:
    """`async with database_outage(url):` makes writes to `url` fail inside the block."""
    return _database_outage


@asynccontextmanager
async def _database_outage(url: str) -> AsyncIterator[None]:
    """Make writes to `url` fail until the block exits.

    SQLite: another connection holds the write lock (what a long trainer transaction would do;
    a read-only directory does not work when the tests run as root). PostgreSQL: the database
    refuses connections and the existing ones are killed.
    """
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        locker = sqlite3.connect(parsed.database, isolation_level=None)
        try:
            locker.execute("BEGIN EXCLUSIVE")
            yield
        finally:
            locker.execute("ROLLBACK")
            locker.close()
        return
    admin = await connect_postgres_admin()
    try:
        await admin.execute(f'ALTER DATABASE "{parsed.database}" ALLOW_CONNECTIONS false')
        await terminate_connections(admin, parsed.database)
        yield
    finally:
        await admin.execute(f'ALTER DATABASE "{parsed.database}" ALLOW_CONNECTIONS true')
        await admin.close()
