"""The GPU end-to-end driver on the CPU (tiny model), the paged engine's greedy, ccb and magnus_ccb
(`bench/gpu_e2e.py --tiny --backend paged`): each policy on its own paged worker, through the real services.

Its own module (the driver's other run is test_e2e_driver.py): the two take ~80 s each, and the test
workers (`make test`, pytest-xdist by module) can run them side by side.
"""

from __future__ import annotations

import json
import shutil

import pytest

from tests.stack_support import run_python as run
from tools.demo import DEFAULT_DATA_DIR as DATA_DIR

pytestmark = pytest.mark.integration


def test_driver_runs_the_paged_engines_policies_each_on_its_own_worker(tmp_path, prepared_stack_db):
    state = tmp_path / "state"
    state.mkdir()
    shutil.copy(prepared_stack_db[0], state / "log.db")
    shutil.copytree(prepared_stack_db[1], state / "model-store")
    workload = tmp_path / "workload.jsonl"
    run(["bench/e2e_workload.py", "--data", str(DATA_DIR), "--num-requests", "64", "--out", str(workload)], 120)
    out = tmp_path / "out"
    # a pool of 1,024 tokens (512 bytes a token): the burst's 32 requests need ~2,400, the sample's longest ~800
    run(["bench/gpu_e2e.py", "--tiny", "--backend", "paged", "--workload", str(workload), "--state", str(state),
         "--out", str(out), "--workdir", str(tmp_path / "work"), "--policies", "greedy,ccb,magnus_ccb",
         "--rates", "", "--saturation-requests", "32", "--paged-cpu-kv-bytes", str(1024 * 512)], 420)

    raw = json.loads((out / "e2e_raw.json").read_text())
    expected = {"greedy": ("ccb", "greedy", "fcfs"), "ccb": ("ccb", "predicted", "fcfs"),
                "magnus_ccb": ("magnus_ccb", "predicted", "hrrn")}
    for policy, (batcher_policy, admission, order) in expected.items():
        result = raw["policies"][policy]
        env = result["worker_env"]
        assert (result["backend"], result["batcher_policy"]) == ("paged", batcher_policy)
        assert (env["MAGNUS_WORKER_ADMISSION"], env["MAGNUS_WORKER_PAGED_ORDER"]) == (admission, order)
        burst = result["rates"]["400.0"]
        assert all(r["status"] == "OK" for r in burst["requests"]), burst["requests"]
        assert all(r["generated_tokens"] == r["true_gen_tokens"] for r in burst["requests"])
        counters = burst["worker_counters"]["worker"]
        assert counters["steps"] > 0 and counters["max_running_requests_since_start"] > 1
        # how many are preempted depends on how fast leases arrive against steps (timing); those that
        # were lost tokens to recompute, and still answered (above) with their whole length
        assert (counters["preemptions"] > 0) == (counters["recomputed_tokens"] > 0)
    log = (out / "logs" / "worker.log").read_text()
    assert log.count("Theta=") == 4, "the static worker, then one paged worker per policy"
