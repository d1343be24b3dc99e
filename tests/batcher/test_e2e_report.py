"""bench/gpu_e2e_report.py: the latency floor (each request alone at a one-row step, one prefill, the RPC
path) and the saturation diagnosis."""

from __future__ import annotations

import pytest

from bench.gpu_e2e_report import diagnose, latency_by_arrival_quarter, latency_floor


def record(gen_tokens: int, latency_s: float, queue_s: float, run_s: float, status: str = "OK") -> dict:
    return dict(true_gen_tokens=gen_tokens, latency_s=latency_s, queue_wait_s=queue_s, run_s=run_s, status=status)


def test_the_floor_is_each_request_decoding_alone_plus_prefill_and_the_measured_rpc_path():
    policies = {
        "vs": {"rates": {"8.0": {"requests": [record(10, 1.0, 0.2, 0.7), record(20, 1.0, 0.3, 0.6),
                                              record(99, 9.0, 0.0, 0.0, status="DEADLINE_EXCEEDED")]}}},
        # another policy's requests count for the RPC path too: (0.1 + 0.1 + 0.1 + 0.1) / 4 = 0.1 s
        "ccb": {"rates": {"8.0": {"requests": [record(10, 0.5, 0.0, 0.4), record(20, 0.6, 0.1, 0.4)]}}},
    }
    floor = latency_floor(policies, step_ms=5.0, prefill_s=0.01)
    at_8 = floor["rates"]["8"]
    # (10 or 20 tokens x 5 ms) + 10 ms + 100 ms, over vs's answered requests only
    assert at_8["floor_s"] == pytest.approx((0.16 + 0.21) / 2)
    assert at_8["vs_mean_latency_s"] == pytest.approx(1.0)
    assert at_8["floor_x_vs"] == pytest.approx(0.185)
    assert latency_floor({"ccb": policies["ccb"]}, 5.0, 0.01) == {}  # no vs to compare with


def batch(size: int, predicted_max: int, actual_max: int, outcome: str = "ok") -> dict:
    return dict(size=size, input_tokens_max=50, predicted_gen_tokens_max=predicted_max,
                actual_gen_tokens_max=actual_max, actual_s=1.0, outcome=outcome, valid_tokens=10, total_tokens=20)


def test_the_saturation_diagnosis_shows_batch_sizes_and_the_longest_request_planned_and_run():
    policies = {
        "magnus": {"rates": {"8.0": {"batches": [batch(99, 1, 1)]},  # not the highest rate: ignored
                             "400.0": {"batches": [batch(10, 50, 90), batch(30, 70, 110),
                                                   batch(500, 1, 1, outcome="out_of_memory")]}}},
        "ccb": {"rates": {"400.0": {"batches": [batch(1, 5, 5)]}}},  # continuous: no batch sums
    }
    diagnosis = diagnose(policies)
    assert list(diagnosis) == ["magnus"]
    magnus = diagnosis["magnus"]
    assert (magnus["rate_per_s"], magnus["batches"], magnus["largest_batch"]) == (400.0, 2, 30)
    assert magnus["mean_batch_size"] == pytest.approx(20.0)
    assert (magnus["mean_predicted_gen_max"], magnus["mean_actual_gen_max"]) == (60.0, 100.0)
    assert magnus["lost_to_underprediction_s"] > 0  # each batch ran longer than planned
    assert magnus["padding_share_of_token_slots"] == pytest.approx(0.5)


def test_latency_by_arrival_quarter_orders_by_arrival_and_shows_a_growing_queue():
    # sent in reverse of list order; latency grows with arrival, as when a queue keeps growing
    ok = [dict(sent_s=float(8 - i), latency_s=float(8 - i)) for i in range(8)]
    assert latency_by_arrival_quarter(ok) == [1.5, 3.5, 5.5, 7.5]  # latencies 1..8 in arrival order
    assert latency_by_arrival_quarter(ok[:3]) == []  # under one request a quarter: nothing to say
    five = [dict(sent_s=float(i), latency_s=1.0 if i < 4 else 9.0) for i in range(5)]
    assert latency_by_arrival_quarter(five) == [1.0, 1.0, 1.0, 5.0]  # the remainder joins the last quarter
