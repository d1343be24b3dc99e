"""The Scheduler's admission checks: may a request enter the queue now? Part of the Scheduler.

Capacity (draining, the queue and a tenant's share), context (longer than a worker can run),
memory (its planned KV does not fit a worker alone, rules.fits_memory) and wait (answered too late for its caller, policy/wait.py). Each raises the error the caller gets;
none changes state. Mixed into `Scheduler`, whose state it reads: kept apart only to keep each file
readable.
"""

from __future__ import annotations

from services.batcher import metrics
from services.batcher.domain import PendingRequest
from services.batcher.policy.batch import Member
from services.batcher.policy.rules import MemoryBudget, memory_bytes
from services.batcher.policy.wait import (
    littles_wait_s,
    own_run_s,
    queue_wait_s,
    queued_work_s,
    running_left_s,
    wait_excess_s,
)
from services.shared.errors import InvalidArgument, ResourceExhausted, Unavailable


class AdmissionChecks:
    """Scheduler methods that decide admission (see services/batcher/scheduler.py)."""

    def check_capacity(self, tenant_id: str | None = None) -> None:
        """Raise if a new request cannot be admitted now (draining, the queue or the tenant's share full).

        The per-tenant cap keeps one noisy tenant from filling the whole queue and starving the rest.
        """
        if self.is_draining:
            raise Unavailable("batcher is shutting down; retry on another replica")
        if len(self.pending) >= self.limits.max_pending_requests:
            metrics.REJECTED_REQUESTS.labels(reason="queue_full").inc()
            raise ResourceExhausted(
                f"queue full: {len(self.pending)} requests pending (limit {self.limits.max_pending_requests})",
                retry_after_s=self.limits.retry_after_s,
            )
        cap = self.limits.max_pending_per_tenant
        if cap and tenant_id is not None and self.pending_by_tenant[tenant_id] >= cap:
            metrics.REJECTED_REQUESTS.labels(reason="tenant_full").inc()
            raise ResourceExhausted(
                f"tenant {tenant_id!r} has {self.pending_by_tenant[tenant_id]} requests pending (limit {cap})",
                retry_after_s=self.limits.retry_after_s,
            )

    def context_limit_tokens(self) -> int | None:
        """Longest prompt + max_new_tokens every worker can run: the smallest context a live worker
        announced, capped by MAGNUS_BATCHER_MAX_CONTEXT_TOKENS; None when neither is known."""
        limits = [w.max_context_tokens for w in self.workers.values() if w.max_context_tokens > 0]
        if self.limits.max_context_tokens > 0:
            limits.append(self.limits.max_context_tokens)
        return min(limits, default=None)

    def check_context(self, input_tokens: int, max_new_tokens: int) -> None:
        """Raise InvalidArgument if the request is longer than a worker can run: it would fail its batch."""
        limit = self.context_limit_tokens()
        if limit is not None and input_tokens + max_new_tokens > limit:
            raise InvalidArgument(
                "prompt.max_new_tokens",
                f"prompt {input_tokens} + max_new_tokens {max_new_tokens} = {input_tokens + max_new_tokens} "
                f"tokens exceeds the workers' context of {limit} tokens",
            )

    def check_memory(self, member: Member, budget: MemoryBudget) -> None:
        """Raise ResourceExhausted if the request alone, at its planned length, passes the KV cap."""
        if not budget.fits(1, member.input_tokens, member.gen_tokens):
            metrics.REJECTED_REQUESTS.labels(reason="memory").inc()
            needed = memory_bytes(1, member.input_tokens, member.gen_tokens, budget.kv_bytes_per_token or 0)
            raise ResourceExhausted(f"request needs {needed} bytes of KV memory; workers have {budget.free_kv_bytes}")

    def check_wait(self, request: PendingRequest, gen_tokens: int) -> None:
        """Raise ResourceExhausted if the request would be answered after its caller's deadline or queue
        longer than MAGNUS_BATCHER_MAX_QUEUE_WAIT_S (the rule is policy/wait.py's)."""
        now_s = self.clock.monotonic_s()
        remaining_s = None if request.deadline_s is None else request.deadline_s - now_s
        planned_s = None if remaining_s is None else remaining_s * (1.0 - self.limits.deadline_headroom)
        if remaining_s is None and not self.limits.max_queue_wait_s:
            return
        scale, learned = self.run_time_scale, self.run_time_model
        leases = list(self.leases.values())
        running_s = running_left_s(self.expected_runs_s([x.batch for x in leases]), [now_s - x.started_s for x in leases])
        queued_s = learned.predict_total_s(self.open_batches.columns)
        if queued_s is None:
            queued_s = scale * queued_work_s(self.open_batches.columns)
        wait_s = max(queue_wait_s(running_s + queued_s, self._num_lanes()),
                     littles_wait_s(len(self.pending), self.completion_rate.per_s(now_s)))
        run_s = learned.predict_s(1, request.input_tokens_now, gen_tokens)
        if run_s is None:
            run_s = scale * own_run_s(request.input_tokens_now, gen_tokens)
        excess_s = wait_excess_s(wait_s, run_s, planned_s, self.limits.max_queue_wait_s)
        if excess_s > 0:
            metrics.REJECTED_REQUESTS.labels(reason="wait").inc()
            deadline = "no deadline" if remaining_s is None else f"a deadline in {remaining_s:.1f} s"
            raise ResourceExhausted(
                f"estimated queue wait {wait_s:.1f} s + run {run_s:.1f} s is too long ({deadline}, queue wait "
                f"limit {self.limits.max_queue_wait_s:.0f} s)",
                retry_after_s=max(self.limits.retry_after_s, excess_s),
            )

    def _num_lanes(self) -> int:
        """Batches run at once: one per worker, or one per row for the continuous policies."""
        if self.policy.is_continuous:
            return sum(max(1, w.max_batch_size) for w in self.workers.values())
        return len(self.workers)

