"""Discrete-event simulation of the batcher and its workers: the served `Scheduler` on a simulated clock.

Requests enter through `Scheduler.admit`, simulated workers take leases with `Scheduler.pull` and
report with `Scheduler.complete`, or with `Scheduler.fail(..., is_out_of_memory=True)` when a batch
outgrows the KV memory, so admission, leasing, the OOM split and the requeue measured here are the
lines the batcher runs. The scheduler reads the simulated clock (its `Clock` argument) and logs to
nowhere. HRRN estimates come from the estimator's KNN fitted on the cost model over a
calibration-like grid, refreshed as the estimate refresher does: before a worker pulls, for the
batches `Scheduler.stale_estimates` names.

A simulated worker runs a batch as static batching does: prefill of n x L(B) padded tokens, then
decode steps until its longest *true* generation ends (`cost_model.CostModel.batch_s`); every
request of the batch finishes when the batch does. A batch whose true KV footprint
n (L(B) + t) Delta passes Theta at step t runs out of memory there and reports it when that step ends.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import math
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import numpy as np

from services.batcher.domain import BatchReport, GenerationInput, ItemOutput, Lease, PendingRequest, Prediction, WorkerInfo
from services.batcher.policy.base import Policy
from services.batcher.scheduler import Clock, Scheduler, SchedulerLimits
from services.batcher.simulate.cost_model import LLAMA2_7B_KV_BYTES_PER_TOKEN, LLAMA2_7B_WEIGHT_BYTES, CostModel
from services.batcher.simulate.workload import Workload
from services.core.knn_model import BatchShape, KnnBatchTimeModel, TimeSample
from services.shared.errors import ResourceExhausted

CALIBRATION_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
CALIBRATION_TOKENS = (8, 16, 32, 64, 128, 256, 512, 1024, 2048)
_EPOCH = datetime(2026, 1, 1, tzinfo=UTC)


def fit_estimator(cost: CostModel) -> KnnBatchTimeModel:
    """The estimator's KNN fitted on the cost model over a grid, as `make calibrate` fills it."""
    samples = [
        TimeSample(BatchShape(n, length, gen), cost.batch_s(n, length, gen))
        for n in CALIBRATION_SIZES
        for length in CALIBRATION_TOKENS
        for gen in CALIBRATION_TOKENS
    ]
    model = KnnBatchTimeModel()
    model.fit(samples)
    return model


@dataclass(frozen=True)
class Hardware:
    """Workers: KV bytes per token (Delta), free KV bytes per worker (Theta), how many."""

    kv_bytes_per_token: int
    free_kv_bytes: int
    num_workers: int = 1

    @classmethod
    def llama2_7b(cls, gpu_memory_gib: float, memory_utilization: float, num_workers: int = 1) -> Hardware:
        """GPUs of `gpu_memory_gib` serving Llama-2-7B: Theta = the used share less the weights."""
        free_kv_bytes = int(memory_utilization * gpu_memory_gib * 2**30) - LLAMA2_7B_WEIGHT_BYTES
        return cls(LLAMA2_7B_KV_BYTES_PER_TOKEN, free_kv_bytes, num_workers)


@dataclass
class RunResult:
    """What one simulated run produced. Times in seconds from the start, NaN = never finished."""

    finish_s: np.ndarray
    num_batches: int = 0
    num_oom: int = 0
    num_rejected: int = 0  # refused at admission, or failed alone out of memory
    batch_sizes: list[int] = field(default_factory=list)
    valid_tokens: int = 0  # tokens generated for requests that completed
    total_tokens: int = 0  # rows x decode steps of every batch run, including OOM'd runs


class SimulatedClock:
    """The time of the event being processed, seconds from the start; the scheduler's `Clock`."""

    def __init__(self) -> None:
        self.now_s = 0.0

    def monotonic_s(self) -> float:
        return self.now_s

    def wall(self) -> datetime:
        return _EPOCH + timedelta(seconds=self.now_s)


class NoLog:
    """A log sink that keeps nothing: the run's outcome is read from the scheduler's answers."""

    def add_request(self, row: dict) -> None:
        pass

    def add_batch(self, row: dict) -> None:
        pass


class Simulation:
    """One run of one policy over one workload. `run()` returns the RunResult."""

    def __init__(
        self,
        workload: Workload,
        policy: Policy,
        cost: CostModel,
        hardware: Hardware,
        estimator: KnnBatchTimeModel | None,
    ) -> None:
        if policy.uses_estimates and estimator is None:
            raise ValueError(f"{policy.name} uses HRRN and needs an estimator")
        self.workload = workload
        self.policy = policy
        self.cost = cost
        self.hardware = hardware
        self.estimator = estimator
        self.max_kv_tokens = hardware.free_kv_bytes // hardware.kv_bytes_per_token
        self.clock = SimulatedClock()
        ids = itertools.count()
        # no queue limit and no deadlines: every arrival is offered, as in the paper's runs
        limits = SchedulerLimits(max_pending_requests=len(workload) + 1, lease_s=math.inf, worker_timeout_s=math.inf)
        self.scheduler = Scheduler(policy, limits, Clock(self.clock.monotonic_s, self.clock.wall), NoLog(),
                                   make_id=lambda: f"b{next(ids)}")
        self.worker_ids = [f"w{i}" for i in range(hardware.num_workers)]
        for worker_id in self.worker_ids:
            self.scheduler.register(WorkerInfo(
                worker_id=worker_id, kv_bytes_per_token=hardware.kv_bytes_per_token,
                free_kv_bytes=hardware.free_kv_bytes, max_batch_size=0, model_name="simulated",
                device="simulated", last_seen_s=0.0,
            ))
        self.loop = asyncio.new_event_loop()  # only to make the futures requests are answered on
        self.requests: dict[int, PendingRequest] = {}  # admitted, by workload index
        self.result = RunResult(finish_s=np.full(len(workload), np.nan))

    def run(self) -> RunResult:
        try:
            self._run_events()
        finally:
            self.loop.close()
        for request in self.requests.values():
            if request.future.done() and request.future.exception() is not None:
                self.result.num_rejected += 1  # failed alone out of memory
        return self.result

    def _run_events(self) -> None:
        """Arrivals and batch ends in time order; a free worker pulls once nothing else happens at
        the same instant, so requests that arrive together are batched together (as the batcher
        dispatches on the next loop turn)."""
        arrival_s = self.workload.arrival_s
        running: list[tuple[float, int, str, Lease, bool]] = []  # heap: (end, seq, worker, lease, is_oom)
        idle = list(self.worker_ids)
        seq = itertools.count()
        next_request = 0
        while True:
            next_arrival_s = float(arrival_s[next_request]) if next_request < len(arrival_s) else math.inf
            next_end_s = running[0][0] if running else math.inf
            if idle and self.scheduler.open_batches and min(next_arrival_s, next_end_s) > self.clock.now_s:
                worker_id = idle.pop(0)
                lease, end_s, is_oom = self._start(worker_id)
                heapq.heappush(running, (end_s, next(seq), worker_id, lease, is_oom))
                continue
            if next_end_s <= next_arrival_s and next_end_s < math.inf:
                _, _, worker_id, lease, is_oom = heapq.heappop(running)
                self.clock.now_s = next_end_s
                self._report(worker_id, lease, is_oom)
                idle.append(worker_id)
            elif next_arrival_s < math.inf:
                self.clock.now_s = next_arrival_s
                self._admit(next_request)
                next_request += 1
            else:
                return

    def _admit(self, index: int) -> None:
        w = self.workload
        # the oracle learns a request's true length as the batcher does: max_new_tokens is where it stops
        max_new_tokens = int(w.true_gen_tokens[index]) if self.policy.plans_with_true_lengths else w.max_new_tokens
        request = PendingRequest(
            request_id=str(index),
            generation=GenerationInput("", "", max_new_tokens, str(index), "simulated"),
            prediction=Prediction(
                int(w.input_tokens[index]), int(w.predicted_gen_tokens[index]), 0, False,
                quantile_tokens=None if w.quantile_gen_tokens is None else int(w.quantile_gen_tokens[index]),
            ),
            prompt="",
            arrival_s=self.clock.now_s,
            queued_at=self.clock.wall(),
            future=self.loop.create_future(),
        )
        try:
            self.scheduler.admit(request)
        except ResourceExhausted:
            self.result.num_rejected += 1
            return
        self.requests[index] = request

    def _refresh_estimates(self) -> None:
        stale = self.scheduler.stale_estimates()
        if not stale:
            return
        shapes = [BatchShape(*shape) for _, _, shape in stale]
        for (batch_id, revision, _), estimate_s in zip(stale, self.estimator.predict(shapes), strict=True):
            self.scheduler.set_estimate(batch_id, revision, max(float(estimate_s), 1e-3), 1)

    def _start(self, worker_id: str) -> tuple[Lease, float, bool]:
        """Lease the next batch to `worker_id` now; returns it, when it ends, and whether out of memory."""
        if self.policy.uses_estimates:
            self._refresh_estimates()
        lease = self.scheduler.pull(worker_id)
        batch = lease.batch
        size, input_max = batch.size, batch.input_tokens_max
        true_gen_max = max(int(self.workload.true_gen_tokens[int(m.request_id)]) for m in batch.members)
        self.result.num_batches += 1
        self.result.batch_sizes.append(size)
        steps_that_fit = max(0, self.max_kv_tokens // size - input_max)
        if steps_that_fit < true_gen_max:
            self.result.total_tokens += size * steps_that_fit
            run_s = self.cost.prefill_s(size, input_max) + self.cost.decode_s(size, input_max, steps_that_fit)
            return lease, self.clock.now_s + run_s, True
        self.result.total_tokens += size * true_gen_max
        return lease, self.clock.now_s + self.cost.batch_s(size, input_max, true_gen_max), False

    def _report(self, worker_id: str, lease: Lease, is_oom: bool) -> None:
        """The worker's report when the batch ends: its outputs, or out of memory (split and requeued)."""
        if is_oom:
            self.result.num_oom += 1
            self.scheduler.fail(worker_id, lease.batch.batch_id, is_out_of_memory=True, message="simulated OOM")
            return
        true_gen = [int(self.workload.true_gen_tokens[int(r.request_id)]) for r in lease.items]
        outputs = [ItemOutput(r.request_id, "", g) for r, g in zip(lease.items, true_gen, strict=True)]
        self.result.valid_tokens += sum(true_gen)
        run_s = self.clock.now_s - lease.started_s
        self.scheduler.complete(worker_id, lease.batch.batch_id,
                                BatchReport(outputs, run_s, sum(true_gen), lease.batch.size * max(true_gen)))
        for request in lease.items:
            if request.future.done() and request.future.exception() is None:
                self.result.finish_s[int(request.request_id)] = self.clock.now_s
