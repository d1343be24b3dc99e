"""Calibrated quantiles (services.core.conformal) and the served model's use of them."""

from __future__ import annotations

import pickle
from dataclasses import replace

import numpy as np
import pytest
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from hypothesis import given
from hypothesis import strategies as st

from magnus.v1 import predictor_pb2
from services.core.conformal import calibrate, conformal_quantile, predict_quantiles
from services.core.embedding_forest import SERVED_MODEL
from services.core.length_model import LengthSample, make_length_model

LEVELS = (0.5, 0.9, 0.95)


def synthetic(rng: np.random.Generator, n: int, noise: float) -> dict[str, np.ndarray]:
    """log1p(length) = mu + sigma * eps, heavy-tailed eps, sigma varying per row (heteroscedastic)."""
    mu = rng.uniform(1.0, 6.0, n)
    sigma = noise * rng.uniform(0.2, 1.0, n)
    log_true = mu + sigma * rng.standard_t(4, n)
    return {"log_true": log_true, "log_point": mu, "spread": sigma, "log_input": mu, "embeddings": rng.normal(size=(n, 4))}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_split_conformal_covers_each_group_at_its_level(seed: int) -> None:
    rng = np.random.default_rng(seed)
    parts = {"tight": synthetic(rng, 1500, 0.1), "loose": synthetic(rng, 1500, 1.0)}
    calibration = calibrate(
        **{k: np.concatenate([p[k] for p in parts.values()]) for k in ("log_true", "log_point", "spread", "log_input", "embeddings")},
        groups=["tight"] * 1500 + ["loose"] * 1500,
        spread_floor=0.0,
    )
    for name, noise in (("tight", 0.1), ("loose", 1.0)):
        fresh = synthetic(rng, 4000, noise)
        result = predict_quantiles(
            calibration, groups=[name] * 4000, levels=LEVELS,
            **{k: fresh[k] for k in ("log_point", "spread", "log_input", "embeddings")},
        )
        assert not result.is_ood.mean() > 0.05
        covered = (np.expm1(fresh["log_true"])[:, None] <= result.quantiles).mean(axis=0)
        assert np.all(np.abs(covered - np.array(LEVELS)) < 0.035), (name, covered)


def test_an_unseen_instruction_is_never_narrower_than_the_loosest_known_one_even_where_trees_agree() -> None:
    rng = np.random.default_rng(5)
    parts = {"tight": synthetic(rng, 1500, 0.1), "loose": synthetic(rng, 1500, 1.0)}
    keys = ("log_true", "log_point", "spread", "log_input", "embeddings")
    calibration = calibrate(**{k: np.concatenate([p[k] for p in parts.values()]) for k in keys},
                            groups=["tight"] * 1500 + ["loose"] * 1500, spread_floor=0.0)
    # pickled before the floor: groups without residuals
    old = replace(calibration, groups={n: replace(g, log_residuals=None) for n, g in calibration.groups.items()})
    loose = parts["loose"]
    loose_q90 = conformal_quantile(np.sort(loose["log_true"] - loose["log_point"]), 0.9)
    fresh = synthetic(rng, 50, 0.1)
    query = {"log_point": fresh["log_point"], "log_input": fresh["log_input"], "embeddings": fresh["embeddings"],
             "levels": (0.1, 0.9)}
    agreeing = np.full(50, 1e-3)  # trees fit on other tasks that agree on this one

    new_task = predict_quantiles(calibration, spread=agreeing.copy(), groups=["new"] * 50, **query)
    before = predict_quantiles(old, spread=agreeing.copy(), groups=["new"] * 50, **query)
    assert new_task.is_ood.all()
    # two groups: the group-level conformal p90 is the looser group's own p90 residual
    assert (np.log1p(new_task.quantiles[:, 1]) >= fresh["log_point"] + loose_q90 - 1e-9).all()
    assert (new_task.quantiles[:, 1] > before.quantiles[:, 1]).any()
    assert np.array_equal(new_task.quantiles[:, 0], before.quantiles[:, 0])  # no floor below the median
    # in-distribution rows of a known instruction are untouched
    seen = predict_quantiles(calibration, spread=agreeing.copy(), groups=["tight"] * 50, **query)
    seen_before = predict_quantiles(old, spread=agreeing.copy(), groups=["tight"] * 50, **query)
    assert (~seen.is_ood).sum() > 40
    assert np.array_equal(seen.quantiles[~seen.is_ood], seen_before.quantiles[~seen.is_ood])


def test_the_per_level_lookups_are_not_pickled() -> None:
    rng = np.random.default_rng(6)
    data = synthetic(rng, 200, 0.5)
    calibration = calibrate(**data, groups=["a"] * 200)
    calibration.lookup((0.9,))
    restored = pickle.loads(pickle.dumps(calibration))
    assert "_level_lookups" not in restored.__dict__
    assert np.array_equal(restored.lookup((0.9,)).ood_log_floor, calibration.lookup((0.9,)).ood_log_floor)


@given(st.lists(st.floats(-50, 50), min_size=1, max_size=200), st.floats(0.01, 0.99), st.floats(0.01, 0.99))
def test_conformal_quantile_is_monotone_and_at_least_the_finite_sample_rank(scores, q1, q2) -> None:
    ordered = np.sort(np.array(scores))
    low, high = sorted((q1, q2))
    assert conformal_quantile(ordered, low) <= conformal_quantile(ordered, high)
    # at least ceil((n+1)q) - 1 of the n scores lie strictly below it (or all are <= it)
    value = conformal_quantile(ordered, high)
    assert (ordered <= value).mean() >= min(1.0, high)


def forest_samples() -> list[LengthSample]:
    rng = np.random.default_rng(0)
    samples = []
    for instruction, ratio, noise in (("double", 2.0, 0.1), ("summarise", 0.3, 0.5)):
        for i in range(300):
            n = int(rng.integers(10, 300))
            length = max(1, round(ratio * n * np.exp(noise * rng.normal())))
            samples.append(LengthSample(instruction, f"text number {i} " * (i % 7 + 1), n, length))
    return samples


@pytest.fixture
def calibrated_model(fake_static_cache):
    model = make_length_model(SERVED_MODEL, num_trees=30)
    model.fit(forest_samples())
    return model


def test_served_model_quantiles_are_ordered_and_above_the_point(calibrated_model) -> None:
    query = (["double", "summarise"], ["text number 1 text", "text number 2 text"], [100, 100])
    point, upper, result = calibrated_model.predict_quantiles(*query, levels=LEVELS)
    assert result is not None and result.quantiles.shape == (2, 3)
    assert np.array_equal(point, calibrated_model.predict(*query))
    assert (np.diff(result.quantiles, axis=1) >= 0).all() and (result.quantiles[:, 1] >= point).all()
    # the noisier task gets the wider relative interval
    width = result.quantiles[:, 1] / point
    assert width[1] > width[0]
    assert not result.is_ood.any()


def test_unseen_instruction_is_out_of_distribution_with_a_wider_interval(calibrated_model) -> None:
    inputs = [f"text number {i} text" for i in range(20)]
    seen = calibrated_model.predict_quantiles(["double"] * 20, inputs, [100] * 20, levels=LEVELS)
    unseen = calibrated_model.predict_quantiles(["write a poem"] * 20, inputs, [100] * 20, levels=LEVELS)
    assert unseen[2].is_ood.all() and (unseen[2].ood_score > 1).all()
    seen_ratio = seen[2].quantiles[:, 1] / seen[0]
    unseen_ratio = unseen[2].quantiles[:, 1] / unseen[0]
    assert np.median(unseen_ratio) > 1.5 * np.median(seen_ratio)
    # an input far longer than any seen for the instruction is flagged too
    long = calibrated_model.predict_quantiles(["double"], ["text number 1 text"], [100_000], levels=LEVELS)[2]
    assert long.is_ood.all()


def test_a_model_pickled_before_calibration_degrades_to_the_upper_estimate(calibrated_model) -> None:
    calibrated_model.calibration = None
    point, upper, result = calibrated_model.predict_quantiles(["double"], ["text"], [50], levels=LEVELS)
    assert result is None and upper[0] >= point[0] >= 1


def old_response_class():
    """PredictLengthsResponse as clients built before the quantile fields know it (fields 1-4)."""
    file = descriptor_pb2.FileDescriptorProto(name="old_predictor.proto", package="old.v1", syntax="proto3")
    message = file.message_type.add(name="PredictLengthsResponse")
    label, int32, int64 = (descriptor_pb2.FieldDescriptorProto.LABEL_REPEATED,
                           descriptor_pb2.FieldDescriptorProto.TYPE_INT32, descriptor_pb2.FieldDescriptorProto.TYPE_INT64)
    message.field.add(name="predicted_tokens", number=1, type=int32, label=label)
    message.field.add(name="input_tokens", number=2, type=int32, label=label)
    message.field.add(name="model_version", number=3, type=int64,
                      label=descriptor_pb2.FieldDescriptorProto.LABEL_OPTIONAL)
    message.field.add(name="predicted_tokens_upper", number=4, type=int32, label=label)
    pool = descriptor_pool.DescriptorPool()
    pool.Add(file)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("old.v1.PredictLengthsResponse"))


def test_old_clients_read_new_responses_and_new_clients_read_old_ones() -> None:
    new = predictor_pb2.PredictLengthsResponse(
        predicted_tokens=[10, 20], input_tokens=[5, 6], model_version=7, predicted_tokens_upper=[12, 25],
        quantiles=[predictor_pb2.LengthQuantile(level=0.9, tokens=[15, 40])],
        uncertainty=[0.1, 0.5], ood_score=[0.3, 2.0], is_out_of_distribution=[False, True],
    )
    Old = old_response_class()
    old = Old.FromString(new.SerializeToString())
    assert list(old.predicted_tokens) == [10, 20] and list(old.input_tokens) == [5, 6]
    assert old.model_version == 7 and list(old.predicted_tokens_upper) == [12, 25]
    back = predictor_pb2.PredictLengthsResponse.FromString(old.SerializeToString())
    assert list(back.predicted_tokens) == [10, 20]
    from_old = predictor_pb2.PredictLengthsResponse.FromString(
        Old(predicted_tokens=[3], input_tokens=[4], model_version=1, predicted_tokens_upper=[3]).SerializeToString()
    )
    assert list(from_old.quantiles) == [] and list(from_old.is_out_of_distribution) == []


def test_ood_inflation_widens_only_ood_requests_and_is_learned_from_a_left_out_task(calibrated_model) -> None:
    from bench.predictor_shift import INFLATION_GRID, columns, needed_inflation, with_inflation

    query = (["double", "write a poem"], ["text number 1 text"] * 2, [100, 100])
    narrow = calibrated_model.predict_quantiles(*query, levels=LEVELS)[2].quantiles[:, 1]
    wide = with_inflation(calibrated_model, 4.0).predict_quantiles(*query, levels=LEVELS)[2].quantiles[:, 1]
    assert wide[0] == narrow[0] and wide[1] > narrow[1]
    # a new task 20x longer than anything seen needs more than no inflation, and the search finds it
    long_task = [LengthSample("translate to verbose", f"text {i}", 50, 1000 + i) for i in range(40)]
    needed = needed_inflation(calibrated_model, long_task)
    assert 1.0 < needed < INFLATION_GRID[-1]
    p90 = with_inflation(calibrated_model, needed).predict_quantiles(*columns(long_task), levels=(0.9,))[2]
    assert (np.array([s.generated_tokens for s in long_task]) <= p90.quantiles[:, 0]).mean() >= 0.9


def test_calibration_rows_cap_each_instruction_and_keep_every_one() -> None:
    from services.core.embedding_forest import MAX_CALIBRATION_ROWS_PER_APP, calibration_rows

    instructions = ["big"] * (MAX_CALIBRATION_ROWS_PER_APP + 500) + ["small"] * 7
    rows = calibration_rows(instructions, seed=0)
    kept = [instructions[i] for i in rows]
    assert kept.count("big") == MAX_CALIBRATION_ROWS_PER_APP and kept.count("small") == 7
    assert len(set(rows.tolist())) == len(rows) and np.array_equal(rows, calibration_rows(instructions, seed=0))
