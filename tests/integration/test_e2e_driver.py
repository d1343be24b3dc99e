"""The GPU end-to-end driver on the CPU (tiny model): magnus_pack, ccb and magnus_ccb through the real services
(the paged engine's policies: test_e2e_driver_paged.py, a module of its own so a second test worker runs it).

Runs `bench/gpu_e2e.py --tiny` as the GPU run does (five processes, SQLite log, trace replay, a
worker restart into continuous mode for ccb and magnus_ccb), then `bench/gpu_e2e_report.py` on its output.
"""

from __future__ import annotations

import json
import shutil
import sqlite3
import sys

import pytest

from tests.stack_support import run_python as run
from tools.demo import DEFAULT_DATA_DIR as DATA_DIR
from tools.stack import REPO_ROOT

pytestmark = pytest.mark.integration


def test_driver_runs_pack_and_continuous_batching_end_to_end(tmp_path, prepared_stack_db):
    state = tmp_path / "state"
    state.mkdir()
    shutil.copy(prepared_stack_db[0], state / "log.db")  # predictor v1 + the tiny model's calibration
    shutil.copytree(prepared_stack_db[1], state / "model-store")
    workload = tmp_path / "workload.jsonl"
    run(["bench/e2e_workload.py", "--data", str(DATA_DIR), "--num-requests", "64", "--out", str(workload)], 120)
    out = tmp_path / "out"
    run(["bench/gpu_e2e.py", "--tiny", "--workload", str(workload), "--state", str(state), "--out", str(out),
         "--workdir", str(tmp_path / "work"), "--policies", "magnus_pack,ccb,magnus_ccb", "--rates", "4",
         "--requests-per-rate", "8", "--saturation-requests", "24", "--fixed-batch-size", "8",
         "--continuous-row-tokens", "96", "--preempt-share", "0.5"], 420)

    raw = json.loads((out / "e2e_raw.json").read_text())
    assert json.loads((out / "calibration.json").read_text()), "the run's calibration samples were not written"
    for policy in ("magnus_pack", "ccb", "magnus_ccb"):
        phases = raw["policies"][policy]["rates"]
        assert set(phases) == {"4.0", "400.0"}
        for phase in phases.values():
            records = phase["requests"]
            assert all(r["status"] == "OK" for r in records), records
            # trace replay: every request stops exactly at its reference length
            assert all(r["generated_tokens"] == r["true_gen_tokens"] for r in records)
    for policy in ("ccb", "magnus_ccb"):
        burst = raw["policies"][policy]["rates"]["400.0"]
        assert {b["size"] for b in burst["batches"]} == {1}  # one lease per request
        spans = sorted((r["started_at_s"], r["finished_at_s"]) for r in burst["requests"])
        assert any(later[0] < earlier[1] for earlier, later in zip(spans, spans[1:])), "no two requests ran at once"
    # rows of 96 tokens: requests longer than that ran alone once the rows drained, and (above) still
    # produced their reference lengths
    long = [r for r in burst["requests"] if r["input_tokens"] + r["true_gen_tokens"] > 96]
    assert long, "the workload sample has no request longer than a row"
    assert "longer than a row" in (out / "logs" / "worker.log").read_text()
    # magnus_ccb orders by predicted length
    assert all(r["predicted_tokens"] > 0 for r in raw["policies"]["magnus_ccb"]["rates"]["400.0"]["requests"])
    pack = raw["policies"]["magnus_pack"]["rates"]["400.0"]
    assert max(b["size"] for b in pack["batches"]) > 1  # the burst was packed into shared batches
    # straggler preemption: cut requests ran in more than one batch, and still produced exactly their
    # reference length (asserted above for every request)
    ran = sum(b["size"] for b in pack["batches"] if b["outcome"] == "ok")
    assert ran > len(pack["requests"]), "no request was cut and continued"

    run(["bench/gpu_e2e_report.py", str(out / "e2e_raw.json"), "--device", "cpu (test)", "--out", str(out)], 120)
    report = json.loads((out / "e2e.json").read_text())
    assert set(report["policies"]) == {"ccb", "magnus_ccb", "magnus_pack"}
    assert report["policies"]["ccb"]["saturated_requests_per_s"] > 0
    assert (out / "e2e.png").stat().st_size > 0


def test_calibration_samples_round_trip_so_a_later_run_skips_calibrating(tmp_path, prepared_stack_db):
    sys.path.insert(0, str(REPO_ROOT / "bench"))
    from gpu_e2e import export_calibration, import_calibration

    database = tmp_path / "log.db"
    shutil.copy(prepared_stack_db[0], database)
    exported = export_calibration(database, tmp_path / "calibration.json")
    assert exported > 0

    def samples() -> list[tuple]:
        with sqlite3.connect(database) as connection:
            return connection.execute("SELECT batch_size, input_tokens_max, gen_tokens_max, duration_s, device "
                                      "FROM batch_time_samples WHERE source='calibration' ORDER BY id").fetchall()

    before = samples()
    with sqlite3.connect(database) as connection:
        connection.execute("DELETE FROM batch_time_samples")
    assert import_calibration(database, tmp_path / "calibration.json") == exported
    assert samples() == before
