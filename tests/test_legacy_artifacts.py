"""Model versions saved before the model code moved to `services/core/` still load.

Artifacts are joblib (pickle) files, and pickle names each class by its module, so a version
stored earlier references `services.predictor.*` or `services.estimator.knn_model`. Those paths
stay importable as thin re-exports; these tests write artifacts under the old names and load them.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import numpy as np
import pytest

from services.core.knn_model import BatchShape, KnnBatchTimeModel, TimeSample
from services.core.length_model import LengthSample
from services.core.per_app_linear import Line, PerAppLinearModel
from services.core.per_task_mean import PerTaskMeanModel
from services.shared.model_store import read_artifact, write_artifact

# Every class a stored version holds, under the module it was pickled from before the move.
OLD_PATHS = {
    "services.predictor.length_model": ["LengthSample"],
    "services.predictor.embedding_forest": ["EmbeddingForestModel", "ForestConfig", "_ForestPredict"],
    "services.predictor.encoders": ["SentenceEncoder", "StaticEncoder"],
    "services.predictor.packed_forest": ["PackedForest"],
    "services.predictor.per_app_linear": ["Line", "PerAppLinearModel"],
    "services.predictor.per_task_mean": ["PerTaskMeanModel"],
    "services.estimator.knn_model": ["BatchShape", "KnnBatchTimeModel", "TimeSample"],
}


@pytest.mark.parametrize("old_module", sorted(OLD_PATHS))
def test_old_paths_name_the_moved_classes(old_module: str) -> None:
    new_module = old_module.replace("services.predictor.", "services.core.").replace(
        "services.estimator.", "services.core."
    )
    old, new = importlib.import_module(old_module), importlib.import_module(new_module)
    for name in OLD_PATHS[old_module]:
        assert getattr(old, name) is getattr(new, name)


def _saved_under_old_paths(monkeypatch: pytest.MonkeyPatch, path: Path, kind: str, model: object) -> str:
    # Pickle looks a class up by `__module__`, so this writes exactly what the old code wrote.
    for old_module, names in OLD_PATHS.items():
        old = importlib.import_module(old_module)
        for name in names:
            monkeypatch.setattr(getattr(old, name), "__module__", old_module)
    sha256 = write_artifact(path, kind, "test", model)
    monkeypatch.undo()
    return sha256


def test_length_models_saved_under_the_predictor_paths_load(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    samples = [LengthSample(f"app{i % 3}", "x" * i, 10 + i, 5 + 7 * (i % 3) + i) for i in range(30)]
    queries = (["app0", "app1", "app2", "new"], ["a", "bb", "ccc", "d"], [10, 20, 30, 40])
    for model in (PerTaskMeanModel(), PerAppLinearModel()):
        model.fit(samples)
        path = tmp_path / f"{model.name}.joblib"
        sha256 = _saved_under_old_paths(monkeypatch, path, "predictor", model)
        assert b"services.predictor." in path.read_bytes()
        assert b"services.core." not in path.read_bytes()

        loaded = read_artifact(path, "predictor", sha256)
        assert type(loaded) is type(model)
        assert isinstance(loaded.samples[0], LengthSample)
        np.testing.assert_array_equal(loaded.predict(*queries), model.predict(*queries))
    assert Line.__module__ == "services.core.per_app_linear"  # restored: new artifacts name the new path


def test_knn_saved_under_the_estimator_path_loads(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    samples = [
        TimeSample(BatchShape(int(b), int(i), int(g)), float(b * g) / 1000)
        for b, i, g in rng.integers(1, 64, size=(40, 3))
    ]
    model = KnnBatchTimeModel(n_neighbors=3)
    model.fit(samples)
    path = tmp_path / "knn.joblib"
    sha256 = _saved_under_old_paths(monkeypatch, path, "estimator", model)
    assert b"services.estimator.knn_model" in path.read_bytes()

    loaded = read_artifact(path, "estimator", sha256)
    assert type(loaded) is KnnBatchTimeModel
    shapes = [BatchShape(4, 16, 32), BatchShape(60, 8, 2)]
    np.testing.assert_allclose(loaded.predict(shapes), model.predict(shapes))
