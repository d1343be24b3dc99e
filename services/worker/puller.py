"""The worker's pull loop: register, long-poll for a batch, run it off the event loop, report.

The engine blocks for the whole batch, so it runs in a thread (`asyncio.to_thread`) while the event
loop keeps the lease alive with Heartbeat. Every batcher outage is survived with capped
exponential backoff; the loop only ends when asked to stop.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import grpc

from magnus.v1 import worker_queue_pb2 as pb
from magnus.v1 import worker_queue_pb2_grpc as pb_grpc
from services.worker import metrics
from services.worker.engine import BatchCancelled, BatchOutOfMemory, BatchOutput, EngineItem
from services.worker.preemption import Preemption
from services.worker.token_stream import TokenStream
from services.shared.db.models import BatchOutcome

log = logging.getLogger(__name__)

SHUTTING_DOWN_MESSAGE = "worker shutting down"
MAX_FAILURE_MESSAGE_BYTES = 4096
# Codes after which the batcher may no longer know us: register again before pulling.
REREGISTER_CODES = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.FAILED_PRECONDITION,
}


class BatchRunner(Protocol):
    def run(
        self, items: Sequence[EngineItem], cancel: threading.Event | None = None, preemption: Preemption | None = None
    ) -> BatchOutput: ...


@dataclass(frozen=True)
class WorkerIdentity:
    """What RegisterWorker announces."""

    worker_id: str
    kv_bytes_per_token: int  # Delta, bytes
    free_kv_bytes: int  # Theta, bytes
    model_name: str
    device: str
    max_batch_size: int = 0  # requests; 0 = no limit of its own
    max_context_tokens: int = 0  # prompt + max_new_tokens it can run, tokens; 0 = unknown
    # new for every process (every identity built at start-up): tells the batcher a restart from a
    # repeat registration, so it requeues a dead process's leases at once
    incarnation_id: str = field(default_factory=lambda: uuid.uuid4().hex)


@dataclass(frozen=True)
class LoopTiming:
    pull_wait_s: float = 5.0
    rpc_timeout_s: float = 5.0
    heartbeat_interval_s: float = 2.0  # used until the batcher names one
    backoff_initial_s: float = 0.5
    backoff_max_s: float = 10.0
    # continuous mode: PullBatch calls in flight at once (never more than free rows). On an H200 the paged
    # worker served a burst at 80 req/s with one, 96-116 with 8 and 74 with 64 (reports/gpu/serving.md, runs
    # 4-7); with several batches a pull (below) the engine's mixed steps bound it (reports/gpu/serving_e2e_ab)
    max_concurrent_pulls: int = 8
    # continuous mode: batches one PullBatch may lease (its first is waited for, the others only taken if
    # ready), so a burst reaches the rows in a few calls, not one round trip per one-request lease
    max_batches_per_pull: int = 16


@dataclass
class Backoff:
    """Capped exponential delays: initial, 2x initial, ... up to max; `reset` after a success."""

    initial_s: float
    max_s: float
    _next_s: float = field(init=False)

    def __post_init__(self) -> None:
        self._next_s = self.initial_s

    def next_delay_s(self) -> float:
        delay_s = self._next_s
        self._next_s = min(self._next_s * 2, self.max_s)
        return delay_s

    def reset(self) -> None:
        self._next_s = self.initial_s


@dataclass(frozen=True)
class BatchFailure:
    """How a batch in hand failed, as FailBatch reports it (both worker loops build these)."""

    kind: int  # pb.FailureKind
    message: str


class WorkerLoop:
    """Owns the worker's registration, the batch in hand and its lease. Start once, stop once."""

    def __init__(
        self,
        stub: pb_grpc.WorkerQueueServiceStub,
        runner: BatchRunner,
        identity: WorkerIdentity,
        timing: LoopTiming = LoopTiming(),
        on_registered: Callable[[], Awaitable[None]] | None = None,
        token_stream: TokenStream | None = None,
    ) -> None:
        """token_stream: where streamed items' tokens are collected (the runner's sink); None = not streamed."""
        self.stub = stub
        self.token_stream = token_stream
        self.runner = runner
        self.identity = identity
        self.timing = timing
        self.on_registered = on_registered
        self.heartbeat_interval_s = timing.heartbeat_interval_s
        self.lease_s = 30.0
        self.is_registered = False
        self.num_batches_done = 0
        self._backoff = Backoff(timing.backoff_initial_s, timing.backoff_max_s)
        self._stopping = asyncio.Event()
        self._cancel_batch: threading.Event | None = None
        self._task: asyncio.Task[None] | None = None

    def start(self) -> asyncio.Task[None]:
        self._task = asyncio.create_task(self.run(), name=f"worker-loop-{self.identity.worker_id}")
        return self._task

    async def stop(self, grace_s: float) -> None:
        """Stop pulling; let the batch in hand finish within `grace_s`, else cancel and hand it back."""
        self._stopping.set()
        if self._task is None:
            return
        try:
            await asyncio.wait_for(asyncio.shield(self._task), grace_s)
            return
        except TimeoutError:
            pass
        if self._cancel_batch is not None:
            log.warning("batch still running after %.1f s of grace: cancelling it", grace_s)
            self._cancel_batch.set()
        try:  # a cancelled generate stops at its next step; then the failure report goes out
            await asyncio.wait_for(asyncio.shield(self._task), self.timing.rpc_timeout_s * 2)
        except TimeoutError:
            log.error("worker loop did not stop in time; abandoning it")
            self._task.cancel()

    async def run(self) -> None:
        while not self._stopping.is_set():
            if not self.is_registered:
                await self._register()
                continue
            for batch in await self._pull():  # one at most: max_batches defaults to 1
                await self._serve(batch)
        log.info("worker loop stopped after %d batches", self.num_batches_done)

    # ---- registration and pulling -------------------------------------------------------------

    async def _register(self) -> None:
        ident = self.identity
        request = pb.RegisterWorkerRequest(
            worker_id=ident.worker_id,
            kv_bytes_per_token=ident.kv_bytes_per_token,
            free_kv_bytes=ident.free_kv_bytes,
            model_name=ident.model_name,
            device=ident.device,
            max_batch_size=ident.max_batch_size,
            max_context_tokens=ident.max_context_tokens,
            incarnation_id=ident.incarnation_id,
        )
        try:
            response = await self.stub.RegisterWorker(request, timeout=self.timing.rpc_timeout_s)
        except grpc.aio.AioRpcError as error:
            await self._back_off("RegisterWorker", error)
            return
        self.lease_s = response.lease_s or self.lease_s
        self.heartbeat_interval_s = response.heartbeat_interval_s or self.timing.heartbeat_interval_s
        self.is_registered = True
        self._backoff.reset()
        log.info(
            "registered as %s (lease %.1f s, heartbeat every %.1f s)",
            ident.worker_id, self.lease_s, self.heartbeat_interval_s,
        )
        if self.on_registered is not None:
            await self.on_registered()

    async def _pull(self, max_batches: int = 1) -> list[pb.Batch]:
        """The batches one PullBatch leased (none when its wait elapsed, it failed or we are stopping)."""
        wait_s = self.timing.pull_wait_s
        request = pb.PullBatchRequest(worker_id=self.identity.worker_id, wait_s=wait_s, max_batches=max_batches)
        call = asyncio.ensure_future(self.stub.PullBatch(request, timeout=wait_s + self.timing.rpc_timeout_s))
        stop = asyncio.ensure_future(self._stopping.wait())
        await asyncio.wait({call, stop}, return_when=asyncio.FIRST_COMPLETED)
        stop.cancel()
        if not call.done():
            # Stopping: a batch leased to us in this instant is requeued when its lease expires.
            call.cancel()
            return []
        try:
            response = call.result()
        except grpc.aio.AioRpcError as error:
            if error.code() != grpc.StatusCode.DEADLINE_EXCEEDED:
                await self._back_off("PullBatch", error)
            return []
        self._backoff.reset()
        if response.HasField("batch"):
            return [response.batch, *response.more_batches[: max_batches - 1]]
        await self._idle_heartbeat()
        return []

    async def _idle_heartbeat(self) -> None:
        """Between pulls, learn whether the batcher still knows us (it may have restarted)."""
        try:
            response = await self.stub.Heartbeat(
                pb.HeartbeatRequest(worker_id=self.identity.worker_id), timeout=self.timing.rpc_timeout_s
            )
        except grpc.aio.AioRpcError as error:
            log.debug("idle heartbeat failed: %s", error.code().name)
            return
        if not response.is_registered:
            log.info("batcher does not know this worker any more: registering again")
            self.is_registered = False

    async def _back_off(self, rpc: str, error: grpc.aio.AioRpcError) -> None:
        if error.code() in REREGISTER_CODES:
            self.is_registered = False
        delay_s = self._backoff.next_delay_s()
        log.warning(
            "%s to batcher failed (%s: %s); retrying in %.1f s",
            rpc, error.code().name, error.details(), delay_s,
        )
        await self._sleep_unless_stopping(delay_s)

    async def _sleep_unless_stopping(self, delay_s: float) -> None:
        try:
            await asyncio.wait_for(self._stopping.wait(), delay_s)
        except TimeoutError:
            pass

    # ---- one batch ------------------------------------------------------------------------------

    def _open_stream(self, batch: pb.Batch) -> list[EngineItem]:
        """The batch's engine items; its streamed ones start streaming (close_stream when it ends)."""
        if self.token_stream is not None:
            self.token_stream.open(batch.batch_id, [i.request_id for i in batch.items if i.is_streamed])
        is_streamed = self.token_stream is not None
        return [EngineItem(i.request_id, i.prompt, i.max_new_tokens, is_streamed and i.is_streamed, i.predicted_tokens)
                for i in batch.items]

    def _close_stream(self, batch_id: str) -> None:
        if self.token_stream is not None:
            self.token_stream.close(batch_id)

    async def _serve(self, batch: pb.Batch) -> None:
        items = self._open_stream(batch)
        log.info("batch %s: %d requests, L=%d", batch.batch_id, len(items), batch.input_tokens_max)
        lease_s = batch.lease_s or self.lease_s
        cancel = self._cancel_batch = threading.Event()
        lease_lost = asyncio.Event()
        heartbeats = asyncio.create_task(self._heartbeat_while_running(batch.batch_id, lease_lost, cancel))
        started_s = time.monotonic()
        metrics.IS_BUSY.set(1)
        try:
            outcome = await self._run_batch(items, cancel, preemption_of(batch))
        finally:
            metrics.IS_BUSY.set(0)
            heartbeats.cancel()
            self._cancel_batch = None
            self._close_stream(batch.batch_id)
        observe_outcome(outcome, time.monotonic() - started_s)
        if lease_lost.is_set():
            log.info("batch %s: lease lost (requeued by the batcher); result dropped", batch.batch_id)
            return
        await self._report(batch.batch_id, outcome, lease_s)
        self.num_batches_done += 1

    async def _run_batch(
        self, items: list[EngineItem], cancel: threading.Event, preemption: Preemption | None
    ) -> BatchOutput | BatchFailure:
        try:
            return await asyncio.to_thread(self.runner.run, items, cancel, preemption)
        except BatchOutOfMemory as error:
            log.warning("batch ran out of memory: %s", error)
            return BatchFailure(pb.FAILURE_KIND_OUT_OF_MEMORY, str(error))
        except BatchCancelled:
            return BatchFailure(pb.FAILURE_KIND_WORKER_STOPPING, SHUTTING_DOWN_MESSAGE)
        except Exception as error:  # noqa: BLE001 - any engine error becomes a report, the worker lives on
            log.exception("batch failed")
            return BatchFailure(pb.FAILURE_KIND_OTHER, f"{type(error).__name__}: {error}")

    async def _heartbeat_while_running(
        self,
        batch_id: str,
        lease_lost: asyncio.Event,
        cancel: threading.Event,
        on_cancelled: Callable[[Sequence[str]], None] | None = None,
    ) -> None:
        """Renew the lease until cancelled. on_cancelled(request ids): requests of the batch whose
        callers left, as the batcher repeats them on every renewal (a static batch keeps running
        them: its rows cannot leave early; every caller gone, the lease is refused and it stops)."""
        request = pb.HeartbeatRequest(worker_id=self.identity.worker_id, batch_id=batch_id)
        while True:
            await asyncio.sleep(self.heartbeat_interval_s)
            try:
                response = await self.stub.Heartbeat(request, timeout=self.timing.rpc_timeout_s)
            except grpc.aio.AioRpcError as error:
                # The batcher decides the lease; keep working and keep trying until it says no.
                log.warning("heartbeat for batch %s failed: %s", batch_id, error.code().name)
                continue
            if not response.is_registered:
                self.is_registered = False
            if not response.is_lease_valid:
                lease_lost.set()
                cancel.set()  # the batch was requeued or abandoned: finishing it would only waste the device
                return
            if on_cancelled is not None and response.cancelled_request_ids:
                on_cancelled(response.cancelled_request_ids)

    async def _report(self, batch_id: str, outcome: BatchOutput | BatchFailure, lease_s: float) -> None:
        """Send the result, retrying while the lease could still be alive."""
        worker_id = self.identity.worker_id
        if isinstance(outcome, BatchFailure):
            message = outcome.message.encode()[:MAX_FAILURE_MESSAGE_BYTES].decode(errors="ignore")
            rpc_name, rpc = "ReportBatchFailure", self.stub.ReportBatchFailure
            request = pb.ReportBatchFailureRequest(
                worker_id=worker_id, batch_id=batch_id, kind=outcome.kind, message=message
            )
        else:
            rpc_name, rpc = "CompleteBatch", self.stub.CompleteBatch
            request = completion_request(worker_id, batch_id, outcome)
        deadline_s = asyncio.get_running_loop().time() + lease_s
        response = await call_while_lease_lives(rpc, request, f"{rpc_name} for batch {batch_id}", deadline_s, self.timing)
        if response is not None and not response.is_accepted:
            log.info("%s for batch %s not accepted: the lease had moved on", rpc_name, batch_id)


RETRIED_CODES = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


async def call_while_lease_lives(rpc, request, what: str, deadline_s: float, timing: LoopTiming, *,
                                 raised: tuple[grpc.StatusCode, ...] = ()):
    """`rpc(request)`'s response, retried with backoff while the batcher may be briefly away and a retry
    could still land before `deadline_s` (loop time: the lease's end); None once it failed for good.
    Errors with a code in `raised` are the caller's to handle (e.g. UNIMPLEMENTED by an older batcher)."""
    loop = asyncio.get_running_loop()
    backoff = Backoff(timing.backoff_initial_s, timing.backoff_max_s)
    while True:
        try:
            return await rpc(request, timeout=timing.rpc_timeout_s)
        except grpc.aio.AioRpcError as error:
            if error.code() in raised:
                raise
            delay_s = backoff.next_delay_s()
            if error.code() not in RETRIED_CODES or loop.time() + delay_s > deadline_s:
                log.warning("%s failed for good: %s", what, error.code().name)
                return None
            log.warning("%s failed (%s); retrying in %.1f s", what, error.code().name, delay_s)
            await asyncio.sleep(delay_s)


def observe_outcome(outcome: BatchOutput | BatchFailure, busy_s: float) -> None:
    """The worker's batch metrics for one batch's end (both worker loops)."""
    if isinstance(outcome, BatchFailure):
        failed = BatchOutcome.OOM if outcome.kind == pb.FAILURE_KIND_OUT_OF_MEMORY else BatchOutcome.FAILED
        metrics.observe_batch(failed, busy_s)
        return
    metrics.observe_batch(
        BatchOutcome.OK, busy_s, run_s=outcome.run_s, valid_tokens=outcome.valid_tokens, total_tokens=outcome.total_tokens
    )


def preemption_of(batch: pb.Batch) -> Preemption | None:
    """The batcher's straggler cut for this batch: after its planned G(B) steps, at most preempt_max_rows."""
    if batch.preempt_max_rows < 1:
        return None
    return Preemption(after_steps=max(1, batch.predicted_gen_tokens_max), max_rows=batch.preempt_max_rows)


def completion_request(worker_id: str, batch_id: str, output: BatchOutput) -> pb.CompleteBatchRequest:
    return pb.CompleteBatchRequest(
        worker_id=worker_id,
        batch_id=batch_id,
        results=[
            pb.ItemResult(
                request_id=o.request_id, text=o.text, generated_tokens=o.generated_tokens, is_preempted=o.is_preempted
            )
            for o in output.items
        ],
        run_s=output.run_s,
        valid_tokens=output.valid_tokens,
        total_tokens=output.total_tokens,
    )
