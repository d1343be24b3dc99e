"""Fitting an estimator version from the `batch_time_samples` the workers' calibration wrote."""

from __future__ import annotations

import asyncio
import logging

from services.core.knn_model import BatchShape, KnnBatchTimeModel, TimeSample, cross_validated_mae_s
from services.shared.db.models import ModelKind, SampleSource
from services.shared.db.queries import fetch_batch_time_samples
from services.shared.model_store import ModelStore, VersionInfo

log = logging.getLogger(__name__)

KIND = ModelKind.ESTIMATOR
CALIBRATION_SOURCE = SampleSource.CALIBRATION


async def read_calibration_samples(store: ModelStore) -> list[TimeSample]:
    async with store.session_factory() as session:
        rows = await fetch_batch_time_samples(session, source=CALIBRATION_SOURCE)
    return [
        TimeSample(BatchShape(r.batch_size, r.input_tokens_max, r.gen_tokens_max), r.duration_s)
        for r in rows
    ]


def fit_knn(samples: list[TimeSample], n_neighbors: int) -> tuple[KnnBatchTimeModel, dict]:
    """The fitted model and its metrics (5-fold MAE, seconds, when there are enough samples)."""
    model = KnnBatchTimeModel(n_neighbors)
    model.fit(samples)
    cv_mae_s = cross_validated_mae_s(samples, n_neighbors)
    return model, {
        "cv_mae_s": None if cv_mae_s is None else round(cv_mae_s, 4),
        "num_samples": len(samples),
    }


async def fit_from_calibration(
    store: ModelStore, *, n_neighbors: int, min_samples: int = 1
) -> VersionInfo | None:
    """Fit KNN on every calibration sample and store it as a pushed version; None if too few."""
    samples = await read_calibration_samples(store)
    if len(samples) < min_samples:
        return None
    model, metrics = await asyncio.to_thread(fit_knn, samples, n_neighbors)
    return await store.save(
        KIND,
        model,
        model_name=model.name,
        num_train_samples=len(samples),
        metrics=metrics,
        is_pushed=True,
        note="fitted from calibration samples",
    )
