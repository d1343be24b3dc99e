"""Fresh, uniquely named test databases on SQLite and on the local PostgreSQL.

Used by the log-DB tests (tests/db) and the continuous-learning tests (tests/learning).
PostgreSQL must be reachable (CI guarantees it): when it is not, the PostgreSQL variants fail
instead of silently skipping.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import asyncpg
import pytest

POSTGRES_HOST = os.environ.get("MAGNUS_TEST_POSTGRES_HOST", "127.0.0.1")
POSTGRES_PORT = int(os.environ.get("MAGNUS_TEST_POSTGRES_PORT", "5432"))
POSTGRES_USER = os.environ.get("MAGNUS_TEST_POSTGRES_USER", "postgres")


async def connect_postgres_admin() -> asyncpg.Connection:
    try:
        return await asyncpg.connect(
            host=POSTGRES_HOST, port=POSTGRES_PORT, user=POSTGRES_USER, database="postgres",
            timeout=5,
        )
    except (OSError, asyncpg.PostgresError, TimeoutError) as error:
        pytest.fail(
            f"PostgreSQL is required for these tests but is unreachable at "
            f"{POSTGRES_USER}@{POSTGRES_HOST}:{POSTGRES_PORT}: {error!r}. Start it with "
            "`pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start`.",
            pytrace=False,
        )


async def terminate_connections(admin: asyncpg.Connection, database: str) -> None:
    await admin.execute(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
        "WHERE datname = $1 AND pid <> pg_backend_pid()",
        database,
    )


async def create_database(backend: str, tmp_path: Path) -> str:
    """URL of a fresh, empty database ("sqlite" | "postgresql"); drop it with `drop_database`."""
    if backend == "sqlite":
        return f"sqlite+aiosqlite:///{tmp_path / 'magnus.db'}"
    if backend != "postgresql":
        raise ValueError(f"backend must be sqlite or postgresql, got {backend!r}")
    database = f"magnus_test_{uuid.uuid4().hex[:16]}"
    admin = await connect_postgres_admin()
    try:
        await admin.execute(f'CREATE DATABASE "{database}"')
    finally:
        await admin.close()
    return f"postgresql+asyncpg://{POSTGRES_USER}@{POSTGRES_HOST}:{POSTGRES_PORT}/{database}"


async def drop_database(url: str) -> None:
    """Drop a PostgreSQL database made by `create_database` (SQLite files go with tmp_path)."""
    if not url.startswith("postgresql"):
        return
    database = url.rsplit("/", 1)[1]
    admin = await connect_postgres_admin()
    try:
        await admin.execute(f'ALTER DATABASE "{database}" ALLOW_CONNECTIONS true')
        await terminate_connections(admin, database)
        await admin.execute(f'DROP DATABASE IF EXISTS "{database}"')
    finally:
        await admin.close()


@asynccontextmanager
async def fresh_database_url(backend: str, tmp_path: Path) -> AsyncIterator[str]:
    """URL of a fresh, empty database ("sqlite" | "postgresql"); PostgreSQL ones are dropped after."""
    url = await create_database(backend, tmp_path)
    try:
        yield url
    finally:
        await drop_database(url)


@asynccontextmanager
async def migrated_log_db(backend: str, tmp_path: Path):
    """(engine, session factory) of a fresh log DB ("sqlite" | "postgresql") at the head revision."""
    import asyncio

    from services.shared.db import make_engine, make_session_factory, upgrade

    async with fresh_database_url(backend, tmp_path) as url:
        await asyncio.to_thread(upgrade, url)
        engine = make_engine(url)
        try:
            yield engine, make_session_factory(engine)
        finally:
            await engine.dispose()
