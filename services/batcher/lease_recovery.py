"""How the Scheduler gets work back from a lease that ended without results, part of the Scheduler.

A failed batch is split until the failing request runs alone (policy.split.after_failure), a lost
one (its worker went silent or restarted) is requeued whole, and a lease whose callers all left is
revoked. Mixed into `Scheduler`, whose state it changes: it is kept apart only to keep each file
readable, and like the rest of the Scheduler it never awaits.
"""

from __future__ import annotations

import logging

from services.batcher import metrics
from services.batcher.domain import Lease
from services.batcher.log_rows import batch_row
from services.batcher.policy.batch import QueuedBatch
from services.batcher.policy.split import FailureAction, after_failure, split_batch
from services.shared.db.models import BatchOutcome
from services.shared.errors import Internal, ResourceExhausted, Unavailable

log = logging.getLogger(__name__)


class LeaseRecovery:
    """Scheduler methods for failed, lost and abandoned leases (see services/batcher/scheduler.py)."""

    def fail(
        self, worker_id: str, batch_id: str, *, is_out_of_memory: bool, message: str, is_worker_stopping: bool = False
    ) -> bool:
        """A leased batch failed: split it until the failing request is alone (policy.split.after_failure),
        requeue it, or fail its requests. False if the batch is not leased to this worker."""
        lease = self._take_lease(worker_id, batch_id)
        if lease is None:
            return False
        batch = self._live_batch(lease)
        if batch is None:  # every caller left meanwhile
            return True
        if not is_worker_stopping:
            batch.num_failures += 1
        action = after_failure(batch.size, batch.num_failures, self.limits.max_batch_failures,
                               is_out_of_memory=is_out_of_memory, is_worker_stopping=is_worker_stopping)
        outcome = BatchOutcome.OOM if is_out_of_memory else BatchOutcome.FAILED
        metrics.observe_failure(outcome, is_split=is_out_of_memory and action is FailureAction.SPLIT)
        self.log_sink.add_batch(batch_row(lease, outcome=outcome, finished_at=self.clock.wall()))
        log.warning("batch %s (%d requests) failed on %s: %s: %s; %s", batch_id, batch.size, worker_id, outcome,
                    message, action.value)
        error = (ResourceExhausted(f"request does not fit in worker memory: {message}") if is_out_of_memory
                 else Internal(f"the worker failed this request {batch.num_failures} times: {message}"))
        self._act(action, lease, batch, error)
        return True

    def expire(self) -> None:
        """Requeue batches whose lease ran out and forget workers that went silent."""
        now_s = self.clock.monotonic_s()
        for batch_id, lease in list(self.leases.items()):
            if lease.deadline_s < now_s:
                log.warning("lease of batch %s on %s expired; requeueing", batch_id, lease.worker_id)
                self.leases.pop(batch_id)
                self.log_sink.add_batch(batch_row(lease, outcome=BatchOutcome.LOST, finished_at=self.clock.wall()))
                metrics.observe_failure(BatchOutcome.LOST)
                self._retry_or_fail(lease, Unavailable("batch lost by workers too many times"))
        waiting_workers = set(self.waiting_pulls.values())
        for worker_id, worker in list(self.workers.items()):
            if worker_id not in waiting_workers and now_s - worker.last_seen_s > self.limits.worker_timeout_s:
                log.warning("worker %s silent for %.0f s; forgetting it", worker_id, now_s - worker.last_seen_s)
                del self.workers[worker_id]
        self._schedule_dispatch()

    def _drop_from_lease(self, request_id: str) -> None:
        """Take a running request out of its lease; revoke the lease once nobody waits for it."""
        for batch_id, lease in self.leases.items():
            if any(r.request_id == request_id for r in lease.items):
                lease.items = [r for r in lease.items if r.request_id != request_id]
                lease.cancelled_ids.add(request_id)
                if not lease.items:
                    del self.leases[batch_id]  # the worker's next Heartbeat is refused: it stops the batch
                return

    def _live_batch(self, lease: Lease) -> QueuedBatch | None:
        """The lease's batch without the members whose callers left (the batch itself if none left)."""
        if not lease.cancelled_ids:
            return lease.batch
        if not lease.items:
            return None
        live = QueuedBatch(batch_id=lease.batch.batch_id, is_sealed=True, parent_batch_id=lease.batch.parent_batch_id)
        for member in lease.batch.members:
            if member.request_id not in lease.cancelled_ids:
                live.add(member)
        live.num_failures = lease.batch.num_failures
        return live

    def _sealed_copy(self, batch: QueuedBatch) -> QueuedBatch:
        """A new queued batch with the same members, sealed: a retry must not grow."""
        retry = QueuedBatch(batch_id=self.make_id(), is_sealed=True, parent_batch_id=batch.batch_id)
        for member in batch.members:
            retry.add(member)
        retry.num_failures = batch.num_failures
        return retry

    def _release_leases_of(self, worker_id: str) -> None:
        """A worker restarted: its old process's leases are lost now; requeue them (bounded retries)."""
        for future, waiting_id in list(self.waiting_pulls.items()):
            if waiting_id == worker_id:  # long-polls of the dead process: a lease handed there is lost
                del self.waiting_pulls[future]
        for batch_id, lease in list(self.leases.items()):
            if lease.worker_id != worker_id:
                continue
            log.warning("worker %s restarted while running batch %s; requeueing it now", worker_id, batch_id)
            self.leases.pop(batch_id)
            self.log_sink.add_batch(batch_row(lease, outcome=BatchOutcome.LOST, finished_at=self.clock.wall()))
            metrics.observe_failure(BatchOutcome.LOST)
            self._retry_or_fail(lease, Unavailable("batch lost by workers too many times"))

    def _retry_or_fail(self, lease: Lease, error: Exception) -> None:
        """A lost lease (its worker died or restarted): requeue the batch whole, split it if it is lost
        again, fail it when a lone request was lost too often (policy.split.after_failure)."""
        batch = self._live_batch(lease)
        if batch is None:
            return
        batch.num_failures += 1
        action = after_failure(batch.size, batch.num_failures, self.limits.max_batch_failures,
                               is_out_of_memory=False, is_lost=True)
        self._act(action, lease, batch, error)

    def _act(self, action: FailureAction, lease: Lease, batch: QueuedBatch, error: Exception) -> None:
        """Carry out the decision for a lease's (live) batch; `error` answers its requests on FAIL."""
        if action is FailureAction.SPLIT:
            for half in split_batch(batch, (self.make_id(), self.make_id())):
                half.num_failures = batch.num_failures
                self._requeue(half)
        elif action is FailureAction.FAIL:
            for request in lease.items:
                self._fail_request(request, error)
        else:
            self._requeue(self._sealed_copy(batch))
        self._schedule_dispatch()

