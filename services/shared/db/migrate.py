"""Schema migrations through alembic's command API, without an alembic.ini.

The functions are synchronous (alembic is), but env.py drives an async engine. When called from
inside a running event loop they run on a helper thread, because env.py needs its own loop;
the calling loop is blocked meanwhile, so prefer `await asyncio.to_thread(upgrade, url)` there.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy.engine import Connection
from sqlalchemy.pool import NullPool

from services.shared.db.engine import make_engine

MIGRATIONS_DIR = Path(__file__).resolve().with_name("migrations")

_T = TypeVar("_T")


def make_alembic_config(url: str) -> Config:
    """An alembic `Config` pointing at our migrations folder and at the database `url`."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    # Passed as an attribute, not as the "sqlalchemy.url" option: configparser would try to
    # interpolate any '%' in the URL (e.g. in an escaped password).
    config.attributes["database_url"] = url
    return config


def upgrade(url: str, revision: str = "head") -> None:
    """Migrate the database at `url` up to `revision`."""
    _run_outside_event_loop(command.upgrade, make_alembic_config(url), revision)


def downgrade(url: str, revision: str = "base") -> None:
    """Migrate the database at `url` down to `revision` ("base" drops every table)."""
    _run_outside_event_loop(command.downgrade, make_alembic_config(url), revision)


def current(url: str) -> str | None:
    """The revision the database at `url` is at, or None if it was never migrated."""
    return _run_outside_event_loop(lambda: asyncio.run(_current_async(url)))


def head_revision() -> str:
    """The newest revision in the migrations folder."""
    script = ScriptDirectory.from_config(make_alembic_config(""))
    head = script.get_current_head()
    if head is None:
        raise RuntimeError(f"no migrations found in {MIGRATIONS_DIR}")
    return head


async def _current_async(url: str) -> str | None:
    engine = make_engine(url, poolclass=NullPool)
    try:
        async with engine.connect() as connection:
            return await connection.run_sync(_current_revision)
    finally:
        await engine.dispose()


def _current_revision(connection: Connection) -> str | None:
    return MigrationContext.configure(connection).get_current_revision()


def _run_outside_event_loop(fn: Callable[..., _T], *args: object) -> _T:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return fn(*args)
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="magnus-migrate") as executor:
        return executor.submit(fn, *args).result()
