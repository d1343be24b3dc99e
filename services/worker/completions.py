"""Finished batches' reports of a continuous worker, several per CompleteBatches call.

A continuous worker's one-request leases end many a second; one CompleteBatch each would cost both
processes a call per request. Reports queue here and one task
sends whatever queued while the previous call was in flight: no timer, so an idle worker reports at
once and a busy one in few calls. An older batcher without CompleteBatches (UNIMPLEMENTED) gets one
CompleteBatch per report from then on.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

import grpc

from magnus.v1 import worker_queue_pb2 as pb
from magnus.v1 import worker_queue_pb2_grpc as pb_grpc
from services.worker.puller import LoopTiming, call_while_lease_lives

log = logging.getLogger(__name__)

# As the batcher's MAX_BATCHES_PER_CALL: more would be refused whole.
MAX_COMPLETIONS_PER_CALL = 1024


@dataclass
class _Queued:
    request: pb.CompleteBatchRequest
    deadline_s: float  # loop time past which the lease is gone: no retry lands after it
    accepted: asyncio.Future[bool | None]  # the batcher's answer; None when no call got through


class CompletionSender:
    """Owns the queue of unsent reports and the task that sends them. `send` from the event loop."""

    def __init__(self, stub: pb_grpc.WorkerQueueServiceStub, worker_id: str, timing: LoopTiming) -> None:
        self.stub, self.worker_id, self.timing = stub, worker_id, timing
        self.num_calls = 0  # CompleteBatches / CompleteBatch calls made (tests and logs)
        self._queue: list[_Queued] = []
        self._sending: list[_Queued] = []  # the group of the call in flight
        self._queued = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._has_batch_rpc = True  # False once the batcher answered UNIMPLEMENTED

    async def send(self, request: pb.CompleteBatchRequest, lease_s: float) -> bool | None:
        """Report one finished batch: is_accepted, or None when the batcher could not be reached
        before the lease ended (it requeues the batch then)."""
        loop = asyncio.get_running_loop()
        queued = _Queued(request, loop.time() + lease_s, loop.create_future())
        self._queue.append(queued)
        self._queued.set()
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run(), name="completion-sender")
        return await asyncio.shield(queued.accepted)  # a cancelled batch task must not lose the others' answers

    async def close(self) -> None:
        """Stop the sender (after the last batch was reported): reports still queued or in flight get None."""
        unanswered = [*self._sending, *self._queue]
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        for queued in unanswered:
            _answer(queued, None)
        self._queue.clear()

    async def _run(self) -> None:
        while True:
            await self._queued.wait()
            self._queued.clear()
            while self._queue:
                group = self._sending = self._queue[:MAX_COMPLETIONS_PER_CALL]
                del self._queue[:MAX_COMPLETIONS_PER_CALL]
                try:
                    await self._send_group(group)
                except Exception:  # noqa: BLE001 - a bug here must not leave batch tasks waiting forever
                    log.exception("sending %d completions failed", len(group))
                    for queued in group:
                        _answer(queued, None)
                finally:
                    self._sending = []

    async def _send_group(self, group: list[_Queued]) -> None:
        if self._has_batch_rpc:
            request = pb.CompleteBatchesRequest(worker_id=self.worker_id, completions=[q.request for q in group])
            deadline_s = max(q.deadline_s for q in group)  # each answer below is checked by the batcher anyway
            self.num_calls += 1
            try:
                response = await call_while_lease_lives(
                    self.stub.CompleteBatches, request, f"CompleteBatches of {len(group)} batches", deadline_s,
                    self.timing, raised=(grpc.StatusCode.UNIMPLEMENTED,),
                )
            except grpc.aio.AioRpcError:
                log.info("the batcher has no CompleteBatches (an older version): one CompleteBatch per batch")
                self._has_batch_rpc = False
            else:
                accepted = list(response.is_accepted) if response is not None else [None] * len(group)
                if len(accepted) != len(group):
                    log.error("CompleteBatches answered %d of %d completions", len(accepted), len(group))
                    accepted = [None] * len(group)
                for queued, is_accepted in zip(group, accepted, strict=True):
                    _answer(queued, is_accepted)
                return
        for queued in group:
            self.num_calls += 1
            response = await call_while_lease_lives(
                self.stub.CompleteBatch, queued.request, f"CompleteBatch for batch {queued.request.batch_id}",
                queued.deadline_s, self.timing,
            )
            _answer(queued, None if response is None else response.is_accepted)


def _answer(queued: _Queued, is_accepted: bool | None) -> None:
    if not queued.accepted.done():
        queued.accepted.set_result(is_accepted)
