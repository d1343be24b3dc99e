"""Builders for driving the Scheduler alone (no gRPC, no GPU): a settable clock, a log sink that keeps
its rows, requests, workers and a one-call lease. The event loop fixture is in conftest.py."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

from services.batcher.domain import GenerationInput, Lease, PendingRequest, Prediction, WorkerInfo
from services.batcher.policy.config import make_policy
from services.batcher.scheduler import Clock, Scheduler, SchedulerLimits


class FakeClock:
    """A monotonic clock the test moves by setting `now_s`."""

    def __init__(self) -> None:
        self.now_s = 1000.0

    def clock(self) -> Clock:
        return Clock(monotonic_s=lambda: self.now_s, wall=lambda: datetime.now(UTC))


class Sink:
    """A log sink that keeps the request and batch rows the scheduler writes."""

    def __init__(self) -> None:
        self.requests: list[dict] = []
        self.batches: list[dict] = []

    def add_request(self, row) -> None:
        self.requests.append(row)

    def add_batch(self, row) -> None:
        self.batches.append(row)


def make_request(
    i: int, loop: asyncio.AbstractEventLoop, *, now_s: float = 1000.0, max_new: int = 16,
    predicted_tokens: int | None = None, input_tokens: int = 20, deadline_s: float | None = None,
) -> PendingRequest:
    """Request `r{i}` arriving at `now_s`; predicted at `max_new` tokens unless `predicted_tokens` is given."""
    predicted = max_new if predicted_tokens is None else predicted_tokens
    return PendingRequest(
        request_id=f"r{i}", generation=GenerationInput("do", f"input {i}", max_new, "", "t"),
        prediction=Prediction(input_tokens=input_tokens, predicted_tokens=predicted, model_version=1,
                              is_fallback=False),
        prompt=f"prompt {i}", arrival_s=now_s, queued_at=datetime.now(UTC), future=loop.create_future(),
        deadline_s=deadline_s,
    )


def worker(worker_id: str = "w", *, context: int = 0, incarnation: str = "", max_batch_size: int = 0) -> WorkerInfo:
    return WorkerInfo(worker_id, 1, 2**40, max_batch_size, "m", "cpu", 0.0, max_context_tokens=context,
                      incarnation_id=incarnation)


def scheduler_with(fake: FakeClock, policy: str = "vs", **limits) -> tuple[Scheduler, Sink]:
    sink = Sink()
    config = make_policy(policy, phi_token_reads=1e4, fixed_batch_size=32, max_batch_size=None)
    return Scheduler(config, SchedulerLimits(**limits), fake.clock(), sink), sink


def lease(scheduler: Scheduler, worker_id: str = "w") -> Lease:
    pulled = scheduler.pull(worker_id)
    assert isinstance(pulled, Lease), "a batch was queued"
    return pulled
