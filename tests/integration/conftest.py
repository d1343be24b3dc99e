"""Fixtures that run the real services as processes (SQLite log, tiny CPU model)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.stack_support import run_cli
from tools.stack import Stack

from tools.demo import DEFAULT_DATA_DIR as DATA_DIR  # noqa: E402


def prepare_models(workdir: Path, database_url: str) -> Path:
    """Migrate a fresh log DB, build the tiny model, and store first predictor/estimator data."""
    store = workdir / "model-store"
    run_cli("services.shared.db", "upgrade", "--url", database_url)
    run_cli("services.worker.model_builder")
    run_cli(
        "services.predictor.bootstrap",
        "--data", str(DATA_DIR),
        "--max-per-task", "400",
        "--database-url", database_url,
        "--model-store-dir", str(store),
    )
    run_cli("services.worker.calibrate", "--grid", "first", "--database-url", database_url)
    return store


@pytest.fixture(scope="session")
def full_stack(tmp_path_factory, prepared_stack_db):
    workdir = tmp_path_factory.mktemp("stack")
    database_url = f"sqlite+aiosqlite:///{workdir / 'log.db'}"
    shutil.copy(prepared_stack_db[0], workdir / "log.db")  # prepared once per session (tests/conftest.py)
    store = prepared_stack_db[1]
    stack = Stack(
        workdir=workdir,
        database_url=database_url,
        model_store_dir=store,
        extra_env={
            # tighter than the default so short and long requests separate clearly in a small test
            "MAGNUS_BATCHER_PHI_TOKEN_READS": "8000",
            "MAGNUS_BATCHER_MAX_USER_INPUT_BYTES": "20000",
            "MAGNUS_BATCHER_MAX_NEW_TOKENS_LIMIT": "512",
            "MAGNUS_BATCHER_MAX_INPUT_TOKENS": "2048",
        },
    )
    stack.start_all()
    try:
        stack.wait_healthy(timeout_s=180)
        yield stack
    finally:
        stack.stop_all()
