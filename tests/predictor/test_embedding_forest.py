"""The paper's model and its pieces: group sums, static encoder, packed forest, named configurations.

Static encoders use random piece vectors (the `fake_static_cache` fixture): no transformer runs.
"""

from __future__ import annotations

import io
import pickle

import joblib
import numpy as np
import pytest
from sklearn.ensemble import RandomForestRegressor

from services.core.embedding_forest import CONFIGS, SERVED_MODEL, EmbeddingForestModel, ForestConfig
from services.core.encoders import build_static_encoder
from services.core.length_model import LengthSample, length_model_names, make_length_model
from services.core.length_metrics import report_metrics
from services.core.packed_forest import PackedForest
from services.core.per_task_mean import PerTaskMeanModel
from services.core.text_features import group_sum, surface_features


def test_group_sum_divides_each_group_sum_by_sqrt_of_its_size() -> None:
    vector = np.arange(8, dtype=np.float32)[None, :]
    assert group_sum(vector, 2).tolist() == [[(0 + 1 + 2 + 3) / 2, (4 + 5 + 6 + 7) / 2]]
    rows = np.random.default_rng(1).normal(size=(5, 384))
    # linear, so a static table can be stored already compressed
    assert np.allclose(group_sum(rows, 16).mean(axis=0), group_sum(rows.mean(axis=0, keepdims=True), 16)[0], atol=1e-5)
    with pytest.raises(ValueError):
        group_sum(rows, 0)


def test_surface_features() -> None:
    features = surface_features(["ab cd\nef", "你好", ""])
    assert features[0].tolist() == [8, 2, 3, 0.0]
    assert features[1].tolist() == [2, 1, 1, 1.0]
    assert features[2].tolist() == [0, 1, 0, 0.0]


def test_packed_forest_matches_scikit_learn() -> None:
    rng = np.random.default_rng(2)
    x = rng.normal(size=(400, 6)).astype(np.float32)
    y = x[:, 0] * 3 + np.sin(x[:, 1]) + rng.normal(scale=0.1, size=400)
    forest = RandomForestRegressor(n_estimators=20, min_samples_leaf=3, random_state=0).fit(x, y)
    packed = PackedForest.from_sklearn(forest)
    queries = rng.normal(size=(50, 6)).astype(np.float32)
    assert np.allclose(packed.predict(queries), forest.predict(queries))
    per_tree = np.stack([tree.predict(queries) for tree in forest.estimators_])
    assert np.allclose(packed.predict(queries, "median"), np.median(per_tree, axis=0))
    with pytest.raises(ValueError):
        packed.predict(queries[:, :5])
    assert np.allclose(packed.quantile(queries, 0.9), np.quantile(per_tree, 0.9, axis=0))
    with pytest.raises(ValueError, match="quantile"):
        packed.quantile(queries, 1.5)


def test_static_encoder_is_the_mean_piece_vector_over_a_bounded_prefix(fake_static_cache) -> None:
    encoder = build_static_encoder([4], max_prefix_pieces=3, show_progress=False)
    table = group_sum(fake_static_cache, 4)
    ids = encoder.piece_ids(["hello world", "one two three four five"])
    assert len(ids[0]) == 2 and len(ids[1]) == 3  # the second is cut at the prefix bound
    encoded = encoder.encode_grouped(["hello world", "", "one two three four five"], 4)
    assert np.allclose(encoded[0], table[ids[0]].mean(axis=0), atol=1e-5)
    assert np.allclose(encoded[1], 0.0)
    assert np.allclose(encoded[2], table[ids[1]].mean(axis=0), atol=1e-5)
    restored = pickle.loads(pickle.dumps(encoder))
    assert np.array_equal(restored.encode_grouped(["hello world"], 4), encoded[:1])
    with pytest.raises(ValueError, match="groups"):
        encoder.encode_grouped(["x"], 16)


def ratio_samples(instruction: str, ratio: float, inputs: range) -> list[LengthSample]:
    return [LengthSample(instruction, f"text number {n} " * (n % 7 + 1), n, round(ratio * n)) for n in inputs]


def fitted(config: ForestConfig, samples: list[LengthSample]) -> EmbeddingForestModel:
    model = EmbeddingForestModel("test", config, num_trees=10)
    model.fit(samples)
    return model


def test_log_ratio_target_extrapolates_beyond_the_training_lengths(fake_static_cache) -> None:
    samples = ratio_samples("double", 2.0, range(10, 200, 3)) + ratio_samples("half", 0.5, range(10, 200, 3))
    paper = fitted(ForestConfig(), samples)
    ratio = fitted(ForestConfig(target="log_ratio", aggregate="median", max_depth=8), samples)
    query = (["double", "half"], ["text number 1000", "text number 1000"], [1000, 1000])
    assert paper.predict(*query)[0] <= max(s.generated_tokens for s in samples)  # a leaf mean cannot go further
    assert np.allclose(ratio.predict(*query), [2000, 500], rtol=0.1)


def test_exact_cache_answers_a_seen_prompt_with_its_median_length(fake_static_cache) -> None:
    samples = ratio_samples("A", 1.0, range(10, 60)) + [LengthSample("A", "repeat me", 40, n) for n in (7, 9, 300)]
    model = fitted(ForestConfig(use_exact_cache=True), samples)
    assert model.predict(["A"], ["repeat me"], [40]).tolist() == [9]
    without = fitted(ForestConfig(), samples)
    assert without.predict(["A"], ["repeat me"], [40]).tolist() != [9]


def test_upper_estimate_is_wide_where_the_training_lengths_scatter(fake_static_cache) -> None:
    # "steady" always doubles its input; "noisy" gives 0.5x or 4x at random: its trees disagree
    rng = np.random.default_rng(0)
    steady = ratio_samples("steady", 2.0, range(10, 200, 2))
    noisy = [LengthSample("noisy", s.input_text, s.input_tokens, round(s.input_tokens * rng.choice([0.5, 4.0])))
             for s in ratio_samples("noisy", 1.0, range(10, 200, 2))]
    config = ForestConfig(target="log_ratio", aggregate="median", regressor="rf_leaf5", use_exact_cache=True)
    model = fitted(config, steady + noisy)
    query = (["steady", "noisy"], ["text number 101 " * 4, "text number 101 " * 4], [101, 101])
    point, upper = model.predict_with_upper(*query, quantile=0.9)
    assert np.array_equal(point, model.predict(*query))
    assert (upper >= point).all()
    assert upper[1] / point[1] > 1.5 * upper[0] / point[0]  # the scattered task is flagged
    seen = noisy[0]
    point, upper = model.predict_with_upper([seen.instruction], [seen.input_text], [seen.input_tokens])
    assert upper.tolist() == point.tolist() == [seen.generated_tokens]  # an exact match is certain


def test_served_model_predicts_in_range_and_survives_joblib(fake_static_cache) -> None:
    samples = ratio_samples("A", 1.5, range(5, 120)) + ratio_samples("B", 0.3, range(5, 120))
    model = make_length_model(SERVED_MODEL, max_tokens=100)
    model.fit(samples)
    query = (["A", "B", "never seen"], ["text number 3", "x", "another instruction"], [50, 5000, 30])
    predicted = model.predict(*query)
    assert predicted.dtype == np.int64 and ((predicted >= 1) & (predicted <= 100)).all()
    assert set(model.app_vectors) == {"A", "B", "never seen"}  # instruction vectors are cached
    buffer = io.BytesIO()
    joblib.dump(model, buffer)
    buffer.seek(0)
    assert np.array_equal(joblib.load(buffer).predict(*query), predicted)
    assert model.samples == samples
    with pytest.raises(ValueError):
        model.predict(["A"], ["x", "y"], [1])


def test_every_configuration_is_a_registered_model_family() -> None:
    assert set(CONFIGS) | {"per_task_mean", "per_app_linear"} <= set(length_model_names())
    assert SERVED_MODEL in CONFIGS and CONFIGS[SERVED_MODEL].encoder == "static"
    assert make_length_model("paper_minilm").config == ForestConfig(encoder="sentence")
    with pytest.raises(ValueError):
        ForestConfig(target="cubes")
    with pytest.raises(ValueError):
        ForestConfig(regressor="hgb_l1", aggregate="median")


def test_per_task_mean_baseline() -> None:
    model = PerTaskMeanModel()
    model.fit([LengthSample("A", "x", 5, 10), LengthSample("A", "y", 50, 20), LengthSample("B", "z", 1, 100)])
    assert model.predict(["A", "B", "C"], ["u", "v", "w"], [1, 1, 1]).tolist() == [15, 100, 43]


def test_report_metrics() -> None:
    truth = np.array([10, 20, 30])
    result = report_metrics(np.array([10, 20, 33]), truth)
    assert result["mae"] == 1.0 and result["n"] == 3 and result["acc10"] == 1.0
    assert result["rmse"] == pytest.approx(np.sqrt(3.0), abs=1e-3)
    assert result["r2"] == pytest.approx(1 - 9 / 200, abs=1e-4)


def test_benchmarks_set_the_transformer_memo_aside_and_restore_it() -> None:
    from services.core import encoders

    encoders._SENTENCE_MEMO["some-model"] = {"text": np.zeros(3, np.float32)}
    try:
        with encoders.sentence_memo_set_aside():
            assert encoders._SENTENCE_MEMO == {}
        assert set(encoders._SENTENCE_MEMO["some-model"]) == {"text"}
    finally:
        encoders._SENTENCE_MEMO.clear()
