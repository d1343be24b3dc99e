"""Worker wiring: health server, model loading, the pull loop, and shutdown.

The worker serves no RPCs of its own (it pulls from the batcher), only gRPC health: SERVING once
the model is loaded and the batcher has accepted the registration.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import replace

from magnus.v1 import worker_queue_pb2_grpc as pb_grpc
from services.shared.channels import open_channel
from services.shared.server import ServiceRunner
from services.worker import metrics
from services.worker.calibrate import calibrate_if_missing
from services.worker.config import WorkerSettings
from services.worker.continuous import ContinuousBatcher
from services.worker.continuous_loop import ContinuousWorkerLoop
from services.worker.engine import StaticBatchEngine
from services.worker.model_builder import resolve_model_dir
from services.worker.paged.scheduler import SchedulerConfig
from services.worker.paged.serving import PagedBatcher, build_paged_engine
from services.worker.puller import LoopTiming, WorkerIdentity, WorkerLoop
from services.worker.slowdown import slow_down
from services.worker.token_stream import TokenStream, TokenStreamer

log = logging.getLogger(__name__)


def load_engine(settings: WorkerSettings) -> StaticBatchEngine:
    """Blocking: build the default model if needed, then load it (seconds to minutes)."""
    return StaticBatchEngine(
        resolve_model_dir(settings.model),
        device=settings.device,
        dtype=settings.dtype,
        cpu_kv_budget_bytes=settings.kv_budget_bytes,
        cuda_reserve_bytes=settings.cuda_reserve_bytes,
        simulate_oom_above_tokens=settings.simulate_oom_above_tokens,
        backend="hf" if settings.backend == "paged" else settings.backend,  # paged: its own runner, built later
        use_cuda_graphs=settings.use_cuda_graphs,
        trace_replay=settings.trace_replay,
        max_cuda_graphs=settings.max_cuda_graphs,
        graph_length_bucket_tokens=settings.graph_length_bucket_tokens,
        batch_bucket_rows=settings.batch_bucket_rows,
    )


def paged_batcher(settings: WorkerSettings, engine: StaticBatchEngine) -> PagedBatcher:
    """Blocking: the paged engine over `engine`'s model (weights copied, KV pool allocated)."""
    config = SchedulerConfig(
        max_running=settings.paged_max_running, token_budget=settings.paged_token_budget,
        admission=settings.admission, margin=settings.admission_margin, order=settings.paged_order,
        preempt_rule=settings.paged_preempt_rule, draft_tokens=settings.paged_draft_tokens,
        draft_max_rows=settings.paged_draft_max_rows,
    )
    paged = build_paged_engine(engine, config, block_tokens=settings.paged_block_tokens,
                               cpu_kv_budget_bytes=settings.kv_budget_bytes,
                               cuda_reserve_bytes=settings.cuda_reserve_bytes, use_cuda_graphs=settings.use_cuda_graphs,
                               mixed_graphs=settings.paged_mixed_graphs, overlap=settings.paged_overlap)
    return PagedBatcher(engine, paged)


MAX_PROTO_INT32 = 2**31 - 1


def context_tokens_of(settings: WorkerSettings, engine: StaticBatchEngine, pool_tokens: int | None = None) -> int:
    """Longest prompt + max_new_tokens this worker runs, tokens, as announced (0 = unknown): the
    model's context, lowered by the setting, and in continuous mode by the KV pool (a longer request
    would be refused by the engine)."""
    limits = [engine.max_context_tokens, settings.max_context_tokens or MAX_PROTO_INT32]
    if pool_tokens is not None:
        limits.append(pool_tokens)
    context_tokens = min(limits)
    return context_tokens if context_tokens < MAX_PROTO_INT32 else 0  # a model without a stated context


def identity_of(settings: WorkerSettings, engine: StaticBatchEngine, pool_tokens: int | None = None) -> WorkerIdentity:
    """What this worker process registers as (a new incarnation id every call: once per start)."""
    return WorkerIdentity(
        worker_id=settings.worker_id,
        kv_bytes_per_token=engine.kv_bytes_per_token,
        free_kv_bytes=engine.free_kv_bytes,
        model_name=settings.model or engine.model_dir.name,
        device=engine.device_name,
        max_batch_size=settings.max_batch_size,
        max_context_tokens=context_tokens_of(settings, engine, pool_tokens),
    )


def timing_of(settings: WorkerSettings) -> LoopTiming:
    return LoopTiming(
        pull_wait_s=settings.pull_wait_s,
        max_concurrent_pulls=settings.max_concurrent_pulls,
        max_batches_per_pull=settings.max_batches_per_pull,
        rpc_timeout_s=settings.rpc_timeout_s,
        heartbeat_interval_s=settings.heartbeat_interval_s,
        backoff_initial_s=settings.backoff_initial_s,
        backoff_max_s=settings.backoff_max_s,
    )


async def serve(
    settings: WorkerSettings,
    engine: StaticBatchEngine | None = None,
    runner: ServiceRunner | None = None,
) -> None:
    """Run the worker until SIGTERM/SIGINT; the batch in hand finishes within the shutdown grace.

    `engine` and `runner` are for tests: a preloaded engine, and a runner to request shutdown on.
    """
    runner = runner or ServiceRunner("worker", settings)
    await runner.start()
    load_task = asyncio.create_task(asyncio.to_thread(load_engine, settings)) if engine is None else None
    shutdown = asyncio.create_task(runner.wait_for_shutdown())
    if load_task is not None:
        await asyncio.wait({load_task, shutdown}, return_when=asyncio.FIRST_COMPLETED)
        if not load_task.done():  # asked to stop while loading: nothing was pulled, just leave
            await runner.stop()
            return
        engine = load_task.result()
    if settings.mode == "static":  # a continuous worker runs one batch size: it warms that one below
        await asyncio.to_thread(engine.warm_up, settings.warmup_batch_rows, settings.warmup_attend_tokens)
    if settings.calibrate_grid:
        await calibrate_if_missing(engine, settings.calibrate_grid, settings.database_url)

    async def on_registered() -> None:
        await runner.set_serving(True)

    channel = open_channel(settings.batcher_target, settings.max_message_bytes)
    stub = pb_grpc.WorkerQueueServiceStub(channel)
    token_stream, streamer = None, None
    if settings.stream_interval_ms > 0 and getattr(engine, "tokenizer", None) is not None:  # fakes have none
        token_stream = TokenStream(engine.tokenizer)
        engine.token_sink = token_stream
        streamer = TokenStreamer(stub, token_stream, settings.worker_id, settings.stream_interval_ms / 1e3,
                                 settings.rpc_timeout_s)
        streamer.start()
    continuous: ContinuousBatcher | PagedBatcher | None = None
    if settings.mode == "continuous" and settings.backend == "paged":
        continuous = await asyncio.to_thread(paged_batcher, settings, engine)
        metrics.track_paged(continuous.engine.scheduler)
        await asyncio.to_thread(continuous.warm_up)
        continuous.start()
        # Theta = the block pool, which one request may fill alone
        identity = replace(identity_of(settings, engine, continuous.capacity_tokens),
                           free_kv_bytes=continuous.capacity_tokens * engine.kv_bytes_per_token,
                           max_batch_size=continuous.slots)
    elif settings.mode == "continuous":
        continuous = ContinuousBatcher(engine, settings.continuous_slots)  # ValueError without the static backend
        await asyncio.to_thread(continuous.warm_up, settings.warmup_attend_tokens)
        continuous.start()
        # a request holds one row, or the whole pool (Theta, as announced) alone once the rows drained
        identity = replace(identity_of(settings, engine, engine.static.capacity_tokens),
                           max_batch_size=settings.continuous_slots)
    if continuous is not None:
        loop: WorkerLoop = ContinuousWorkerLoop(stub, continuous, identity, timing_of(settings),
                                                on_registered=on_registered, token_stream=token_stream)
    else:
        loop = WorkerLoop(
            stub,
            slow_down(engine, settings.slowdown_factor, settings.slowdown_step_s),
            identity_of(settings, engine),
            timing_of(settings),
            on_registered=on_registered,
            token_stream=token_stream,
        )
    loop_task = loop.start()
    await asyncio.wait({loop_task, shutdown}, return_when=asyncio.FIRST_COMPLETED)
    if loop_task.done() and not loop_task.cancelled() and loop_task.exception() is not None:
        log.error("worker loop crashed", exc_info=loop_task.exception())
    await runner.set_serving(False)
    await loop.stop(settings.shutdown_grace_s)
    if continuous is not None:  # the loop hands work back; the decode thread is the engine's
        await asyncio.to_thread(continuous.stop, True)
    if streamer is not None:
        await streamer.stop()
    await channel.close()
    await runner.stop()
