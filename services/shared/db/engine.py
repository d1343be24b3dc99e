"""Async engine and session factory for the log database (SQLite or PostgreSQL)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)

REPO_ROOT = Path(__file__).resolve().parents[3]
DATABASE_URL_ENV = "MAGNUS_DATABASE_URL"
DEFAULT_SQLITE_BUSY_TIMEOUT_MS = 5_000


def default_database_url() -> str:
    """`$MAGNUS_DATABASE_URL`, else a SQLite file at `<repo>/var/magnus.db`."""
    url = os.environ.get(DATABASE_URL_ENV, "").strip()
    if url:
        return url
    return f"sqlite+aiosqlite:///{REPO_ROOT / 'var' / 'magnus.db'}"


def sqlite_file_path(url: str) -> Path | None:
    """The database file of a SQLite URL, or None for in-memory and non-SQLite URLs."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite":
        return None
    database = parsed.database or ""
    if database in ("", ":memory:") or database.startswith("file:"):
        return None
    return Path(database)


def make_engine(
    url: str,
    *,
    sqlite_busy_timeout_ms: int = DEFAULT_SQLITE_BUSY_TIMEOUT_MS,
    **engine_kwargs: Any,
) -> AsyncEngine:
    """Create an async engine for `url` (`sqlite+aiosqlite://...` or `postgresql+asyncpg://...`).

    For a SQLite file the parent directory is created, and every connection gets WAL journaling
    and a busy timeout of `sqlite_busy_timeout_ms` milliseconds: several processes share the file
    (the batcher writes while the trainer reads), and WAL lets readers run alongside the writer
    while the busy timeout makes a briefly blocked writer wait instead of failing at once.
    `engine_kwargs` go to `create_async_engine`.
    """
    if sqlite_busy_timeout_ms < 0:
        raise ValueError(f"sqlite_busy_timeout_ms must be >= 0, got {sqlite_busy_timeout_ms}")
    sqlite_path = sqlite_file_path(url)
    if sqlite_path is not None:
        sqlite_path.parent.mkdir(parents=True, exist_ok=True)
    engine = create_async_engine(url, **engine_kwargs)
    if engine.dialect.name == "sqlite":
        _install_sqlite_pragmas(engine, sqlite_busy_timeout_ms, is_file=sqlite_path is not None)
    return engine


def _install_sqlite_pragmas(engine: AsyncEngine, busy_timeout_ms: int, *, is_file: bool) -> None:
    @event.listens_for(engine.sync_engine, "connect")
    def _set_pragmas(dbapi_connection: Any, _connection_record: Any) -> None:
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
            if is_file:  # in-memory databases cannot use WAL
                cursor.execute("PRAGMA journal_mode = WAL")
                # NORMAL is durable across application crashes in WAL mode and much faster
                # than FULL; losing the last log rows on a power cut is acceptable.
                cursor.execute("PRAGMA synchronous = NORMAL")
        finally:
            cursor.close()


def make_session_factory(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    """Session factory whose objects stay readable after commit (no lazy reloads in async)."""
    return async_sessionmaker(engine, expire_on_commit=False)
