"""Alembic environment: runs migrations through an async engine (aiosqlite or asyncpg).

The database URL comes from `config.attributes["database_url"]` (set by migrate.py), else the
`sqlalchemy.url` option, else `default_database_url()`. A caller that already holds a sync
`Connection` may pass it as `config.attributes["connection"]`.
"""

from __future__ import annotations

import asyncio

from alembic import context
from sqlalchemy.engine import Connection
from sqlalchemy.pool import NullPool

from services.shared.db.engine import default_database_url, make_engine
from services.shared.db.models import Base

config = context.config
target_metadata = Base.metadata


def _database_url() -> str:
    return (
        config.attributes.get("database_url")
        or config.get_main_option("sqlalchemy.url")
        or default_database_url()
    )


def _run_with_connection(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        # SQLite cannot ALTER most things; batch mode rebuilds the table instead.
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


async def _run_online(url: str) -> None:
    # NullPool: a migration is a one-off; don't leave pooled connections behind.
    engine = make_engine(url, poolclass=NullPool)
    try:
        async with engine.connect() as connection:
            await connection.run_sync(_run_with_connection)
    finally:
        await engine.dispose()


def _run_offline(url: str) -> None:
    context.configure(url=url, target_metadata=target_metadata, literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()


if context.is_offline_mode():
    _run_offline(_database_url())
elif config.attributes.get("connection") is not None:
    _run_with_connection(config.attributes["connection"])
else:
    asyncio.run(_run_online(_database_url()))
