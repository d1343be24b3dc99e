"""The worker's pull loop in continuous mode: pull whenever a row of the running batch is free.

Every pulled batch (one request under the batcher's `ccb` policy) becomes its own asyncio task: its
items go to the ContinuousBatcher, its lease is heartbeated while they decode, and it is reported
once its last item ended. One PullBatch may lease several batches (up to the free rows it was asked
for) and finished batches are reported several per call (completions.py): ~3x fewer calls in an
H200 burst, at the same throughput (reports/gpu/serving_e2e_ab: the engine's mixed steps bound it).
Registration, pulling, backoff, heartbeats and failure reports are WorkerLoop's.
The ContinuousBatcher's thread is started and stopped by whoever built it (the server).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import Future

from magnus.v1 import worker_queue_pb2 as pb
from magnus.v1 import worker_queue_pb2_grpc as pb_grpc
from services.worker import metrics
from services.worker.completions import CompletionSender
from services.worker.continuous import ContinuousBatcher, ContinuousResult
from services.worker.engine import BatchCancelled, BatchOutOfMemory, BatchOutput
from services.worker.puller import (
    SHUTTING_DOWN_MESSAGE,
    LoopTiming,
    WorkerIdentity,
    WorkerLoop,
    BatchFailure,
    observe_outcome,
    completion_request,
)
from services.worker.token_stream import TokenStream

log = logging.getLogger(__name__)

DEFAULT_TIMING = LoopTiming()


class ContinuousWorkerLoop(WorkerLoop):
    """Owns the registration and every batch in hand (several at once). Start once, stop once."""

    def __init__(
        self,
        stub: pb_grpc.WorkerQueueServiceStub,
        runner: ContinuousBatcher,
        identity: WorkerIdentity,
        timing: LoopTiming = DEFAULT_TIMING,
        on_registered: Callable[[], Awaitable[None]] | None = None,
        token_stream: TokenStream | None = None,
    ) -> None:
        super().__init__(stub, runner, identity, timing, on_registered, token_stream)
        self._slot_freed = asyncio.Event()
        self._batches: dict[asyncio.Task[None], list[Future]] = {}  # batch task -> its item futures
        self._busy_since_s = 0.0
        self._completions = CompletionSender(stub, identity.worker_id, timing)

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        self.runner.on_slot_freed = lambda: _call_soon(loop, self._slot_freed.set)
        pulls: dict[asyncio.Task[list[pb.Batch]], int] = {}  # a pull in flight -> the batches it may bring
        try:
            while not self._stopping.is_set():
                if not self.is_registered:
                    if pulls:  # let the calls of the old registration end first
                        await self._take_pulled(pulls, wait_for_slot=False)
                    else:
                        await self._register()
                    continue
                # each batch a pull may bring is a row's work (one request under ccb): never ask for more than
                # the free rows, in up to max_concurrent_pulls calls
                unasked_rows = self.runner.free_slots() - sum(pulls.values())
                while unasked_rows > 0 and len(pulls) < self.timing.max_concurrent_pulls:
                    asked = min(unasked_rows, self.timing.max_batches_per_pull)
                    pulls[asyncio.create_task(self._pull(asked))] = asked
                    unasked_rows -= asked
                if pulls:
                    await self._take_pulled(pulls, wait_for_slot=True)
                else:
                    await self._wait_for_slot()
            if pulls:  # stopping: each call leaves its wait at once; what one still brought is served
                await self._take_pulled(pulls, wait_for_slot=False, every=True)
        finally:
            self.runner.on_slot_freed = None
        log.info("continuous worker loop stopped pulling after %d batches", self.num_batches_done)

    async def stop(self, grace_s: float) -> None:
        """Stop pulling; let the batches in hand finish within `grace_s`, else cancel and hand them back."""
        self._stopping.set()
        if self._task is not None:  # it only has to leave its pull or wait
            await asyncio.wait({self._task}, timeout=self.timing.rpc_timeout_s * 2)
        try:
            await self._stop_batches(grace_s)
        finally:
            await self._completions.close()

    async def _stop_batches(self, grace_s: float) -> None:
        if not self._batches:
            return
        _, running = await asyncio.wait(set(self._batches), timeout=grace_s)
        if not running:
            return
        log.warning("%d batches still running after %.1f s of grace: cancelling them", len(running), grace_s)
        for task in running:
            for future in self._batches.get(task, ()):
                future.cancel()  # the row frees at the next step; the batch reports "shutting down"
        _, running = await asyncio.wait(running, timeout=self.timing.rpc_timeout_s * 2)
        for task in running:
            log.error("batch task %s did not end in time; abandoning it", task.get_name())
            task.cancel()

    async def _take_pulled(self, pulls: dict[asyncio.Task[list[pb.Batch]], int], *, wait_for_slot: bool,
                           every: bool = False) -> None:
        """Wait until a pull ends (all of them when `every`; or a row frees, to pull for it too) and
        start the batches the ended ones brought."""
        self._slot_freed.clear()
        waiters: set[asyncio.Future] = set(pulls)
        slot = asyncio.ensure_future(self._slot_freed.wait()) if wait_for_slot and not every else None
        if slot is not None:
            waiters.add(slot)
        await asyncio.wait(waiters, return_when=asyncio.ALL_COMPLETED if every else asyncio.FIRST_COMPLETED)
        if slot is not None:
            slot.cancel()
        for task in [t for t in pulls if t.done()]:
            del pulls[task]
            if task.cancelled():
                continue
            if task.exception() is not None:
                log.error("a pull crashed", exc_info=task.exception())
                continue
            for batch in task.result():
                self._start_batch(batch)

    async def _wait_for_slot(self) -> None:
        self._slot_freed.clear()
        if self.runner.free_slots() > 0:  # freed between the caller's check and the clear
            return
        waiters = {asyncio.ensure_future(self._slot_freed.wait()), asyncio.ensure_future(self._stopping.wait())}
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        for waiter in waiters:
            waiter.cancel()

    # ---- one batch ------------------------------------------------------------------------------

    def _start_batch(self, batch: pb.Batch) -> None:
        items = self._open_stream(batch)
        # debug: a continuous worker starts ~100 one-request batches a second under load
        log.debug("batch %s: %d requests, L=%d", batch.batch_id, len(items), batch.input_tokens_max)
        # submitted before the next free_slots() check, so the loop does not pull for these rows again
        futures = [self.runner.submit(item) for item in items]
        if not self._batches:
            self._busy_since_s = time.monotonic()
            metrics.IS_BUSY.set(1)
        task = asyncio.create_task(self._serve_batch(batch, futures), name=f"batch-{batch.batch_id}")
        self._batches[task] = futures
        task.add_done_callback(self._batch_done)

    def _batch_done(self, task: asyncio.Task[None]) -> None:
        self._batches.pop(task, None)
        if not task.cancelled() and task.exception() is not None:
            log.error("batch task %s crashed", task.get_name(), exc_info=task.exception())
        if not self._batches:  # busy time is wall time with any batch in hand, not summed per batch
            metrics.BUSY_SECONDS.inc(time.monotonic() - self._busy_since_s)
            metrics.IS_BUSY.set(0)

    async def _serve_batch(self, batch: pb.Batch, futures: list[Future]) -> None:
        lease_s = batch.lease_s or self.lease_s
        lease_lost = asyncio.Event()
        future_of = {item.request_id: future for item, future in zip(batch.items, futures, strict=True)}
        dropped: set[str] = set()  # requests whose callers left: their rows free, their results are not sent

        def drop(request_ids: Sequence[str]) -> None:
            for request_id in set(request_ids) - dropped:
                future = future_of.get(request_id)
                if future is not None:
                    dropped.add(request_id)
                    _cancel([future])  # the engine thread frees its row before its next step

        # the heartbeat's cancel event is for WorkerLoop's blocking runner; here a lost lease cancels futures
        heartbeats = asyncio.create_task(
            self._heartbeat_while_running(batch.batch_id, lease_lost, threading.Event(), on_cancelled=drop)
        )
        results = asyncio.gather(*(asyncio.wrap_future(f) for f in futures), return_exceptions=True)
        lost = asyncio.ensure_future(lease_lost.wait())
        try:
            await asyncio.wait({results, lost}, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            _cancel(futures)
            raise
        finally:
            heartbeats.cancel()
            lost.cancel()
            self._close_stream(batch.batch_id)
        if lease_lost.is_set():
            _cancel(futures)  # the batch was requeued: finishing it would only waste the device
            log.info("batch %s: lease lost (requeued by the batcher); result dropped", batch.batch_id)
            return
        kept = [r for item, r in zip(batch.items, results.result(), strict=True) if item.request_id not in dropped]
        if not kept:  # every caller left; the batcher has revoked the lease already
            log.info("batch %s: every request's caller left; nothing to report", batch.batch_id)
            return
        outcome = batch_outcome(kept)
        observe_outcome(outcome, busy_s=0.0)
        if isinstance(outcome, BatchFailure):
            await self._report(batch.batch_id, outcome, lease_s)
        else:
            is_accepted = await self._completions.send(
                completion_request(self.identity.worker_id, batch.batch_id, outcome), lease_s)
            if is_accepted is False:
                log.info("CompleteBatch for batch %s not accepted: the lease had moved on", batch.batch_id)
        self.num_batches_done += 1


def batch_outcome(results: Sequence[ContinuousResult | BaseException]) -> BatchOutput | BatchFailure:
    """A batch's report from its items: any failure fails the whole batch (OOM first: the batcher splits it)."""
    errors = [r for r in results if isinstance(r, BaseException)]
    if any(isinstance(e, BatchOutOfMemory) for e in errors):
        return BatchFailure(pb.FAILURE_KIND_OUT_OF_MEMORY, next(str(e) for e in errors if isinstance(e, BatchOutOfMemory)))
    if any(isinstance(e, (BatchCancelled, asyncio.CancelledError)) for e in errors):
        return BatchFailure(pb.FAILURE_KIND_WORKER_STOPPING, SHUTTING_DOWN_MESSAGE)
    if errors:
        return BatchFailure(pb.FAILURE_KIND_OTHER, f"{type(errors[0]).__name__}: {errors[0]}")
    if not results:
        return BatchFailure(pb.FAILURE_KIND_OTHER, "empty batch")
    generated = [r.output.generated_tokens for r in results]
    return BatchOutput(
        items=[r.output for r in results],
        valid_tokens=sum(generated),
        total_tokens=sum(r.total_tokens for r in results),
        steps=max(generated),
        run_s=max(r.run_s for r in results),
    )


def _cancel(futures: list[Future]) -> None:
    """Stop the requests of `futures` that have not ended (counted: decoding nobody will read saved)."""
    metrics.CANCELLED_REQUESTS.inc(sum(future.cancel() for future in futures))


def _call_soon(loop: asyncio.AbstractEventLoop, callback: Callable[[], object]) -> None:
    """From the engine thread: run `callback` on the event loop, unless that loop is gone."""
    try:
        loop.call_soon_threadsafe(callback)
    except RuntimeError:  # the loop closed after the worker stopped
        pass
