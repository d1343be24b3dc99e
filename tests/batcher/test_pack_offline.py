"""bench/pack_offline.py's drain: straggler preemption requeues only rows past the plan and conserves work."""

from __future__ import annotations

import numpy as np

from bench.pack_offline import drain_s
from services.batcher.policy.pack_cost import LinearBatchCost


def test_a_cut_straggler_is_requeued_once_and_the_burst_drains_sooner():
    n = 100
    input_tokens = np.full(n, 50)
    true_gen = np.full(n, 20)
    true_gen[7] = 400  # one request runs 20x longer than predicted
    plan = np.full(n, 20)
    cost = LinearBatchCost()
    plain_s, _, plain_requeues = drain_s(plan, input_tokens, true_gen, cost)
    cut_s, _, requeues = drain_s(plan, input_tokens, true_gen, cost, preempt_share=0.05)
    assert plain_requeues == 0
    assert requeues >= 1
    assert cut_s < plain_s


def test_nothing_is_cut_when_every_prediction_holds():
    rng = np.random.default_rng(1)
    input_tokens = rng.integers(10, 100, 60)
    true_gen = rng.integers(5, 80, 60)
    cost = LinearBatchCost()
    assert drain_s(true_gen, input_tokens, true_gen, cost, preempt_share=0.1)[2] == 0
