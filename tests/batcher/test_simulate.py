"""The simulator on tiny synthetic workloads, and the oracle's Phi bound on exact lengths."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.batcher.policy.rules import MemoryBudget
from services.batcher.policy.batch import Member, QueuedBatch
from services.batcher.policy.batch_queue import BatchQueue
from services.batcher.policy.config import POLICY_NAMES, make_policy
from services.batcher.simulate.cost_model import PROFILE_POINTS, fit_residuals, make_cost_model
from services.batcher.simulate.engine import Hardware, Simulation, fit_estimator
from services.batcher.simulate.workload import (
    LengthTable,
    Workload,
    poisson_arrivals_s,
    sample_workload,
    trace_arrivals_s,
)

COST = make_cost_model("h200-graph")
ESTIMATOR = fit_estimator(COST)


def tiny_workload(seed: int, n: int = 120, rate_per_s: float = 50.0) -> Workload:
    rng = np.random.default_rng(seed)
    true = rng.integers(1, 300, n)
    return Workload(
        arrival_s=poisson_arrivals_s(n, rate_per_s, rng),
        input_tokens=rng.integers(5, 300, n),
        true_gen_tokens=true,
        predicted_gen_tokens=np.maximum(1, (true * rng.uniform(0.6, 1.4, n)).astype(int)),
        task_index=np.zeros(n, dtype=int),
    )


@pytest.mark.parametrize("name", POLICY_NAMES)
def test_every_request_finishes_once_after_it_arrived(name):
    workload = tiny_workload(1)
    policy = make_policy(name, phi_token_reads=10_000, fixed_batch_size=8, max_batch_size=None)
    # Theta of 20,000 tokens: big enough for any one request, small enough that batches OOM
    result = Simulation(workload, policy, COST, Hardware(1, 20_000), ESTIMATOR).run()
    assert not np.isnan(result.finish_s).any()
    assert (result.finish_s > workload.arrival_s).all()
    assert result.valid_tokens == workload.true_gen_tokens.sum()
    assert result.total_tokens >= result.valid_tokens
    if name == "oracle":
        assert result.num_oom == 0  # exact lengths under the memory cap never overflow


def test_oom_splits_and_requeues_until_everything_fits():
    workload = tiny_workload(2)
    policy = make_policy("abp", phi_token_reads=1e9, fixed_batch_size=8, max_batch_size=None)
    under = Workload(**{**workload.__dict__, "predicted_gen_tokens": np.ones(len(workload), dtype=int)})
    result = Simulation(under, policy, COST, Hardware(1, 3_000), ESTIMATOR).run()
    assert result.num_oom > 0
    assert not np.isnan(result.finish_s).any()


@pytest.mark.parametrize("name", ["abp", "magnus"])
def test_planning_at_a_quantile_that_covers_the_truth_avoids_the_point_plans_ooms(name):
    workload = tiny_workload(3)
    policy = make_policy(name, phi_token_reads=1e9, fixed_batch_size=8, max_batch_size=None)
    # the point under-predicts every request by half; the quantile covers each one
    point = np.maximum(1, workload.true_gen_tokens // 2)
    at_point = Workload(**{**workload.__dict__, "predicted_gen_tokens": point})
    at_quantile = Workload(**{**at_point.__dict__, "quantile_gen_tokens": workload.true_gen_tokens + 5})
    point_run = Simulation(at_point, policy, COST, Hardware(1, 3_000), ESTIMATOR).run()
    policy = make_policy(name, phi_token_reads=1e9, fixed_batch_size=8, max_batch_size=None)
    quantile_run = Simulation(at_quantile, policy, COST, Hardware(1, 3_000), ESTIMATOR).run()
    assert point_run.num_oom > 0 and quantile_run.num_oom == 0
    assert not np.isnan(quantile_run.finish_s).any()


def test_a_workload_planned_at_the_quantile_has_the_same_requests_as_at_the_point():
    n = 200
    rng = np.random.default_rng(4)
    true = rng.integers(1, 3000, n)
    table = LengthTable(
        tasks=("a", "b"), task_index=rng.integers(0, 2, n), input_tokens=rng.integers(5, 300, n),
        true_gen_tokens=true, predicted_gen_tokens=true // 2, predictor="synthetic",
        quantile_gen_tokens=true * 2, plan_quantile=0.9,
    )
    arrival_s = poisson_arrivals_s(50, 10.0, rng)
    at_point = sample_workload(table, arrival_s, 2048, np.random.default_rng(7))
    at_quantile = sample_workload(table, arrival_s, 2048, np.random.default_rng(7), is_planned_at_quantile=True)
    assert at_point.quantile_gen_tokens is None
    assert np.array_equal(at_point.true_gen_tokens, at_quantile.true_gen_tokens)
    assert np.array_equal(at_point.predicted_gen_tokens, at_quantile.predicted_gen_tokens)
    assert (at_quantile.quantile_gen_tokens <= 2048).all()
    assert (at_quantile.quantile_gen_tokens >= np.minimum(at_quantile.true_gen_tokens, 2048)).all()
    with pytest.raises(ValueError):
        sample_workload(replace(table, quantile_gen_tokens=None), arrival_s, 2048, rng, is_planned_at_quantile=True)


@settings(max_examples=50, deadline=None)
@given(
    st.lists(st.tuples(st.integers(1, 1500), st.integers(1, 1500)), min_size=1, max_size=40),
    st.sampled_from([2_000.0, 10_000.0, 50_000.0]),
)
def test_oracle_never_assembles_a_batch_whose_waste_exceeds_phi(lengths, phi):
    """Phi's bound: with exact lengths, any batch of 2+ requests has padding + waiting reads < Phi."""
    oracle = make_policy("oracle", phi_token_reads=phi, fixed_batch_size=8, max_batch_size=None)
    queue = BatchQueue()
    for i, (input_tokens, gen_tokens) in enumerate(lengths):
        member = Member(str(i), input_tokens, gen_tokens, float(i))
        batch = queue.choose_for(member, oracle, MemoryBudget())
        if batch is None:
            batch = QueuedBatch(f"b{i}")
            queue.append(batch)
        queue.add_member(batch, member)
    for batch in queue.values():
        if batch.size < 2:
            continue
        l_max, g_max = batch.input_tokens_max, batch.gen_tokens_max
        for m in batch.members:
            padding = m.gen_tokens * (l_max - m.input_tokens)
            waiting = sum(g + l_max for g in range(m.gen_tokens, g_max + 1))
            assert padding + waiting < phi


def test_gpu_profiles_fit_the_measured_steps_within_15_percent():
    for name, (points, offset) in PROFILE_POINTS.items():
        for _, _, measured_s, fitted_s in fit_residuals(make_cost_model(name), points, offset):
            assert abs(fitted_s - measured_s) <= 0.15 * measured_s


def test_trace_arrivals_keep_the_requested_mean_rate():
    gaps = np.array([0.1, 2.0, 0.1, 0.1, 5.0])
    arrivals = trace_arrivals_s(gaps, 1000, 10.0, np.random.default_rng(0))
    assert arrivals[-1] == pytest.approx(100.0)
    assert (np.diff(arrivals) >= 0).all()
