"""Fixtures for estimator tests: a migrated temp SQLite log DB, a model store, calibration rows."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from services.shared.db.models import BatchTimeSample
from services.shared.model_store import ModelStore


def synthetic_duration_s(batch_size: int, input_tokens_max: int, gen_tokens_max: int) -> float:
    """A made-up but plausible cost: prefill plus decode steps that slow with batch and context."""
    return 0.0005 * batch_size * input_tokens_max / 10 + gen_tokens_max * (0.02 + 0.0002 * batch_size)


@pytest.fixture
def duration_s() -> Callable[[int, int, int], float]:
    """The synthetic cost function the calibration rows were made with."""
    return synthetic_duration_s


CALIBRATION_GRID = [(b, l, g) for b in (1, 4, 16) for l in (32, 256, 1024) for g in (16, 128, 512)]


@pytest.fixture
def add_calibration(store: ModelStore) -> Callable[..., object]:
    """Insert batch_time_samples rows for the grid (source "calibration" unless told)."""

    async def add(grid=CALIBRATION_GRID, source: str = "calibration") -> None:
        async with store.session_factory() as session, session.begin():
            session.add_all(
                BatchTimeSample(
                    batch_size=b,
                    input_tokens_max=l,
                    gen_tokens_max=g,
                    duration_s=synthetic_duration_s(b, l, g),
                    source=source,
                    device="test-cpu",
                )
                for b, l, g in grid
            )

    return add
