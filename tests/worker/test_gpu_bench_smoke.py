"""The paged engine's GPU benchmarks run their --smoke path on the CPU (tiny shape, torch kernels): a
renamed engine function or a broken table fails here, not after a paid-for GPU run. Speed is not checked."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("script,output", [
    ("bench/gpu_paged_step.py", "paged_step.json"),
    ("bench/gpu_step_profile.py", "step_profile.json"),
    ("bench/gpu_attention_sweep.py", "attention_sweep.json"),
])
def test_gpu_bench_smoke_runs_on_the_cpu(script, output, tmp_path):
    env = {"PATH": "/usr/bin:/bin", "CUDA_VISIBLE_DEVICES": ""}  # no TRITON_INTERPRET: the torch versions
    done = subprocess.run([sys.executable, script, "--smoke", "--out", str(tmp_path)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads((tmp_path / output).read_text())
    assert result["rows"], f"{script} wrote no rows"
    assert all("error" not in row for row in result["rows"])
