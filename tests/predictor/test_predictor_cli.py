"""The train and evaluate CLIs on a small slice of ../shared/data, with a fake distilled table."""

from __future__ import annotations

import json
from pathlib import Path

from services.predictor import evaluate, train
from services.core.embedding_forest import SERVED_MODEL
from services.shared.model_store import read_artifact, sha256_file

DATA_DIR = Path(__file__).resolve().parents[2].parent / "shared" / "data"


def test_train_writes_a_loadable_artifact_and_its_metrics(tmp_path, fake_static_cache, capsys) -> None:
    out = tmp_path / "model"
    assert train.main(["--data", str(DATA_DIR), "--out", str(out), "--max-per-task", "60"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["model"] == SERVED_MODEL and metrics["test_is_in_sample"] is False
    assert set(metrics["per_task"]) >= {"gec", "code_comment"} and metrics["overall"]["n"] > 50
    assert metrics["sha256"] == sha256_file(out / "model.joblib")
    model = read_artifact(out / "model.joblib", "predictor", metrics["sha256"])
    assert model.name == SERVED_MODEL and len(model.samples) == metrics["num_train_samples"]
    assert "test MAE" in capsys.readouterr().out


def test_evaluate_writes_the_report_in_the_documented_shape(tmp_path, fake_static_cache) -> None:
    out = tmp_path / "report"
    argv = ["--data", str(DATA_DIR), "--out", str(out), "--max-per-task", "40", "--num-single", "3", "--num-batches", "2",
            "--models", "per_task_mean", "per_app_linear", SERVED_MODEL]
    assert evaluate.main(argv) == 0
    report = json.loads((out / "metrics.json").read_text())
    assert report["served_model"] == SERVED_MODEL
    assert set(report["models"]) == {"per_task_mean", "per_app_linear", SERVED_MODEL}
    for entry in report["models"].values():
        assert set(entry["overall"]) == {"mae", "rmse", "r2", "acc10", "n"}
        assert len(entry["per_task"]) == 8
    assert report["latency"]["batch32_predictions_per_s"] > 0 and report["latency"]["single_p50_ms"] > 0
    assert len(list(out.glob("scatter_*.png"))) == 8
    assert "| per_app_linear |" in (out / "README.md").read_text()
