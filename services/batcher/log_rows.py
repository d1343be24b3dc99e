"""Rows for the request and batch log, built from the scheduler's state (pure)."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Protocol

from services.batcher.domain import BatchReport, Lease, PendingRequest, RequestResult
from services.shared.db.models import BatchOutcome, RequestStatus


class LogSink(Protocol):
    """Where rows go; the shared LogWriter buffers them and inserts off the request path."""

    def add_request(self, row: dict[str, Any]) -> None: ...

    def add_batch(self, row: dict[str, Any]) -> None: ...


def request_row(
    request: PendingRequest, *, status: RequestStatus, result: RequestResult | None = None, error: str | None = None
) -> dict[str, Any]:
    generation, prediction = request.generation, request.prediction
    return {
        "id": request.request_id,
        "client_request_id": generation.client_request_id or None,
        "tenant_id": generation.tenant_id,
        "instruction": generation.instruction,
        "input_text": generation.user_input,
        "input_tokens": prediction.input_tokens,
        "max_new_tokens": generation.max_new_tokens,
        "predicted_tokens": prediction.predicted_tokens,
        "predictor_version": prediction.model_version or None,
        "is_prediction_fallback": prediction.is_fallback,
        "generated_tokens": result.generated_tokens if result else None,
        "output_text": result.text if result else None,
        "batch_id": result.batch_id if result else None,
        "status": RequestStatus(status),
        "error": error,
        "arrived_at": request.queued_at,
        "started_at": request.started_at,
        "finished_at": result.finished_at if result else None,
    }


def batch_row(
    lease: Lease,
    *,
    outcome: BatchOutcome,
    finished_at: datetime,
    report: BatchReport | None = None,
    actual_gen_tokens_max: int | None = None,
) -> dict[str, Any]:
    batch = lease.batch
    return {
        "id": batch.batch_id,
        "size": batch.size,
        "input_tokens_max": batch.input_tokens_max,
        "predicted_gen_tokens_max": batch.gen_tokens_max,
        "actual_gen_tokens_max": actual_gen_tokens_max,
        "estimated_s": lease.estimated_s,
        "actual_s": report.run_s if report else None,
        "worker_id": lease.worker_id,
        "estimator_version": batch.estimator_version or None,
        "outcome": BatchOutcome(outcome),
        "parent_batch_id": batch.parent_batch_id,
        "valid_tokens": report.valid_tokens if report else None,
        "total_tokens": report.total_tokens if report else None,
        "created_at": lease.started_at,
        "started_at": lease.started_at,
        "finished_at": finished_at,
    }
