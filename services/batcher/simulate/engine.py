"""Discrete-event simulation of the batcher and its workers, driving the real policy code.

Requests are admitted with `BatchQueue.choose_for` (the batcher's insertion rule), free workers
take `BatchQueue.choose_next` (FCFS or HRRN), an OOM is split with `split.split_batch` and both
halves requeued at the front, exactly as services/batcher/scheduler.py does. HRRN estimates come
from the real estimator model (`KnnBatchTimeModel`) fitted to the cost model on a calibration-like
grid, and are refreshed only for batches that changed since their last estimate.

A batch runs as static batching does on the worker: prefill of n x L(B) padded tokens, then
decode steps until its longest *true* generation ends (`cost_model.CostModel.batch_s`); every
request of the batch finishes when the batch does. A batch whose true KV footprint
n (L(B) + t) Delta passes Theta at step t runs out of memory there.
"""

from __future__ import annotations

import heapq
import itertools
from dataclasses import dataclass, field

import numpy as np

from services.batcher.policy.rules import MemoryBudget
from services.batcher.policy.batch import Member, QueuedBatch
from services.batcher.policy.batch_queue import BatchQueue
from services.batcher.policy.base import Policy
from services.batcher.policy.split import split_batch
from services.batcher.simulate.cost_model import CostModel
from services.batcher.simulate.workload import Workload
from services.core.knn_model import BatchShape, KnnBatchTimeModel, TimeSample

CALIBRATION_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
CALIBRATION_TOKENS = (8, 16, 32, 64, 128, 256, 512, 1024, 2048)


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


@dataclass
class RunResult:
    """What one simulated run produced. Times in seconds from the start, NaN = never finished."""

    finish_s: np.ndarray
    num_batches: int = 0
    num_oom: int = 0
    num_rejected: int = 0
    batch_sizes: list[int] = field(default_factory=list)
    valid_tokens: int = 0  # tokens generated for requests that completed
    total_tokens: int = 0  # rows x decode steps of every batch run, including OOM'd runs


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
        self.budget = MemoryBudget(hardware.kv_bytes_per_token, hardware.free_kv_bytes)
        self.max_kv_tokens = hardware.free_kv_bytes // hardware.kv_bytes_per_token
        self.queue = BatchQueue()
        self.stale: set[str] = set()  # batch ids whose estimate is out of date
        self.ids = (f"b{i}" for i in itertools.count())
        self.result = RunResult(finish_s=np.full(len(workload), np.nan))

    def run(self) -> RunResult:
        arrival_s = self.workload.arrival_s
        free_at_s = [0.0] * self.hardware.num_workers  # heap of worker free times
        next_request, clock_s = 0, 0.0
        while True:
            start_s = max(free_at_s[0], clock_s)
            has_arrival = next_request < len(arrival_s)
            # arrivals up to the moment a worker is free are admitted first: the batcher dispatches
            # on the next loop turn, so requests that arrived together are batched together
            if has_arrival and (arrival_s[next_request] <= start_s or not len(self.queue)):
                clock_s = float(arrival_s[next_request])
                self._admit(next_request, clock_s)
                next_request += 1
                continue
            if not len(self.queue):
                return self.result
            heapq.heappop(free_at_s)
            clock_s = start_s
            heapq.heappush(free_at_s, start_s + self._run_next(start_s))

    def _admit(self, index: int, now_s: float) -> None:
        w = self.workload
        gen_tokens = w.true_gen_tokens[index] if self.policy.plans_with_true_lengths else w.predicted_gen_tokens[index]
        member = Member(str(index), int(w.input_tokens[index]), int(gen_tokens), now_s)
        if not self.budget.fits(1, member.input_tokens, member.gen_tokens):
            self.result.num_rejected += 1
            return
        batch = self.queue.choose_for(member, self.policy, self.budget)
        if batch is None:
            batch = QueuedBatch(next(self.ids))
            self.queue.append(batch)
        self.queue.add_member(batch, member)
        self.stale.add(batch.batch_id)

    def _refresh_estimates(self) -> None:
        stale = [self.queue[i] for i in self.stale if i in self.queue]
        self.stale.clear()
        if not stale:
            return
        shapes = [BatchShape(b.size, b.input_tokens_max, b.gen_tokens_max) for b in stale]
        for batch, estimate_s in zip(stale, self.estimator.predict(shapes), strict=True):
            self.queue.set_estimate(batch.batch_id, batch.revision, max(float(estimate_s), 1e-3), 1)

    def _run_next(self, now_s: float) -> float:
        """Lease the next batch at `now_s`, run it, and return how long the worker is busy, s."""
        if self.policy.uses_estimates:
            self._refresh_estimates()
        batch = self.queue.take_next(self.policy, now_s, self.budget, lambda: next(self.ids))
        rows = np.array([int(m.request_id) for m in batch.members])
        size, input_max = batch.size, batch.input_tokens_max
        true_gen_max = int(self.workload.true_gen_tokens[rows].max())
        self.result.num_batches += 1
        self.result.batch_sizes.append(size)
        steps_that_fit = self.max_kv_tokens // size - input_max
        if steps_that_fit < true_gen_max:
            return self._out_of_memory(batch, max(0, steps_that_fit))
        duration_s = self.cost.batch_s(size, input_max, true_gen_max)
        self.result.finish_s[rows] = now_s + duration_s
        self.result.valid_tokens += int(self.workload.true_gen_tokens[rows].sum())
        self.result.total_tokens += size * true_gen_max
        return duration_s

    def _out_of_memory(self, batch: QueuedBatch, steps_done: int) -> float:
        """The batch failed after `steps_done` decode steps: split and requeue, as the batcher does."""
        self.result.num_oom += 1
        self.result.total_tokens += batch.size * steps_done
        if batch.size < 2:
            self.result.num_rejected += 1
        else:
            for half in split_batch(batch, (next(self.ids), next(self.ids))):
                self.queue.push_front(half)
                self.stale.add(half.batch_id)
        return self.cost.prefill_s(batch.size, batch.input_tokens_max) + self.cost.decode_s(
            batch.size, batch.input_tokens_max, steps_done
        )
