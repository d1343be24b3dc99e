"""Fixtures shared by the service tests: a migrated temp SQLite log DB and a model store."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from services.shared.db import migrate
from services.shared.db.engine import make_engine, make_session_factory
from services.shared.model_store import ModelStore


@pytest.fixture
def db_url(tmp_path: Path) -> str:
    url = f"sqlite+aiosqlite:///{tmp_path}/log.db"
    migrate.upgrade(url)
    return url


@pytest.fixture
def store_dir(tmp_path: Path) -> Path:
    return tmp_path / "store"


@pytest_asyncio.fixture
async def store(db_url: str, store_dir: Path) -> AsyncIterator[ModelStore]:
    engine = make_engine(db_url)
    yield ModelStore(store_dir, make_session_factory(engine))
    await engine.dispose()


@pytest.fixture(scope="session")
def prepared_stack_db(tmp_path_factory) -> tuple[Path, Path]:
    """(SQLite log DB, model store) with the tiny model's first predictor/estimator data, built once.

    Preparing takes a minute or more on CI, so every suite that runs the real stack copies this
    DB file (`shutil.copy`) instead of preparing its own; the store is only read by those stacks.
    """
    from tests.integration.conftest import prepare_models

    workdir = tmp_path_factory.mktemp("prepared")
    db_path = workdir / "log.db"
    store = prepare_models(workdir, f"sqlite+aiosqlite:///{db_path}")
    return db_path, store
