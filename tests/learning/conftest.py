"""A whole stack per log-DB backend for the continuous-learning tests.

The predictor starts from a version trained on translation only; the estimator fits its first
version from a small calibration of the tiny CPU model (8 shapes, timed once per session and
written into each backend's DB). The trainer runs every 2 s instead of every 2-3 minutes.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.databases import create_database, drop_database
from tests.learning.support import (
    NORMAL_WORKER_ID,
    TIME_MISS_ABS_S,
    TRAINER_PERIOD_S,
    VALIDATION_WINDOW_ROWS,
    LearningStack,
)
from tests.stack_support import run_cli
from tools.demo import DEFAULT_DATA_DIR as DATA_DIR
from tools.stack import Stack

TRANSLATION_TASK = "mt_zh2en"
# (batch size, prompt tokens, new tokens): enough for a first estimator, seconds to time on 2 cores.
MICRO_GRID = [(b, n, g) for b in (1, 4) for n in (32, 128) for g in (8, 32)]
# The adaptive policy's batch ceiling: many small batches rather than few large ones, whatever the
# machine's speed (the estimator learns from batches; see SLOW_SPACING_S in the test).
BATCH_CEILING = 4


@pytest.fixture(scope="session")
def calibration():
    """Timed micro-grid samples of the tiny model on this machine, and the device name."""
    run_cli("services.worker.model_builder")
    from services.worker.calibrate import Shape, calibrate
    from services.worker.engine import StaticBatchEngine
    from services.worker.model_builder import resolve_model_dir

    engine = StaticBatchEngine(resolve_model_dir(""), device="cpu")
    samples = calibrate(engine, [Shape(*shape) for shape in MICRO_GRID], repeats=1, show_progress=False)
    return samples, engine.device_name


def prepare(workdir: Path, database_url: str, calibration) -> Path:
    """Migrate, store predictor v1 fitted on translation only, store the calibration samples."""
    from services.worker.calibrate import store_samples

    store_dir = workdir / "model-store"
    translation_only = workdir / "translation-only"
    translation_only.mkdir()
    # The data stays where it is: the folder only links to the one task file.
    (translation_only / f"{TRANSLATION_TASK}.jsonl").symlink_to(DATA_DIR / f"{TRANSLATION_TASK}.jsonl")
    run_cli("services.shared.db", "upgrade", "--url", database_url)
    run_cli(
        "services.predictor.bootstrap", "--model", "per_app_linear", "--data", str(translation_only),
        "--max-per-task", "300", "--database-url", database_url, "--model-store-dir", str(store_dir),
    )
    samples, device = calibration
    asyncio.run(store_samples(database_url, samples, device))
    return store_dir


@pytest.fixture(scope="module", params=["postgresql", "sqlite"])
def learning_stack(request, tmp_path_factory, calibration) -> Iterator[LearningStack]:
    workdir = tmp_path_factory.mktemp(f"learning-{request.param}")
    database_url = asyncio.run(create_database(request.param, workdir))
    try:
        store_dir = prepare(workdir, database_url, calibration)
        trainer_env = {
            "MAGNUS_TRAINER_PREDICTOR_PERIOD_S": str(TRAINER_PERIOD_S),
            "MAGNUS_TRAINER_ESTIMATOR_PERIOD_S": str(TRAINER_PERIOD_S),
            "MAGNUS_TRAINER_TIME_MISS_ABS_S": str(TIME_MISS_ABS_S),
            # The guard validates on held-back rows of the most recent log rows. This traffic is
            # a few dozen rows, so "recent" must be a handful: with the default 5000 the slice
            # is mostly rows from before the worker slowed down, and the guard (rightly, on that
            # evidence) keeps refusing the estimator that learned the new behaviour.
            "MAGNUS_TRAINER_VALIDATION_WINDOW_ROWS": str(VALIDATION_WINDOW_ROWS),
        }
        stack = Stack(
            workdir=workdir,
            database_url=database_url,
            model_store_dir=store_dir,
            extra_env={
                **trainer_env,
                "MAGNUS_WORKER_WORKER_ID": NORMAL_WORKER_ID,
                "MAGNUS_BATCHER_MAX_BATCH_SIZE": str(BATCH_CEILING),
                "MAGNUS_PREDICTOR_LOAD_RETRY_S": "0.5",
                "MAGNUS_ESTIMATOR_LOAD_RETRY_S": "0.5",
            },
        )
        stack.start_all()
        try:
            stack.wait_healthy(timeout_s=120)
            yield LearningStack(stack, request.param, database_url, store_dir)
        finally:
            stack.stop_all()
    finally:
        asyncio.run(drop_database(database_url))
