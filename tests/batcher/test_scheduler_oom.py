"""Scheduler.fail(..., is_out_of_memory=True) directly, and the simulator exercising it.

The simulator drives the served Scheduler, so an OOM in a simulated run is split and requeued by
lease_recovery.py itself; the second test checks that a run with a tight memory cap goes through it.
"""

from __future__ import annotations

from datetime import UTC, datetime

import numpy as np

from services.batcher import metrics
from services.batcher.domain import PendingRequest, WorkerInfo
from services.batcher.policy.config import make_policy
from services.batcher.scheduler import Clock, Scheduler, SchedulerLimits
from services.batcher.simulate.cost_model import make_cost_model
from services.batcher.simulate.engine import Hardware, Simulation, fit_estimator
from services.batcher.simulate.workload import Workload, poisson_arrivals_s
from services.shared.errors import ResourceExhausted
from tests.batcher.scheduler_support import Sink, make_request
from tests.batcher.scheduler_support import lease as pulled


def request(i: int, loop, gen_tokens: int) -> PendingRequest:
    return make_request(i, loop, now_s=float(i), max_new=512, predicted_tokens=gen_tokens)


def abp_scheduler(sink: Sink) -> Scheduler:
    policy = make_policy("abp", phi_token_reads=1e9, fixed_batch_size=8, max_batch_size=None)
    scheduler = Scheduler(policy, SchedulerLimits(), Clock(lambda: 10.0, lambda: datetime.now(UTC)), sink)
    scheduler.register(WorkerInfo("w", 1, 2**40, 0, "m", "cpu", 0.0))
    return scheduler


def test_an_oom_splits_the_batch_into_sealed_halves_queued_ahead_of_newer_work(loop):
    sink = Sink()
    scheduler = abp_scheduler(sink)
    requests = [request(i, loop, gen_tokens=10 * (i + 1)) for i in range(4)]
    for r in requests:
        scheduler.admit(r)
    lease = pulled(scheduler)
    assert lease.batch.size == 4
    newer = request(9, loop, gen_tokens=10)
    scheduler.admit(newer)  # queued while the batch runs
    splits_before = metrics.OOM_SPLITS._value.get()

    assert not scheduler.fail("other", lease.batch.batch_id, is_out_of_memory=True, message="x")  # not its lease
    assert scheduler.fail("w", lease.batch.batch_id, is_out_of_memory=True, message="CUDA out of memory")

    assert lease.batch.batch_id not in scheduler.leases
    assert metrics.OOM_SPLITS._value.get() == splits_before + 1
    assert sink.batches[-1]["outcome"] == "oom"
    queued = list(scheduler.open_batches.values())
    halves, rest = queued[:2], queued[2:]
    assert all(h.is_sealed and h.parent_batch_id == lease.batch.batch_id and h.num_failures == 1 for h in halves)
    # halves by planned length, every request exactly once, none answered yet
    assert sorted([m.request_id for m in h.members] for h in halves) == [["r0", "r1"], ["r2", "r3"]]
    assert [m.request_id for b in rest for m in b.members] == ["r9"]
    assert not any(r.future.done() for r in requests)
    # a sealed half never takes a new request
    late = request(10, loop, gen_tokens=10)
    scheduler.admit(late)
    assert scheduler.batch_of["r10"] not in {h.batch_id for h in halves}


def test_a_lone_request_out_of_memory_fails_with_resource_exhausted(loop):
    sink = Sink()
    scheduler = abp_scheduler(sink)
    for i in range(2):
        scheduler.admit(request(i, loop, gen_tokens=10))
    lease = pulled(scheduler)
    scheduler.fail("w", lease.batch.batch_id, is_out_of_memory=True, message="oom")
    first = pulled(scheduler)
    assert first.batch.size == 1
    assert scheduler.fail("w", first.batch.batch_id, is_out_of_memory=True, message="oom again")
    alone = first.items[0]
    assert isinstance(alone.future.exception(), ResourceExhausted)
    assert alone.request_id not in scheduler.pending
    second = pulled(scheduler)  # its neighbour still runs
    assert second.batch.size == 1 and second.items[0].request_id != alone.request_id
    assert [row["status"] for row in sink.requests] == ["failed"]


def test_a_simulated_run_with_a_tight_memory_cap_splits_through_scheduler_fail():
    rng = np.random.default_rng(3)
    n = 80
    true = rng.integers(50, 300, n)
    workload = Workload(
        arrival_s=poisson_arrivals_s(n, 50.0, rng), input_tokens=rng.integers(5, 200, n), true_gen_tokens=true,
        predicted_gen_tokens=np.ones(n, dtype=int), task_index=np.zeros(n, dtype=int),  # under-predicted
    )
    cost = make_cost_model("h200-graph")
    policy = make_policy("magnus", phi_token_reads=1e9, fixed_batch_size=8, max_batch_size=None)
    simulation = Simulation(workload, policy, cost, Hardware(1, 3_000), fit_estimator(cost))
    calls = []
    served_fail = simulation.scheduler.fail
    simulation.scheduler.fail = lambda *a, **k: calls.append(k) or served_fail(*a, **k)
    splits_before = metrics.OOM_SPLITS._value.get()
    result = simulation.run()
    assert result.num_oom == len(calls) > 0
    assert all(k["is_out_of_memory"] for k in calls)
    assert metrics.OOM_SPLITS._value.get() > splits_before  # the served split ran
    assert not np.isnan(result.finish_s).any()  # every half fitted in the end
    assert result.valid_tokens == true.sum()
