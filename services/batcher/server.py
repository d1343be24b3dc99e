"""Batcher process wiring: scheduler, clients, log writer, servicers, background tasks, drain."""

from __future__ import annotations

import asyncio
import logging
import time
from datetime import UTC, datetime

from magnus.v1 import generation_pb2, worker_queue_pb2
from services.batcher import metrics as batcher_metrics
from services.batcher.admission import Admission
from services.batcher.config import BatcherSettings
from services.batcher.estimate_refresher import EstimateRefresher
from services.batcher.logged_results import LoggedResultLookup
from services.batcher.policy.config import make_policy
from services.batcher.policy.pack_cost import LinearBatchCost
from services.batcher.predictor_client import PredictionCoalescer
from services.batcher.scheduler import Clock, Scheduler, SchedulerLimits
from services.batcher.servicer import GenerationServicer, WorkerQueueServicer
from services.shared.channels import open_channel
from services.shared.db import LogWriter, make_engine, make_session_factory, migrate
from services.shared.errors import Unavailable
from services.shared.server import ServiceRunner
from services.shared.tokenizer import get_token_counter

log = logging.getLogger(__name__)

SYSTEM_CLOCK = Clock(monotonic_s=time.monotonic, wall=lambda: datetime.now(UTC))


async def _expire_leases(scheduler: Scheduler, period_s: float) -> None:
    while True:
        await asyncio.sleep(period_s)
        scheduler.expire()


async def _drain(scheduler: Scheduler, timeout_s: float) -> None:
    """Stop admitting; let workers finish what is queued and leased; then answer the rest."""
    scheduler.begin_drain()
    deadline_s = time.monotonic() + timeout_s
    if scheduler.num_in_flight:
        log.info("draining %d requests (up to %.0f s)", scheduler.num_in_flight, timeout_s)
    while scheduler.num_in_flight and time.monotonic() < deadline_s:
        await asyncio.sleep(0.05)
    if scheduler.num_in_flight:
        log.warning("drain timed out; answering %d requests with UNAVAILABLE", scheduler.num_in_flight)
        scheduler.fail_all(Unavailable("batcher shut down before the request ran; retry"))


async def serve(settings: BatcherSettings) -> None:
    await asyncio.to_thread(migrate.upgrade, settings.database_url)
    engine = make_engine(settings.database_url)
    session_factory = make_session_factory(engine)
    log_writer = LogWriter(session_factory)
    log_writer.start()
    batcher_metrics.track_log_writer(log_writer)

    policy = make_policy(
        settings.policy,
        phi_token_reads=settings.phi_token_reads,
        fixed_batch_size=settings.fixed_batch_size,
        max_batch_size=settings.max_batch_size,
        memory_fill_fraction=settings.memory_fill_fraction,
        pack_cost=LinearBatchCost(
            settings.pack_prefill_s_per_token, settings.pack_step_base_s,
            settings.pack_step_s_per_row, settings.pack_step_s_per_kv_token,
        ),
    )
    limits = SchedulerLimits(
        max_pending_requests=settings.max_pending_requests,
        max_pending_per_tenant=settings.max_pending_per_tenant,
        lease_s=settings.lease_s,
        worker_timeout_s=settings.worker_timeout_s,
        max_batch_failures=settings.max_batch_failures,
        max_context_tokens=settings.max_context_tokens,
        max_queue_wait_s=settings.max_queue_wait_s,
        deadline_headroom=settings.deadline_headroom,
        preempt_share=settings.preempt_share,
    )
    scheduler = Scheduler(policy, limits, SYSTEM_CLOCK, log_writer)
    predictor_channel = open_channel(settings.predictor_target, settings.max_message_bytes)
    estimator_channel = open_channel(settings.estimator_target, settings.max_message_bytes)
    coalescer = PredictionCoalescer(
        predictor_channel,
        window_s=settings.predictor_window_s,
        max_batch=settings.predictor_max_batch,
        deadline_s=settings.predictor_deadline_s,
        plan_quantile=settings.plan_quantile,
    )
    refresher = EstimateRefresher(
        scheduler, estimator_channel, deadline_s=settings.estimator_deadline_s, idle_s=settings.estimate_idle_s
    )
    admission = Admission(
        scheduler, coalescer, get_token_counter(), settings, SYSTEM_CLOCK,
        logged_result=LoggedResultLookup(session_factory),
    )

    # Workers' API on its own listener: a forged worker on the client network cannot even reach
    # it, whether or not auth is configured (README, "who may call what").
    runner = ServiceRunner("batcher", settings, internal_port=settings.internal_port)
    runner.add(generation_pb2, "GenerationService", GenerationServicer(admission))
    runner.add(
        worker_queue_pb2,
        "WorkerQueueService",
        WorkerQueueServicer(
            scheduler,
            lease_s=settings.lease_s,
            heartbeat_interval_s=settings.heartbeat_interval_s,
            max_wait_s=settings.pull_wait_s,
        ),
        is_internal=True,
    )
    await runner.start()
    tasks = [
        asyncio.create_task(refresher.run(), name="estimate-refresher"),
        asyncio.create_task(_expire_leases(scheduler, min(1.0, settings.lease_s / 4)), name="lease-expiry"),
    ]
    log.info("batcher ready: policy=%s, Phi=%.0f token reads", policy.name, settings.phi_token_reads)
    await runner.set_serving(True)
    await runner.wait_for_shutdown()

    await runner.health.enter_graceful_shutdown()
    await _drain(scheduler, settings.drain_timeout_s)
    await runner.stop()
    for task in tasks:
        task.cancel()
    await coalescer.close()
    await predictor_channel.close()
    await estimator_channel.close()
    await log_writer.close()
    await engine.dispose()
