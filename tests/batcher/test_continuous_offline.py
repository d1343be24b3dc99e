"""bench/continuous_offline.py's step simulation: every request finishes, in the order the policy picks."""

from __future__ import annotations

import numpy as np

from bench.continuous_offline import simulate, summarize
from services.batcher.policy.pack_cost import LinearBatchCost


def test_every_request_finishes_and_length_order_lowers_the_mean_latency_of_a_burst():
    rng = np.random.default_rng(0)
    n = 40
    input_tokens = rng.integers(10, 200, n)
    true_gen = rng.integers(1, 300, n)
    arrivals_s = np.zeros(n)
    cost = LinearBatchCost()
    fcfs = simulate("ccb", arrivals_s, input_tokens, true_gen, true_gen, 4, cost)
    by_length = simulate("magnus_ccb", arrivals_s, input_tokens, true_gen, true_gen, 4, cost)
    assert not np.isnan(fcfs).any() and not np.isnan(by_length).any()
    # with 4 rows, the first 4 requests (arrival order) start at once under FCFS: the shortest of them ends first
    first = int(np.argmin(true_gen[:4]))
    assert np.argmin(fcfs) == first
    # length-aware order starts the 4 shortest requests first
    assert set(np.argsort(by_length)[:1]) <= set(np.argsort(true_gen)[:4])
    assert summarize(arrivals_s, by_length)["mean_latency_s"] < summarize(arrivals_s, fcfs)["mean_latency_s"]
    # the same tokens are decoded either way: the drain time differs only by the step mix
    assert abs(by_length.max() - fcfs.max()) / fcfs.max() < 0.2


def test_an_idle_worker_waits_for_the_next_arrival():
    cost = LinearBatchCost()
    finished = simulate("ccb", np.array([0.0, 100.0]), np.array([10, 10]), np.array([2, 2]), np.array([2, 2]), 2, cost)
    assert finished[0] < 1.0 and 100.0 < finished[1] < 101.0
