"""What differs between the predictor's and the estimator's training rounds.

A round reads log rows after a watermark, turns them into samples with the pure selection rules,
refits the model family of the base version on old + new samples, and scores models on the
held-back rows. `fit` and `evaluate` are CPU-bound and are called on a worker thread.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np
from sqlalchemy.ext.asyncio import AsyncSession

from services.core.knn_model import KnnBatchTimeModel, TimeSample, mae_s
from services.core.length_model import LengthSample, make_length_model
from services.core.length_metrics import length_metrics
from services.shared.db.models import ModelKind
from services.shared.db.queries import fetch_batches, fetch_requests
from services.trainer.config import TrainerSettings
from services.trainer.selection import (
    LoggedBatch,
    LoggedRequest,
    MissRule,
    instruction_counts,
    length_holdout,
    select_length_samples,
    select_time_samples,
    supersede_similar_shapes,
    time_holdout,
)

DEFAULT_LENGTH_MODEL = "per_app_linear"
DEFAULT_NEIGHBORS = 5


class ModelSpec(Protocol):
    kind: str
    error_metric: str  # the metrics key compared between candidate and serving model

    async def fetch(self, session: AsyncSession, since_seq: int, limit: int | None) -> list[Any]: ...

    def select(self, rows: Sequence[Any], base_samples: Sequence[Any]) -> list[Any]:
        """The new training samples among `rows`, given the samples the base version holds."""
        ...

    def holdout(self, rows: Sequence[Any]) -> list[Any]: ...

    def merge(self, base_samples: Sequence[Any], new_samples: Sequence[Any]) -> list[Any]: ...

    def fit(self, base_model: Any | None, samples: list[Any]) -> Any: ...

    def evaluate(self, model: Any, samples: list[Any]) -> dict[str, float]: ...

    def row_errors(self, model: Any, samples: list[Any]) -> np.ndarray:
        """|prediction - truth| per sample, in error_metric's unit, in the samples' order."""
        ...


class PredictorSpec:
    kind = ModelKind.PREDICTOR
    error_metric = "mae_tokens"

    def __init__(self, settings: TrainerSettings) -> None:
        self.rule = MissRule(settings.length_miss_abs_tokens, settings.length_miss_rel)
        self.holdout_every = settings.holdout_every
        self.min_samples_per_instruction = settings.length_min_samples_per_instruction

    async def fetch(self, session: AsyncSession, since_seq: int, limit: int | None) -> list[LoggedRequest]:
        rows = await fetch_requests(session, since_id=since_seq, limit=limit)
        return [
            LoggedRequest(
                seq=r.seq,
                status=r.status,
                instruction=r.instruction,
                input_text=r.input_text,
                input_tokens=r.input_tokens,
                predicted_tokens=r.predicted_tokens,
                generated_tokens=r.generated_tokens,
                is_prediction_fallback=bool(r.is_prediction_fallback),
            )
            for r in rows
        ]

    def select(self, rows: Sequence[LoggedRequest], base_samples: Sequence[LengthSample]) -> list[LengthSample]:
        return select_length_samples(
            rows, self.rule, self.holdout_every, known_counts=instruction_counts(base_samples),
            min_samples_per_instruction=self.min_samples_per_instruction,
        )

    def merge(self, base_samples: Sequence[LengthSample], new_samples: Sequence[LengthSample]) -> list[LengthSample]:
        return [*base_samples, *new_samples]

    def holdout(self, rows: Sequence[LoggedRequest]) -> list[LengthSample]:
        return length_holdout(rows, self.holdout_every)

    def fit(self, base_model: Any | None, samples: list[LengthSample]) -> Any:
        model = make_length_model(base_model.name if base_model is not None else DEFAULT_LENGTH_MODEL)
        model.fit(samples)
        return model

    def evaluate(self, model: Any, samples: list[LengthSample]) -> dict[str, float]:
        predicted = model.predict(
            [s.instruction for s in samples], [s.input_text for s in samples], [s.input_tokens for s in samples]
        )
        return length_metrics(predicted, np.array([s.generated_tokens for s in samples]))

    def row_errors(self, model: Any, samples: list[LengthSample]) -> np.ndarray:
        predicted = model.predict(
            [s.instruction for s in samples], [s.input_text for s in samples], [s.input_tokens for s in samples]
        )
        return np.abs(np.asarray(predicted, dtype=float) - np.array([s.generated_tokens for s in samples], dtype=float))


class EstimatorSpec:
    kind = ModelKind.ESTIMATOR
    error_metric = "mae_s"

    def __init__(self, settings: TrainerSettings) -> None:
        self.rule = MissRule(settings.time_miss_abs_s, settings.time_miss_rel)
        self.holdout_every = settings.holdout_every
        self.supersede_log_radius = settings.time_supersede_log_radius

    async def fetch(self, session: AsyncSession, since_seq: int, limit: int | None) -> list[LoggedBatch]:
        rows = await fetch_batches(session, since_id=since_seq, limit=limit)
        return [
            LoggedBatch(
                seq=r.seq,
                outcome=r.outcome,
                size=r.size,
                input_tokens_max=r.input_tokens_max,
                actual_gen_tokens_max=r.actual_gen_tokens_max,
                estimated_s=r.estimated_s,
                actual_s=r.actual_s,
                is_estimate_fallback=r.estimator_version is None,
            )
            for r in rows
        ]

    def select(self, rows: Sequence[LoggedBatch], base_samples: Sequence[TimeSample]) -> list[TimeSample]:
        return select_time_samples(rows, self.rule, self.holdout_every)

    def merge(self, base_samples: Sequence[TimeSample], new_samples: Sequence[TimeSample]) -> list[TimeSample]:
        kept = supersede_similar_shapes(base_samples, new_samples, log_radius=self.supersede_log_radius)
        return [*kept, *new_samples]

    def holdout(self, rows: Sequence[LoggedBatch]) -> list[TimeSample]:
        return time_holdout(rows, self.holdout_every)

    def fit(self, base_model: Any | None, samples: list[TimeSample]) -> Any:
        n_neighbors = getattr(base_model, "n_neighbors", DEFAULT_NEIGHBORS)
        model = KnnBatchTimeModel(n_neighbors)
        model.fit(samples)
        return model

    def evaluate(self, model: Any, samples: list[TimeSample]) -> dict[str, float]:
        predicted = model.predict([s.shape for s in samples])
        truth = np.array([s.duration_s for s in samples])
        return {"mae_s": round(mae_s(predicted, truth), 4), "num_samples": len(samples)}

    def row_errors(self, model: Any, samples: list[TimeSample]) -> np.ndarray:
        predicted = model.predict([s.shape for s in samples])
        return np.abs(np.asarray(predicted, dtype=float) - np.array([s.duration_s for s in samples], dtype=float))


def make_specs(settings: TrainerSettings) -> dict[str, ModelSpec]:
    return {ModelKind.PREDICTOR: PredictorSpec(settings), ModelKind.ESTIMATOR: EstimatorSpec(settings)}
