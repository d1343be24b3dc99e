"""`knn`: k-nearest-neighbours regression of batch run time from the batch's shape.

Features are log1p(batch size), log1p(L(B)) and log1p(G(B)), standardised: run time grows
roughly multiplicatively with each, and the log keeps a 10-token difference between short
batches as meaningful as a 1,000-token one between long batches. Neighbours are weighted by
inverse distance, so a shape that was measured exactly gets its measured time.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from sklearn.neighbors import KNeighborsRegressor
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import FunctionTransformer, StandardScaler


@dataclass(frozen=True, slots=True)
class BatchShape:
    """A batch: `batch_size` requests, longest prompt `input_tokens_max`, longest generation
    `gen_tokens_max` (tokens)."""

    batch_size: int
    input_tokens_max: int
    gen_tokens_max: int


@dataclass(frozen=True, slots=True)
class TimeSample:
    """A measured batch: its shape and how long it ran, seconds."""

    shape: BatchShape
    duration_s: float


def shape_matrix(shapes: Sequence[BatchShape]) -> np.ndarray:
    return np.array(
        [[s.batch_size, s.input_tokens_max, s.gen_tokens_max] for s in shapes], dtype=np.float64
    ).reshape(len(shapes), 3)


class KnnBatchTimeModel:
    """Distance-weighted KNN over scaled log features; keeps its training samples."""

    name = "knn"

    def __init__(self, n_neighbors: int = 5) -> None:
        if n_neighbors < 1:
            raise ValueError(f"n_neighbors must be >= 1, got {n_neighbors}")
        self.n_neighbors = n_neighbors
        self.samples: list[TimeSample] = []
        self._pipeline: Pipeline | None = None

    def fit(self, samples: Sequence[TimeSample]) -> None:
        if not samples:
            raise ValueError("knn needs at least one sample to fit")
        pipeline = make_pipeline(
            FunctionTransformer(np.log1p),
            StandardScaler(),
            KNeighborsRegressor(n_neighbors=min(self.n_neighbors, len(samples)), weights="distance"),
        )
        pipeline.fit(shape_matrix([s.shape for s in samples]), [s.duration_s for s in samples])
        self._pipeline = pipeline
        self.samples = list(samples)

    def predict(self, shapes: Sequence[BatchShape]) -> np.ndarray:
        """Estimated run time per shape, seconds (>= 0)."""
        if self._pipeline is None:
            raise RuntimeError("knn model is not fitted")
        if not shapes:
            return np.zeros(0)
        return np.maximum(self._pipeline.predict(shape_matrix(shapes)), 0.0)


def mae_s(predicted: np.ndarray, truth: np.ndarray) -> float:
    """Mean absolute error, seconds; 0.0 for empty input."""
    return float(np.mean(np.abs(predicted - truth))) if len(truth) else 0.0


def cross_validated_mae_s(samples: Sequence[TimeSample], n_neighbors: int, num_folds: int = 5) -> float | None:
    """k-fold MAE, seconds, on interleaved folds; None with fewer than 2 samples per fold.

    In-sample error says nothing for a distance-weighted KNN (it is 0 on every training point).
    """
    if len(samples) < 2 * num_folds:
        return None
    errors: list[np.ndarray] = []
    for fold in range(num_folds):
        train = [s for i, s in enumerate(samples) if i % num_folds != fold]
        test = [s for i, s in enumerate(samples) if i % num_folds == fold]
        model = KnnBatchTimeModel(n_neighbors)
        model.fit(train)
        errors.append(np.abs(model.predict([s.shape for s in test]) - [s.duration_s for s in test]))
    return float(np.mean(np.concatenate(errors)))
