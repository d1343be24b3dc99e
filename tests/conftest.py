"""Fixtures shared by the service tests: a migrated temp SQLite log DB and a model store.

`make test` runs the suite on two xdist workers with `--dist loadscope`: a module's tests run on one
worker, so a module-scoped stack or model is set up once. Modules that start real service processes
are sent first, so the long ones do not end up running alone at the end. (Not `loadgroup`: with
pytest 9.2, pytest-xdist 3.8.0 cannot put a group into a test's id, and ignores the groups.)
"""

from __future__ import annotations

import fcntl
import os
import shutil
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import pytest_asyncio

from services.shared.db import migrate
from services.shared.db.engine import make_engine, make_session_factory
from services.shared.model_store import ModelStore


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # Whole modules move, each keeping its own order, the same on every worker (xdist needs identical
    # collections): those that start real processes (marked `integration`) first, and of those first
    # the ones that do not wait for `prepared_stack_db`, which one worker builds meanwhile.
    module_rank: dict[Path, tuple[bool, bool]] = {}
    for item in items:
        rank = (item.get_closest_marker("integration") is None, "prepared_stack_db" in item.fixturenames)
        module_rank[item.path] = min(module_rank.get(item.path, rank), rank)
    items.sort(key=lambda item: module_rank[item.path])


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


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    with open(path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def built_once_per_run(tmp_path_factory: pytest.TempPathFactory, name: str, build: Callable[[Path], None]) -> Path:
    """A folder `build(folder)` filled once per pytest run, however many xdist workers ask for it.

    Under xdist every worker has its own session, so a session fixture runs once per worker; the
    workers share the parent of their temp folders, and the first to take the lock builds there
    while the others wait and then read what it built. Without xdist this is a plain mktemp.
    """
    if os.environ.get("PYTEST_XDIST_WORKER") is None:
        folder = tmp_path_factory.mktemp(name)
        build(folder)
        return folder
    folder = tmp_path_factory.getbasetemp().parent / name
    done = folder / ".built"
    with _locked(folder.with_name(f"{name}.lock")):
        if not done.exists():
            shutil.rmtree(folder, ignore_errors=True)  # what a failed build left
            folder.mkdir()
            build(folder)
            done.touch()
    return folder


@pytest.fixture(scope="session")
def prepared_stack_db(tmp_path_factory) -> tuple[Path, Path]:
    """(SQLite log DB, model store) with the tiny model's first predictor/estimator data, built once.

    Preparing takes a minute or more on CI, so every suite that runs the real stack copies this
    DB file (`shutil.copy`) instead of preparing its own; the store is only read by those stacks.
    Built once per run, not once per xdist worker (`built_once_per_run`).
    """
    from tests.integration.conftest import prepare_models

    def build(workdir: Path) -> None:
        prepare_models(workdir, f"sqlite+aiosqlite:///{workdir / 'log.db'}")

    workdir = built_once_per_run(tmp_path_factory, "prepared", build)
    return workdir / "log.db", workdir / "model-store"
