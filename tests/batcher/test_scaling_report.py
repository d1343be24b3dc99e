"""bench/gpu_scaling_report.py on a made-up --workers 1,2 raw file: the issue's figures and checks."""

from __future__ import annotations

import json
import sys

from bench import gpu_scaling_report


def phase(num: int, last_done_s: float, latency_s: float) -> dict:
    return {"requests": [{"status": "OK", "done_s": last_done_s * (i + 1) / num, "latency_s": latency_s}
                         for i in range(num)]}


def raw_file(tmp_path, saturated_2w_s: float) -> str:
    def policies(count: int, burst_s: float, latency_s: float) -> dict:
        return {"policies": {"magnus_ccb": {"rates": {
            str(12.0 * count): phase(10, 1.0, latency_s),
            "400.0": phase(100, burst_s, 5.0)}}}}

    raw = {"command": "python bench/gpu_e2e.py --workers 1,2", "policies": {},
           "workers": {"1": policies(1, 10.0, 0.25), "2": policies(2, saturated_2w_s, 0.26)},
           "kill_one": {"sent": 50, "answered": 50, "duplicated": 0, "errors": [], "killed_at_s": 1.5}}
    path = tmp_path / "e2e_raw.json"
    path.write_text(json.dumps(raw))
    return str(path)


def run(monkeypatch, tmp_path, raw: str) -> dict:
    monkeypatch.setattr(sys, "argv", ["gpu_scaling_report.py", raw, "--policy", "magnus_ccb", "--rate", "12",
                                      "--device", "test", "--out", str(tmp_path / "out")])
    assert gpu_scaling_report.main() == 0
    return json.loads((tmp_path / "out" / "scaling.json").read_text())


def test_two_workers_at_twice_the_rate_are_compared_with_one_at_its_rate(monkeypatch, tmp_path):
    report = run(monkeypatch, tmp_path, raw_file(tmp_path, saturated_2w_s=5.0))
    assert report["workers"]["1"]["saturated_requests_per_s"] == 10.0
    assert report["workers"]["2"]["saturated_requests_per_s"] == 20.0
    assert report["workers"]["2"]["rate_per_s"] == 24.0
    assert abs(report["latency_ratio"] - 0.26 / 0.25) < 1e-9
    assert report["is_throughput_met"] and report["is_latency_met"] and report["is_kill_one_met"]
    assert {"sent", "answered", "duplicated"} <= set(report["kill_one"])
    assert "met" in (tmp_path / "out" / "scaling.md").read_text()


def test_less_than_1_9x_is_not_met(monkeypatch, tmp_path):
    report = run(monkeypatch, tmp_path, raw_file(tmp_path, saturated_2w_s=6.0))  # 16.7 against 10 req/s
    assert not report["is_throughput_met"]
