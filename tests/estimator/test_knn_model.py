"""The KNN batch-time model and shape validation: pure, no I/O."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.estimator.config import EstimatorSettings
from services.estimator.estimate import validate_shapes
from services.core.knn_model import BatchShape, KnnBatchTimeModel, TimeSample, cross_validated_mae_s
from services.shared.errors import InvalidArgument


def grid_samples() -> list[TimeSample]:
    return [
        TimeSample(BatchShape(b, l, g), 0.01 * b + 0.001 * l + 0.02 * g)
        for b in (1, 2, 4, 8, 16)
        for l in (16, 64, 256, 1024)
        for g in (8, 32, 128, 512)
    ]


def test_measured_shapes_get_their_measured_time() -> None:
    samples = grid_samples()
    model = KnnBatchTimeModel(n_neighbors=5)
    model.fit(samples)
    predicted = model.predict([s.shape for s in samples[:10]])
    assert predicted == pytest.approx([s.duration_s for s in samples[:10]])


def test_unmeasured_shapes_are_near_their_neighbours() -> None:
    model = KnnBatchTimeModel(n_neighbors=4)
    model.fit(grid_samples())
    short, long = model.predict([BatchShape(3, 40, 10), BatchShape(12, 700, 400)])
    assert short < 1.0 < long
    truth_long = 0.01 * 12 + 0.001 * 700 + 0.02 * 400
    assert abs(long - truth_long) / truth_long < 0.5


def test_fewer_samples_than_k_still_fit() -> None:
    model = KnnBatchTimeModel(n_neighbors=5)
    model.fit([TimeSample(BatchShape(1, 10, 10), 1.0), TimeSample(BatchShape(2, 20, 20), 3.0)])
    assert 1.0 <= model.predict([BatchShape(1, 15, 15)])[0] <= 3.0
    with pytest.raises(ValueError):
        KnnBatchTimeModel().fit([])


@settings(max_examples=30, deadline=None)
@given(
    durations=st.lists(st.floats(0.0, 100.0), min_size=1, max_size=20),
    query=st.tuples(st.integers(1, 1000), st.integers(1, 10**5), st.integers(1, 10**5)),
)
def test_estimates_stay_within_the_measured_range(durations, query) -> None:
    samples = [TimeSample(BatchShape(i + 1, 10 * (i + 1), 5 * (i + 1)), d) for i, d in enumerate(durations)]
    model = KnnBatchTimeModel()
    model.fit(samples)
    (estimate,) = model.predict([BatchShape(*query)])
    assert min(durations) - 1e-9 <= estimate <= max(durations) + 1e-9


def test_cross_validation_needs_enough_samples() -> None:
    samples = grid_samples()
    assert cross_validated_mae_s(samples[:9], 5) is None
    mae_s = cross_validated_mae_s(samples, 5)
    assert mae_s is not None and 0 < mae_s < np.mean([s.duration_s for s in samples])


@pytest.mark.parametrize(
    ("shapes", "field"),
    [
        ([], "shapes"),
        ([BatchShape(0, 1, 1)], "shapes[0].batch_size"),
        ([BatchShape(1, 1, 1), BatchShape(1, 0, 1)], "shapes[1].input_tokens_max"),
        ([BatchShape(1, 1, -3)], "shapes[0].gen_tokens_max"),
        ([BatchShape(1, 2_000_000, 1)], "shapes[0].input_tokens_max"),
        ([BatchShape(1, 1, 1)] * 3, "shapes"),
    ],
)
def test_bad_shapes_name_the_field(shapes, field) -> None:
    with pytest.raises(InvalidArgument) as caught:
        validate_shapes(shapes, EstimatorSettings(max_shapes=2))
    assert caught.value.field == field
