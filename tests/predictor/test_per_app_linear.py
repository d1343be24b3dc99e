"""per_app_linear, the model registry and the length metrics: pure, no I/O."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.core.length_model import LengthModel, LengthSample, length_model_names, make_length_model
from services.core.length_metrics import acc_within, length_metrics, mae_tokens
from services.core.per_app_linear import PerAppLinearModel, fit_line


def on_line(instruction: str, intercept: float, slope: float, xs: list[int]) -> list[LengthSample]:
    return [LengthSample(instruction, "x", x, round(intercept + slope * x)) for x in xs]


def test_each_instruction_gets_its_own_line() -> None:
    model = PerAppLinearModel()
    model.fit(on_line("A", 5, 2.0, list(range(10, 200, 10))) + on_line("B", 40, 0.5, list(range(10, 200, 10))))
    predicted = model.predict(["A", "B"], ["u", "v"], [100, 100])
    assert predicted.tolist() == [205, 90]
    assert predicted.dtype == np.int64


def test_unseen_instruction_uses_the_pooled_line() -> None:
    model = PerAppLinearModel()
    samples = on_line("A", 0, 1.0, [10, 20, 30]) + on_line("B", 0, 3.0, [10, 20, 30])
    model.fit(samples)
    pooled = fit_line(np.array([s.input_tokens for s in samples]), np.array([s.generated_tokens for s in samples]))
    assert model.predict(["never seen"], ["u"], [20]).tolist() == [round(pooled.at(np.array(20.0)))]
    assert model.predict(["never seen"], ["u"], [20]).tolist() == [40]


def test_apps_with_too_few_samples_use_the_pooled_line() -> None:
    model = PerAppLinearModel(min_samples_per_app=3)
    model.fit(on_line("A", 0, 1.0, [10, 20, 30, 40]) + on_line("rare", 0, 10.0, [10, 20]))
    assert "rare" not in model.lines
    assert model.predict(["rare"], ["u"], [10]).tolist() == model.predict(["unseen"], ["u"], [10]).tolist()


def test_predictions_are_clipped_to_one_and_max() -> None:
    model = PerAppLinearModel(max_tokens=100)
    model.fit(on_line("up", 0, 10.0, [1, 5, 10]) + on_line("down", 50, -5.0, [1, 5, 10]))
    assert model.predict(["up", "down"], ["u", "v"], [1000, 1000]).tolist() == [100, 1]


def test_constant_inputs_give_a_flat_line_at_the_mean() -> None:
    line = fit_line(np.array([7, 7, 7]), np.array([10, 20, 30]))
    assert (line.intercept_tokens, line.slope) == (20.0, 0.0)


def test_fit_keeps_the_training_samples_and_refuses_empty_sets() -> None:
    model = PerAppLinearModel()
    samples = on_line("A", 1, 1.0, [1, 2, 3])
    model.fit(samples)
    assert model.samples == samples
    with pytest.raises(ValueError):
        PerAppLinearModel().fit([])


def test_predict_refuses_mismatched_lengths() -> None:
    model = PerAppLinearModel()
    model.fit(on_line("A", 1, 1.0, [1, 2, 3]))
    with pytest.raises(ValueError):
        model.predict(["A", "A"], ["u"], [1, 2])


@settings(max_examples=50, deadline=None)
@given(
    rows=st.lists(
        st.tuples(st.sampled_from(["A", "B", "C"]), st.integers(0, 5000), st.integers(0, 5000)), min_size=1, max_size=40
    ),
    queries=st.lists(st.tuples(st.sampled_from(["A", "B", "Z"]), st.integers(0, 10**6)), min_size=1, max_size=10),
    max_tokens=st.integers(1, 4096),
)
def test_predictions_always_lie_in_one_to_max(rows, queries, max_tokens) -> None:
    model = PerAppLinearModel(max_tokens=max_tokens)
    model.fit([LengthSample(app, "x", x, y) for app, x, y in rows])
    predicted = model.predict([q[0] for q in queries], ["u"] * len(queries), [q[1] for q in queries])
    assert len(predicted) == len(queries)
    assert ((predicted >= 1) & (predicted <= max_tokens)).all()


def test_registry_builds_models_by_name() -> None:
    assert "per_app_linear" in length_model_names()
    model = make_length_model("per_app_linear", max_tokens=50)
    assert isinstance(model, LengthModel)
    assert model.max_tokens == 50
    with pytest.raises(ValueError, match="unknown length model"):
        make_length_model("no_such_model")


def test_metrics() -> None:
    truth = np.array([100, 100, 5, 200])
    predicted = np.array([109, 120, 14, 219])
    assert mae_tokens(predicted, truth) == pytest.approx((9 + 20 + 9 + 19) / 4)
    # |err| <= max(10, 10 % of truth): 9 ok, 20 no, 9 ok, 19 <= 20 ok
    assert acc_within(predicted, truth) == pytest.approx(0.75)
    assert length_metrics(predicted, truth)["num_samples"] == 4
    assert mae_tokens(np.array([]), np.array([])) == 0.0
