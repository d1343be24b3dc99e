"""The batcher's queue: the single owner of queued batches, leases, workers and pending requests.

Every method is synchronous and never awaits, so on the event loop each call is atomic: request
handlers and worker RPCs call in, the Scheduler mutates its state and resolves futures. Decisions
come from the pure policy package; this class only keeps the books and reads the injected clocks.
Two parts of it sit in their own files over the same state: the admission checks
(admission_checks.py) and what happens to a lease that ends without results (lease_recovery.py).
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import NamedTuple

from services.batcher import metrics
from services.batcher.domain import (
    BatchReport,
    ItemOutput,
    Lease,
    PendingRequest,
    Phase,
    RequestResult,
    WorkerInfo,
)
from services.batcher.admission_checks import AdmissionChecks
from services.batcher.lease_recovery import LeaseRecovery
from services.batcher.log_rows import LogSink, batch_row, request_row
from services.batcher.policy.base import Policy
from services.batcher.policy.batch import Member, QueuedBatch
from services.batcher.policy.batch_queue import BatchQueue
from services.batcher.policy.hrrn import batch_estimate_s
from services.batcher.policy.placement import WorkerLoad, free_kv_now, pick_worker
from services.batcher.policy.rules import MemoryBudget
from services.batcher.policy.split import split_batch
from services.batcher.policy.run_time import RunTimeModel
from services.batcher.policy.wait import CompletionRate, misses_deadline, updated_scale
from services.shared.errors import Internal
from services.shared.db.models import BatchOutcome, RequestStatus

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SchedulerLimits:
    max_pending_requests: int = 10_000
    max_pending_per_tenant: int = 0  # 0 = no per-tenant limit
    lease_s: float = 30.0
    worker_timeout_s: float = 90.0
    max_batch_failures: int = 3
    retry_after_s: float = 1.0
    preempt_share: float = 0.0  # straggler preemption (BatcherSettings.preempt_share); 0 = off
    # a request cut this often is planned at its whole remaining max_new_tokens: never cut again
    max_preemptions: int = 3
    max_context_tokens: int = 0  # prompt + max_new_tokens cap besides the workers' own; 0 = none
    max_queue_wait_s: float = 0.0  # refuse a request estimated to wait longer; 0 = only its deadline
    deadline_headroom: float = 0.0  # plan to answer this share of the caller's time early (estimates err)


class HeartbeatReply(NamedTuple):
    is_lease_valid: bool
    is_registered: bool
    cancelled_request_ids: list[str]  # of the heartbeated batch: their callers left


@dataclass(frozen=True)
class Clock:
    monotonic_s: Callable[[], float]
    wall: Callable[[], datetime]


def new_id() -> str:
    return str(uuid.uuid4())


class Scheduler(AdmissionChecks, LeaseRecovery):
    def __init__(
        self,
        policy: Policy,
        limits: SchedulerLimits,
        clock: Clock,
        log_sink: LogSink,
        make_id: Callable[[], str] = new_id,
    ) -> None:
        self.policy = policy
        self.limits = limits
        self.clock = clock
        self.log_sink = log_sink
        self.make_id = make_id
        self.open_batches = BatchQueue()  # queue order, indexed for the two decisions
        self.leases: dict[str, Lease] = {}
        self.pending: dict[str, PendingRequest] = {}
        self.pending_by_tenant: Counter[str] = Counter()  # tenant id -> its requests in self.pending
        self.batch_of: dict[str, str] = {}  # request id -> queued batch id
        self.workers: dict[str, WorkerInfo] = {}
        self.waiting_pulls: OrderedDict[asyncio.Future[Lease], str] = OrderedDict()  # -> worker id
        self.is_draining = False
        self.run_time_scale = 1.0  # actual / estimated run time of completed batches (policy/wait.py)
        self.num_scale_samples = 0
        self.run_time_model = RunTimeModel()  # run time by batch shape, learned from completions
        self.completion_rate = CompletionRate()  # requests answered per second, lately
        self._is_dispatch_scheduled = False
        self.on_change: Callable[[], None] = lambda: None  # e.g. wake the estimate refresher
        metrics.track_scheduler(self)

    # ---- admission -------------------------------------------------------------------------
    def memory_budget(self) -> MemoryBudget:
        """Delta and Theta across live workers: a batch must fit whichever worker pulls it."""
        if not self.workers:
            return MemoryBudget()
        return MemoryBudget(
            kv_bytes_per_token=max(w.kv_bytes_per_token for w in self.workers.values()),
            free_kv_bytes=min(w.free_kv_bytes for w in self.workers.values()),
            lanes=self._num_lanes(),
        )

    def admit(self, request: PendingRequest) -> None:
        """Insert a predicted request into a queued batch (or a new one). Raises if it cannot."""
        self.check_capacity(request.generation.tenant_id)
        budget = self.memory_budget()
        gen_tokens = self.policy.planned_gen_tokens(
            predicted_tokens=request.prediction.planning_tokens,
            upper_tokens=request.prediction.upper_tokens,
            max_new_tokens=request.generation.max_new_tokens,
        )
        member = Member(request.request_id, request.prediction.input_tokens, gen_tokens, request.arrival_s)
        self.check_memory(member, budget)
        self.check_wait(request, gen_tokens)
        self.pending[request.request_id] = request
        self.pending_by_tenant[request.generation.tenant_id] += 1
        if request.events is not None:
            request.events.put_nowait(Phase.QUEUED)
        self._enqueue(member, budget)

    def cancel(self, request_id: str) -> str | None:
        """Drop a request whose caller went away. Returns where it was ("queued", "running"), None if
        it was no longer pending (answered already).

        Queued, it leaves its batch. Running, it leaves its lease: the worker hears of it by its next
        Heartbeat (continuous workers free its row); a lease left with no request is revoked, so the
        worker stops the whole batch. Results for it that arrive later are ignored.
        """
        request = self.pending.get(request_id)
        if request is None:
            return None
        batch_id = self.batch_of.pop(request_id, None)
        if batch_id is not None:
            self.open_batches.remove_member(batch_id, request_id)
            stage = "queued"
        else:
            stage = "running"
            self._drop_from_lease(request_id)
        self._forget(request)
        metrics.CANCELLED_REQUESTS.labels(stage=stage).inc()
        self.log_sink.add_request(request_row(request, status=RequestStatus.CANCELLED, error=f"caller left while {stage}"))
        self.on_change()
        return stage

    # ---- workers ---------------------------------------------------------------------------
    def register(self, worker: WorkerInfo) -> None:
        """Add or refresh a worker. A known id with a new incarnation is a restarted process: the old
        one's leases are requeued ahead of new work now, not when they expire (its late reports then
        name batches no longer leased, and are refused)."""
        previous = self.workers.get(worker.worker_id)
        is_restart = bool(previous and previous.incarnation_id and worker.incarnation_id
                          and previous.incarnation_id != worker.incarnation_id)
        worker.last_seen_s = self.clock.monotonic_s()
        self.workers[worker.worker_id] = worker
        if is_restart:
            self._release_leases_of(worker.worker_id)
        if previous is None or is_restart:
            log.info(
                "worker %s registered%s: %s, Delta=%d B/token, Theta=%d B, context %d tokens",
                worker.worker_id, " (restarted)" if is_restart else "", worker.device,
                worker.kv_bytes_per_token, worker.free_kv_bytes, worker.max_context_tokens,
            )

    def pull(self, worker_id: str) -> Lease | asyncio.Future[Lease]:
        """A lease now if a batch is queued, else a future resolved when one is."""
        self._touch(worker_id)
        lease = self._lease_next(worker_id)
        if lease is not None:
            return lease
        future: asyncio.Future[Lease] = asyncio.get_running_loop().create_future()
        self.waiting_pulls[future] = worker_id
        return future

    def pull_ready(self, worker_id: str, max_batches: int) -> list[Lease]:
        """Up to `max_batches` leases of batches ready now, in the policy's order (no waiting): the
        rest of a pull that asked for several (a continuous worker with free rows)."""
        leases: list[Lease] = []
        while len(leases) < max_batches and (lease := self._lease_next(worker_id)) is not None:
            leases.append(lease)
        return leases

    def cancel_pull(self, future: asyncio.Future[Lease]) -> None:
        """Forget a long-poll that timed out or whose caller left (its lease, if any, will expire)."""
        self.waiting_pulls.pop(future, None)

    def heartbeat(self, worker_id: str, batch_id: str) -> HeartbeatReply:
        """Renew the worker and the lease of `batch_id`; say which of its requests' callers left."""
        is_registered = worker_id in self.workers
        self._touch(worker_id)
        if not batch_id:
            return HeartbeatReply(True, is_registered, [])
        lease = self.leases.get(batch_id)
        if lease is None or lease.worker_id != worker_id:
            return HeartbeatReply(False, is_registered, [])
        lease.deadline_s = self.clock.monotonic_s() + self.limits.lease_s
        return HeartbeatReply(True, is_registered, sorted(lease.cancelled_ids))

    def complete(self, worker_id: str, batch_id: str, report: BatchReport) -> bool:
        """Deliver a batch's results. False if the batch is not leased to this worker."""
        lease = self._take_lease(worker_id, batch_id)
        if lease is None:
            return False
        finished_at = self.clock.wall()
        outputs = {o.request_id: o for o in report.outputs}
        results: list[RequestResult] = []
        for request in lease.items:
            output = outputs.get(request.request_id)
            if output is None:
                self._fail_request(request, Internal(f"worker {worker_id} returned no output for the request"))
                continue
            if output.is_preempted and output.generated_tokens < request.remaining_new_tokens:
                self._continue_later(request, output)
                continue
            result = RequestResult(
                request_id=request.request_id,
                text=request.output_so_far + output.text,
                generated_tokens=request.tokens_so_far + output.generated_tokens,
                predicted_tokens=request.prediction.predicted_tokens,
                input_tokens=request.prediction.input_tokens,
                batch_id=batch_id,
                batch_size=lease.batch.size,
                queued_at=request.queued_at,
                started_at=request.started_at or lease.started_at,
                finished_at=finished_at,
                is_prediction_fallback=request.prediction.is_fallback,
            )
            results.append(result)
            self._forget(request)
            self.log_sink.add_request(request_row(request, status=RequestStatus.COMPLETED, result=result))
            if not request.future.done():
                request.future.set_result(result)
        metrics.observe_completion(lease, report, results)
        self.run_time_scale = updated_scale(self.run_time_scale, lease.estimated_s, report.run_s,
                                            self.num_scale_samples)
        self.num_scale_samples += 1
        actual_gen_max = max((o.generated_tokens for o in report.outputs), default=0)
        self.run_time_model.observe(lease.batch.size, lease.batch.input_tokens_max, actual_gen_max, report.run_s)
        self.completion_rate.add(self.clock.monotonic_s(), len(results))
        self.log_sink.add_batch(
            batch_row(lease, outcome=BatchOutcome.OK, finished_at=finished_at, report=report, actual_gen_tokens_max=actual_gen_max)
        )
        return True

    # ---- estimates -------------------------------------------------------------------------
    def stale_estimates(self) -> list[tuple[str, int, tuple[int, int, int]]]:
        """(batch id, revision, (size, L, G)) of queued batches whose estimate is out of date.

        None for a policy that times its batches itself (packing: its queue holds single requests).
        """
        if self.policy.times_batches_itself:
            return []
        return [
            (b.batch_id, b.revision, (b.size, b.input_tokens_max, b.gen_tokens_max))
            for b in self.open_batches.values()
            if not b.is_estimate_fresh and b.members
        ]

    def set_estimate(self, batch_id: str, revision: int, estimated_s: float, version: int) -> None:
        self.open_batches.set_estimate(batch_id, revision, estimated_s, version)

    # ---- shutdown --------------------------------------------------------------------------
    @property
    def num_in_flight(self) -> int:
        return len(self.pending)

    def begin_drain(self) -> None:
        self.is_draining = True

    def fail_all(self, error: Exception) -> None:
        """Answer every pending request with `error` (end of a drain that ran out of time)."""
        for request in list(self.pending.values()):
            self._fail_request(request, error)
        self.open_batches.clear()
        self.batch_of.clear()

    # ---- internals -------------------------------------------------------------------------
    def _touch(self, worker_id: str) -> None:
        worker = self.workers.get(worker_id)
        if worker is not None:
            worker.last_seen_s = self.clock.monotonic_s()

    def _schedule_dispatch(self) -> None:
        """Dispatch on the next loop turn, so requests admitted together are batched together."""
        if not self._is_dispatch_scheduled and self.waiting_pulls:
            self._is_dispatch_scheduled = True
            asyncio.get_running_loop().call_soon(self._dispatch)

    def _dispatch(self) -> None:
        self._is_dispatch_scheduled = False
        while self.waiting_pulls and self.open_batches:
            for done in [f for f in self.waiting_pulls if f.done()]:
                del self.waiting_pulls[done]
            if not self.waiting_pulls:
                return
            future = self._pick_waiting_pull()
            lease = self._lease_next(self.waiting_pulls[future])
            if lease is None:  # the pull keeps its place in line
                return
            del self.waiting_pulls[future]
            future.set_result(lease)

    def _pick_waiting_pull(self) -> asyncio.Future[Lease]:
        """The waiting pull the next batch goes to (policy/placement.py: fits whole, most free KV,
        fewest leased rows, longest waiting). One waiting pull: that one, with no policy call."""
        futures = list(self.waiting_pulls)
        if len(futures) == 1:
            return futures[0]
        leased: dict[str, list[Lease]] = {}
        for lease in self.leases.values():
            leased.setdefault(lease.worker_id, []).append(lease)
        loads = [self._load_of(worker_id, leased.get(worker_id, []), rank)
                 for rank, worker_id in enumerate(self.waiting_pulls.values())]
        roomiest = max(loads, key=lambda load: -1 if load.free_kv_bytes is None else load.free_kv_bytes)
        head = self.open_batches.choose_next(self.policy, self.clock.monotonic_s(),
                                             MemoryBudget(roomiest.kv_bytes_per_token, roomiest.free_kv_bytes))
        shape = None if head is None else (head.size, head.input_tokens_max, head.gen_tokens_max)
        return futures[loads.index(pick_worker(loads, shape))]

    def _load_of(self, worker_id: str, leases: list[Lease], rank: int) -> WorkerLoad:
        worker = self.workers.get(worker_id)
        if worker is None:
            return WorkerLoad(worker_id, None, None, sum(lease.batch.size for lease in leases), rank)
        shapes = [(lease.batch.size, lease.batch.input_tokens_max, lease.batch.gen_tokens_max) for lease in leases]
        return WorkerLoad(
            worker_id, worker.kv_bytes_per_token,
            free_kv_now(worker.free_kv_bytes, worker.kv_bytes_per_token, shapes),
            sum(shape[0] for shape in shapes), rank,
        )

    def _lease_next(self, worker_id: str) -> Lease | None:
        worker = self.workers.get(worker_id)
        batch = self.open_batches.take_next(self.policy, self.clock.monotonic_s(), self._budget_of(worker), self.make_id)
        if batch is None:
            return None
        batch = self._fit_for_worker(batch, worker)
        now_s, now_wall = self.clock.monotonic_s(), self.clock.wall()
        items = [self.pending[m.request_id] for m in batch.members]
        for request in items:
            self.batch_of.pop(request.request_id, None)
            if request.num_preemptions:  # a continuation: the request started with its first batch
                continue
            request.started_at = now_wall
            if request.events is not None:
                request.events.put_nowait(Phase.STARTED)
        lease = Lease(
            batch, worker_id, now_s + self.limits.lease_s, now_s, now_wall, batch_estimate_s(batch), items,
            preempt_max_rows=self._preempt_max_rows(batch),
        )
        self.leases[batch.batch_id] = lease
        metrics.observe_lease(lease)
        self.on_change()
        return lease

    def _preempt_max_rows(self, batch: QueuedBatch) -> int:
        """Stragglers the worker may cut from `batch` (0 below 1 / preempt_share rows: a cut then frees
        too little). Only where the policy allows it (plans made with predictions)."""
        if not self.policy.can_preempt:
            return 0
        return int(self.limits.preempt_share * batch.size)

    def _continue_later(self, request: PendingRequest, output: ItemOutput) -> None:
        """Requeue a request its batch cut: its output so far joins its prompt, and it is planned to
        generate the length its policy replans it with."""
        request.output_so_far += output.text
        request.tokens_so_far += output.generated_tokens
        request.num_preemptions += 1
        planned = self.policy.replanned_gen_tokens(
            remaining_tokens=request.remaining_new_tokens, generated_tokens=request.tokens_so_far,
            num_preemptions=request.num_preemptions, max_preemptions=self.limits.max_preemptions,
        )
        metrics.PREEMPTIONS.inc()
        self._enqueue(Member(request.request_id, request.input_tokens_now, planned, request.arrival_s),
                      self.memory_budget())

    def _enqueue(self, member: Member, budget: MemoryBudget) -> None:
        """Put a pending request's member into the queued batch the policy picks (or a new one)."""
        batch = self.open_batches.choose_for(member, self.policy, budget)
        if batch is None:
            batch = QueuedBatch(batch_id=self.make_id())
            self.open_batches.append(batch)
        self.open_batches.add_member(batch, member)
        self.batch_of[member.request_id] = batch.batch_id
        self._schedule_dispatch()
        self.on_change()

    def _budget_of(self, worker: WorkerInfo | None) -> MemoryBudget:
        """The pulling worker's memory (all workers' if unknown); lanes are every worker's: they share the queue."""
        if worker is None:
            return self.memory_budget()
        return MemoryBudget(worker.kv_bytes_per_token, worker.free_kv_bytes, lanes=self._num_lanes())

    def _fit_for_worker(self, batch: QueuedBatch, worker: WorkerInfo | None) -> QueuedBatch:
        """Split a batch assembled before this worker's limits were known until it fits, and until it
        would answer before its tightest member's deadline (at the run-time-scaled estimate)."""
        budget = self._budget_of(worker)
        max_size = (worker.max_batch_size if worker is not None else 0) or batch.size

        def is_too_big(batch: QueuedBatch) -> bool:
            if batch.size > max_size or (
                worker is not None and not budget.fits(batch.size, batch.input_tokens_max, batch.gen_tokens_max)
            ):
                return True
            deadlines_s = [self.pending[m.request_id].deadline_s for m in batch.members]
            return misses_deadline(self.expected_run_s(batch), self.clock.monotonic_s(), deadlines_s)

        while batch.size > 1 and is_too_big(batch):
            first, second = split_batch(batch, (self.make_id(), self.make_id()))
            self._requeue(second)
            batch = first
        return batch

    def expected_run_s(self, batch: QueuedBatch) -> float:
        """A batch's run time for deadline decisions: the learned model's, else the scaled estimate."""
        return self.expected_runs_s([batch])[0]

    def expected_runs_s(self, batches: list[QueuedBatch]) -> list[float]:
        """`expected_run_s` of each batch, with one call to the learned model for all of them."""
        learned_s = self.run_time_model.predict_each_s([b.size for b in batches], [b.input_tokens_max for b in batches],
                                                       [b.gen_tokens_max for b in batches])
        if learned_s is None:
            return [self.run_time_scale * batch_estimate_s(batch) for batch in batches]
        return learned_s.tolist()

    def _take_lease(self, worker_id: str, batch_id: str) -> Lease | None:
        lease = self.leases.get(batch_id)
        if lease is None or lease.worker_id != worker_id:
            return None
        return self.leases.pop(batch_id)

    def _requeue(self, batch: QueuedBatch) -> None:
        self.open_batches.push_front(batch)  # it is older than new arrivals
        for member in batch.members:
            self.batch_of[member.request_id] = batch.batch_id

    def _forget(self, request: PendingRequest) -> None:
        """The request left `pending` (answered or dropped): its tenant's share is free again."""
        if self.pending.pop(request.request_id, None) is None:
            return
        tenant_id = request.generation.tenant_id
        self.pending_by_tenant[tenant_id] -= 1
        if self.pending_by_tenant[tenant_id] <= 0:
            del self.pending_by_tenant[tenant_id]  # bounded by live tenants, not by every tenant ever seen

    def _fail_request(self, request: PendingRequest, error: Exception) -> None:
        self._forget(request)
        self.batch_of.pop(request.request_id, None)
        self.log_sink.add_request(request_row(request, status=RequestStatus.FAILED, error=str(error)))
        if not request.future.done():
            request.future.set_exception(error)
