"""The pure retraining rules: which misses are bad, which rows train, which validate, push or not."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.trainer.selection import (
    LoggedBatch,
    LoggedRequest,
    MissRule,
    instruction_counts,
    is_held_back,
    keep_newest,
    length_holdout,
    select_length_samples,
    select_time_samples,
    should_push,
    time_holdout,
)

LENGTH_RULE = MissRule(10, 0.10)
TIME_RULE = MissRule(2.0, 0.20)


def request(seq, predicted, generated, status="completed", fallback=False, instruction="A") -> LoggedRequest:
    return LoggedRequest(seq, status, instruction, f"in {seq}", 50, predicted, generated, fallback)


def test_length_miss_needs_both_thresholds() -> None:
    assert not LENGTH_RULE.is_bad_miss(110, 100)  # 10 tokens is not > 10
    assert LENGTH_RULE.is_bad_miss(111, 100)
    assert LENGTH_RULE.is_bad_miss(89, 100)
    assert not LENGTH_RULE.is_bad_miss(1100, 1000)  # 100 tokens but not > 10 %
    assert LENGTH_RULE.is_bad_miss(1101, 1000)
    assert not LENGTH_RULE.is_bad_miss(25, 20)  # 25 % but only 5 tokens


def test_time_miss_needs_both_thresholds() -> None:
    assert not TIME_RULE.is_bad_miss(3.0, 1.5)  # 1.5 s is not > 2 s
    assert not TIME_RULE.is_bad_miss(23.0, 20.0)  # 3 s but 15 %
    assert TIME_RULE.is_bad_miss(25.0, 20.0)
    assert TIME_RULE.is_bad_miss(1.0, 10.0)


@given(
    predicted=st.integers(0, 10_000),
    actual=st.integers(0, 10_000),
    abs_threshold=st.floats(0, 100),
    rel=st.floats(0, 1),
)
def test_bad_miss_is_exactly_both_thresholds_and_symmetric_in_sign(predicted, actual, abs_threshold, rel) -> None:
    rule = MissRule(abs_threshold, rel)
    error = abs(predicted - actual)
    assert rule.is_bad_miss(predicted, actual) == (error > abs_threshold and error > rel * actual)
    assert rule.is_bad_miss(predicted, actual) == rule.is_bad_miss(2 * actual - predicted, actual)


def test_selection_takes_only_bad_misses_of_completed_model_predictions() -> None:
    rows = [
        request(1, 100, 150),  # bad miss: selected
        request(2, 100, 105),  # small miss
        request(3, 100, 150, status="failed"),
        request(4, 100, 150, fallback=True),  # the batcher's guess, not the model's
        request(5, 100, 150),  # held back for validation
        request(6, None, 150),  # never predicted
        request(7, 100, None),  # no truth
        request(8, 200, 20),  # bad over-prediction: selected
    ]
    selected = select_length_samples(rows, LENGTH_RULE, holdout_every=5)
    assert [(s.input_text, s.generated_tokens) for s in selected] == [("in 1", 150), ("in 8", 20)]
    assert [s.input_text for s in length_holdout(rows, holdout_every=5)] == ["in 5"]
    assert len(select_length_samples(rows, LENGTH_RULE, holdout_every=0)) == 3


def test_a_new_instruction_joins_whole_until_it_has_enough_samples_then_only_by_bad_misses() -> None:
    # "new" (1 sample known) alternates small misses (odd seq) and bad misses (even seq);
    # "A" (10 known) only small misses. Seq 5 and 10 are held back.
    rows = [request(seq, 100, 105 if seq % 2 else 150, instruction="new") for seq in range(1, 11)]
    rows += [request(seq, 100, 105) for seq in range(11, 15)]
    selected = select_length_samples(
        rows, LENGTH_RULE, holdout_every=5, known_counts={"A": 10, "new": 1}, min_samples_per_instruction=4
    )
    # 1, 2, 3 bring "new" to 4 samples whatever their miss; after that only bad misses: 4, 6, 8
    assert [s.input_text for s in selected] == ["in 1", "in 2", "in 3", "in 4", "in 6", "in 8"]
    # an unknown instruction starts at 0; a known one with enough samples is the paper's rule
    assert len(select_length_samples(rows, LENGTH_RULE, 5, min_samples_per_instruction=4)) == 6 + 4
    assert select_length_samples(rows, LENGTH_RULE, 5, known_counts={"A": 4, "new": 4}, min_samples_per_instruction=4) == (
        select_length_samples(rows, LENGTH_RULE, 5)
    )
    assert instruction_counts(selected) == {"new": 6}


@given(
    rows=st.lists(st.builds(request, seq=st.integers(1, 200), predicted=st.integers(1, 300),
                            generated=st.integers(0, 300), instruction=st.sampled_from(["A", "B", "C"])), max_size=60),
    known=st.dictionaries(st.sampled_from(["A", "B"]), st.integers(0, 20)),
    minimum=st.integers(0, 25),
)
def test_new_instruction_rows_add_to_the_bad_misses_never_to_the_held_back_and_stop_at_the_minimum(
    rows, known, minimum
) -> None:
    selected = select_length_samples(rows, LENGTH_RULE, 5, known_counts=known, min_samples_per_instruction=minimum)
    misses_only = select_length_samples(rows, LENGTH_RULE, 5)
    texts = [s.input_text for s in selected]
    assert set(s.input_text for s in misses_only) <= set(texts)  # bad misses still always join
    assert not any(is_held_back(int(t.split()[1]), 5) for t in texts)
    for instruction in ("A", "B", "C"):
        extra = len([s for s in selected if s.instruction == instruction]) - len(
            [s for s in misses_only if s.instruction == instruction]
        )
        assert 0 <= extra <= max(0, minimum - known.get(instruction, 0))


row_strategy = st.builds(
    request,
    seq=st.integers(1, 10_000),
    predicted=st.one_of(st.none(), st.integers(1, 3000)),
    generated=st.one_of(st.none(), st.integers(0, 3000)),
    status=st.sampled_from(["completed", "failed", "cancelled"]),
    fallback=st.booleans(),
)


@given(rows=st.lists(row_strategy, max_size=40), holdout_every=st.integers(0, 7))
def test_training_and_validation_rows_never_overlap(rows, holdout_every) -> None:
    selected = select_length_samples(rows, LENGTH_RULE, holdout_every)
    expected = [
        r for r in rows
        if r.status == "completed" and r.predicted_tokens is not None and r.generated_tokens is not None
        and not r.is_prediction_fallback and not is_held_back(r.seq, holdout_every)
        and LENGTH_RULE.is_bad_miss(r.predicted_tokens, r.generated_tokens)
    ]
    assert [s.input_text for s in selected] == [r.input_text for r in expected]
    held = length_holdout(rows, holdout_every)
    assert all(is_held_back(int(s.input_text.split()[1]), holdout_every) for s in held)
    assert all(not is_held_back(int(s.input_text.split()[1]), holdout_every) for s in selected)


def test_time_selection_uses_ok_batches_and_the_actual_shape() -> None:
    rows = [
        LoggedBatch(1, "ok", 4, 100, 80, estimated_s=1.0, actual_s=10.0),  # selected
        LoggedBatch(2, "ok", 4, 100, 80, estimated_s=9.0, actual_s=10.0),  # small miss
        LoggedBatch(3, "oom", 4, 100, 80, estimated_s=1.0, actual_s=10.0),
        LoggedBatch(4, "ok", 4, 100, None, estimated_s=1.0, actual_s=10.0),
        LoggedBatch(5, "ok", 8, 200, 90, estimated_s=1.0, actual_s=10.0),  # held back
        LoggedBatch(6, "ok", 2, 50, 40, estimated_s=None, actual_s=10.0),
        LoggedBatch(7, "ok", 4, 100, 80, estimated_s=1.0, actual_s=10.0, is_estimate_fallback=True),
    ]
    selected = select_time_samples(rows, TIME_RULE, holdout_every=5)
    assert [(s.shape.batch_size, s.shape.gen_tokens_max, s.duration_s) for s in selected] == [(4, 80, 10.0)]
    assert [s.shape.batch_size for s in time_holdout(rows, holdout_every=5)] == [8]


def test_push_only_when_not_worse() -> None:
    assert should_push([5.0], [5.0])
    assert should_push([4.0], [5.0])
    assert not should_push([5.1], [5.0])
    assert should_push([5.1], [5.0], tolerance_rel=0.05)
    assert should_push([9.0], None)  # nothing serving
    assert should_push(None, None)  # nothing to validate on
    assert should_push([], [])


def test_a_candidate_worse_only_within_the_noise_of_few_held_back_rows_is_pushed() -> None:
    # 10 rows, as a round early in a new task has: the candidate is better on 7 and loses big on 3
    serving = [10.0, 12, 9, 11, 10, 8, 13, 10, 2, 3]
    candidate = [8.0, 10, 7, 9, 8, 6, 11, 8, 14, 9]
    assert np.mean(candidate) > np.mean(serving)
    assert not should_push(candidate, serving)  # the plain comparison blocks it
    assert should_push(candidate, serving, noise_z=1.645)
    # worse on every row by a margin: blocked whatever the noise allowance
    assert not should_push([s + 3 for s in serving], serving, noise_z=1.645)
    with pytest.raises(ValueError):
        should_push([1.0, 2.0], [1.0], noise_z=1.0)


@given(serving=st.lists(st.floats(0, 1000), min_size=1, max_size=50), gain=st.floats(0, 100),
       noise_z=st.floats(0, 3))
def test_a_candidate_no_worse_on_every_row_is_always_pushed(serving, gain, noise_z) -> None:
    candidate = [max(0.0, s - gain) for s in serving]
    assert should_push(candidate, serving, noise_z=noise_z)


def test_keep_newest_drops_the_oldest() -> None:
    assert keep_newest([1, 2, 3, 4], 2) == [3, 4]
    assert keep_newest([1, 2], 5) == [1, 2]


def test_new_time_samples_supersede_old_ones_of_a_similar_shape_only():
    from services.core.knn_model import BatchShape, TimeSample
    from services.trainer.selection import supersede_similar_shapes

    old = [
        TimeSample(BatchShape(8, 100, 50), 1.0),  # within 20 % of the new sample in every dimension
        TimeSample(BatchShape(9, 110, 55), 1.1),
        TimeSample(BatchShape(8, 400, 50), 2.0),  # L four times larger: a different shape
        TimeSample(BatchShape(64, 100, 50), 3.0),  # batch eight times larger
    ]
    new = [TimeSample(BatchShape(8, 100, 50), 5.0)]
    kept = supersede_similar_shapes(old, new, log_radius=0.2)
    assert kept == old[2:]
    assert supersede_similar_shapes(old, new, log_radius=0.0) == old  # the paper's add-only rule
    assert supersede_similar_shapes(old, [], log_radius=0.2) == old
