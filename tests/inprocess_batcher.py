"""The batcher's real servicers in-process on port 0, with an echo worker and no predictor.

For tests that hammer the public API (fuzzing, security): validation, admission, scheduling and
the RPC wrapper are the real ones; the worker answers every batch at once ("ok", 1 token) and
predictions come from the input-length fallback, so no model or other service is needed.
"""

from __future__ import annotations

import asyncio
import time
from contextlib import asynccontextmanager
from datetime import UTC, datetime

from magnus.v1 import generation_pb2, worker_queue_pb2
from services.batcher.admission import Admission
from services.batcher.config import BatcherSettings
from services.batcher.domain import BatchReport, ItemOutput, Lease, WorkerInfo
from services.batcher.policy.config import make_policy
from services.batcher.predictor_client import fallback_prediction
from services.batcher.scheduler import Clock, Scheduler, SchedulerLimits
from services.batcher.servicer import GenerationServicer, WorkerQueueServicer
from services.shared.auth import AuthSettings
from services.shared.server import ServiceRunner
from services.shared.tls import TlsSettings
from services.shared.tokenizer import get_token_counter

CLOCK = Clock(monotonic_s=time.monotonic, wall=lambda: datetime.now(UTC))
ECHO_WORKER = "echo-worker"


class NullLogSink:
    def add_request(self, row) -> None: ...
    def add_batch(self, row) -> None: ...
    def add_batch_time_sample(self, row) -> None: ...


class FallbackPredictor:
    """Stands in for the coalescer: every request gets the input-length guess at once."""

    async def predict(self, instruction, user_input, input_tokens, max_new_tokens):
        return fallback_prediction(input_tokens, max_new_tokens)


async def echo_worker(scheduler: Scheduler) -> None:
    scheduler.register(WorkerInfo(ECHO_WORKER, 1, 2**50, 0, "echo", "none", time.monotonic()))
    while True:
        pulled = scheduler.pull(ECHO_WORKER)
        lease = pulled if isinstance(pulled, Lease) else await pulled
        outputs = [ItemOutput(r.request_id, "ok", 1) for r in lease.items]
        scheduler.complete(ECHO_WORKER, lease.batch.batch_id, BatchReport(outputs, 0.0, len(outputs), len(outputs)))


@asynccontextmanager
async def inprocess_batcher(
    settings: BatcherSettings | None = None,
    *,
    auth: AuthSettings | None = None,
    tls: TlsSettings | None = None,
    with_worker: bool = True,
    logged_result=None,
):
    """Yields the started ServiceRunner (its `port` and `internal_port` are bound, `.scheduler` set);
    stops everything after. As in the batcher, WorkerQueueService is served on the internal port only.

    Without the echo worker, admitted requests stay queued (overload tests). `logged_result` stands
    in for the log DB's answers to retried ids (services.batcher.logged_results).
    """
    settings = settings or BatcherSettings(port=0, metrics_port=-1)
    policy = make_policy(settings.policy, phi_token_reads=settings.phi_token_reads,
                         fixed_batch_size=settings.fixed_batch_size, max_batch_size=settings.max_batch_size)
    limits = SchedulerLimits(
        max_pending_requests=settings.max_pending_requests,
        max_pending_per_tenant=settings.max_pending_per_tenant,
        lease_s=settings.lease_s,
    )
    scheduler = Scheduler(policy, limits, CLOCK, NullLogSink())
    admission = Admission(scheduler, FallbackPredictor(), get_token_counter(), settings, CLOCK, logged_result)
    runner = ServiceRunner(
        "batcher", settings, auth=auth or AuthSettings(), tls=tls or TlsSettings(), internal_port=0
    )
    runner.add(generation_pb2, "GenerationService", GenerationServicer(admission))
    runner.add(worker_queue_pb2, "WorkerQueueService",
               WorkerQueueServicer(scheduler, lease_s=settings.lease_s, heartbeat_interval_s=1.0, max_wait_s=0.1),
               is_internal=True)
    await runner.start()
    await runner.set_serving(True)
    runner.scheduler = scheduler
    worker = asyncio.create_task(echo_worker(scheduler)) if with_worker else None
    try:
        yield runner
    finally:
        if worker is not None:
            worker.cancel()
        await runner.stop(0)
