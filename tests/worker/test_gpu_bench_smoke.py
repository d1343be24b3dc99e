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


def test_gpu_serving_smoke_drafts_against_the_reference_texts(tmp_path):
    """bench/gpu_serving.py --smoke with a lengths file that carries token ids (bench/serving_lengths.py
    --data): magnus_ccb_spec drafts from each prompt and keeps the drafts the reference agrees with."""
    import random

    rng = random.Random(0)
    with (tmp_path / "lengths.jsonl").open("w") as out:
        for _ in range(40):
            prompt = [rng.randrange(500) for _ in range(rng.randint(8, 30))]
            output = prompt[2:2 + rng.randint(5, 20)]  # the answer copies part of its prompt
            out.write(json.dumps(dict(task="t", input_tokens=len(prompt), gen_tokens=len(output),
                                      predicted_tokens=len(output), p90_tokens=len(output) + 2,
                                      prompt_ids=prompt, output_ids=output)) + "\n")
    trace = ["TIMESTAMP,ContextTokens,GeneratedTokens"]
    trace += [f"2023-11-16 18:15:{i:02d}.0000000,{20 + i},{5 + i}" for i in range(10)]
    (tmp_path / "trace.csv").write_text("\n".join(trace) + "\n")
    out_dir = tmp_path / "out"
    env = {"PATH": "/usr/bin:/bin", "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run(
        [sys.executable, "bench/gpu_serving.py", "--smoke", "--lengths", str(tmp_path / "lengths.jsonl"),
         "--trace", str(tmp_path / "trace.csv"), "--out", str(out_dir), "--workloads", "mix",
         "--policies", "magnus_ccb,magnus_ccb_spec", "--mix-rate-requests", "100", "--mix-burst", "200",
         "--trace-requests", "20", "--trace-burst", "20"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    policies = json.loads((out_dir / "serving.json").read_text())["workloads"]["mix"]["policies"]
    for phase in ("rate", "burst"):
        assert policies["magnus_ccb"][phase]["finished"] == policies["magnus_ccb_spec"][phase]["finished"] > 0
        assert policies["magnus_ccb"][phase]["accepted_draft_tokens"] == 0
        assert policies["magnus_ccb_spec"][phase]["accepted_draft_tokens"] > 0
        assert policies["magnus_ccb_spec"][phase]["steps"] < policies["magnus_ccb"][phase]["steps"]
