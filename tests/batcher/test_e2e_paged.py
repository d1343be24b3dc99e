"""bench/e2e_paged.py: bench/gpu_e2e.py's paged policies reach the worker as the settings they name, and
a phase's paged counters are read from a worker's /metrics; the worker exports its paged queue sizes."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from types import SimpleNamespace

import pytest
from prometheus_client import REGISTRY

from bench.e2e_paged import PAGED_POLICIES, PagedKnobs, PhaseCounters, paged_worker_env
from services.batcher.policy.config import CONTINUOUS_POLICY_NAMES
from services.worker import metrics
from services.worker.config import WorkerSettings
from services.worker.paged.scheduler import Admission, PreemptRule, WaitOrder


@pytest.mark.parametrize("name", sorted(PAGED_POLICIES))
def test_each_paged_policy_is_a_valid_paged_worker_and_a_continuous_batcher_policy(name, monkeypatch):
    policy = PAGED_POLICIES[name]
    knobs = PagedKnobs(max_running=32, token_budget=512, block_tokens=8, admission_margin=1.5,
                       cpu_kv_budget_bytes=1 << 20)
    for key, value in paged_worker_env(policy, knobs).items():
        monkeypatch.setenv(key, value)
    settings = WorkerSettings()
    assert (settings.mode, settings.backend) == ("continuous", "paged")
    assert (settings.admission, settings.paged_order, settings.paged_preempt_rule) == (
        policy.admission.value, policy.order.value, policy.preempt_rule.value)
    assert (settings.paged_max_running, settings.paged_token_budget, settings.paged_block_tokens) == (32, 512, 8)
    assert (settings.admission_margin, settings.kv_budget_bytes) == (1.5, 1 << 20)
    assert policy.batcher_policy in CONTINUOUS_POLICY_NAMES


def test_the_three_policies_are_fcfs_predicted_hrrn_predicted_and_vllms_greedy():
    ccb, magnus_ccb, greedy = PAGED_POLICIES["ccb"], PAGED_POLICIES["magnus_ccb"], PAGED_POLICIES["greedy"]
    assert (ccb.batcher_policy, ccb.admission, ccb.order) == ("ccb", Admission.PREDICTED, WaitOrder.FCFS)
    assert (magnus_ccb.batcher_policy, magnus_ccb.admission, magnus_ccb.order) == (
        "magnus_ccb", Admission.PREDICTED, WaitOrder.HRRN)
    assert (greedy.batcher_policy, greedy.admission, greedy.order, greedy.preempt_rule) == (
        "ccb", Admission.GREEDY, WaitOrder.FCFS, PreemptRule.YOUNGEST)
    assert "MAGNUS_WORKER_KV_BUDGET_BYTES" not in paged_worker_env(ccb, PagedKnobs())  # the worker's default


class _Metrics(BaseHTTPRequestHandler):
    body = ""

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        payload = type(self).body.encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args) -> None:
        pass


def exposition(preemptions: float, recomputed: float, steps: float, row_steps: float, running: float) -> str:
    return (f"# HELP x\nmagnus_worker_paged_preemptions_total {preemptions}\n"
            f"magnus_worker_paged_recomputed_tokens_total {recomputed}\n"
            f"magnus_worker_continuous_steps_total {steps}\n"
            f"magnus_worker_continuous_active_row_steps_total {row_steps}\n"
            f"magnus_worker_paged_running_requests {running}\n"
            f"magnus_worker_paged_max_running_requests 40.0\n")


def test_phase_counters_are_the_increase_over_the_phase_and_the_sampled_peak():
    server = HTTPServer(("127.0.0.1", 0), _Metrics)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/metrics"
    try:
        _Metrics.body = exposition(5, 100, 10, 30, 0)  # before: earlier phases' counts
        counters = PhaseCounters({"worker": url, "gone": "http://127.0.0.1:1/metrics"}, sample_every_s=0.01)
        _Metrics.body = exposition(7, 160, 30, 130, 12)
        deadline = threading.Event()
        while counters.max_running["worker"] < 12 and not deadline.wait(0.01):
            pass
        _Metrics.body = exposition(7, 160, 30, 130, 3)
        moved = counters.finish()
    finally:
        server.shutdown()
    worker = moved["worker"]
    assert (worker["preemptions"], worker["recomputed_tokens"], worker["steps"]) == (2, 60, 20)
    assert worker["mean_running_requests"] == pytest.approx(100 / 20)
    assert worker["max_running_requests_sampled"] == 12
    assert worker["max_running_requests_since_start"] == 40
    assert moved["gone"]["preemptions"] == 0  # a worker that does not answer reads as no change


def test_the_worker_exports_the_paged_schedulers_queue_sizes():
    scheduler = SimpleNamespace(running=[1, 2, 3], num_waiting=4, max_running_seen=9)
    metrics.track_paged(scheduler)
    assert REGISTRY.get_sample_value("magnus_worker_paged_running_requests") == 3
    assert REGISTRY.get_sample_value("magnus_worker_paged_waiting_requests") == 4
    scheduler.running.append(4)
    scheduler.max_running_seen = 11
    assert REGISTRY.get_sample_value("magnus_worker_paged_running_requests") == 4
    assert REGISTRY.get_sample_value("magnus_worker_paged_max_running_requests") == 11
