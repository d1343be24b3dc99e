"""The learned batch run time (policy/run_time.py) and the lease-time deadline split it drives."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.batcher.policy.run_time import MIN_SAMPLES, RunTimeModel
from services.batcher.policy.wait import misses_deadline


def true_run_s(size: int, input_tokens: int, gen_tokens: int) -> float:
    return 0.05 + 2e-4 * size * input_tokens + 0.01 * gen_tokens + 0.002 * size * gen_tokens


def test_knows_nothing_before_enough_batches() -> None:
    model = RunTimeModel()
    for i in range(MIN_SAMPLES - 1):
        model.observe(1 + i, 32, 16, true_run_s(1 + i, 32, 16))
    assert model.predict_s(4, 32, 16) is None


@settings(max_examples=50, deadline=None)
@given(seed=st.integers(0, 2**16))
def test_extrapolates_a_linear_device_beyond_the_shapes_it_saw(seed: int) -> None:
    rng = np.random.default_rng(seed)
    model = RunTimeModel()
    for _ in range(64):  # batches of at most 16 rows, like a small calibration
        size, input_tokens, gen_tokens = int(rng.integers(1, 17)), int(rng.integers(8, 200)), int(rng.integers(4, 64))
        model.observe(size, input_tokens, gen_tokens, true_run_s(size, input_tokens, gen_tokens))
    predicted = model.predict_s(200, 60, 30)  # 12x the largest batch seen
    assert predicted == pytest.approx(true_run_s(200, 60, 30), rel=0.02)


def test_forgets_an_old_device_speed() -> None:
    model = RunTimeModel(window=32)
    for size in range(1, 33):
        model.observe(size, 64, 32, true_run_s(size, 64, 32))
    for size in range(1, 33):  # the machine became 3x slower (a neighbour took the cores)
        model.observe(size, 64, 32, 3 * true_run_s(size, 64, 32))
    assert model.predict_s(16, 64, 32) == pytest.approx(3 * true_run_s(16, 64, 32), rel=0.02)


def test_deadline_rule() -> None:
    assert misses_deadline(2.0, now_s=10.0, deadlines_s=[None, 11.5])
    assert not misses_deadline(2.0, now_s=10.0, deadlines_s=[None, 12.5])
    assert not misses_deadline(99.0, now_s=10.0, deadlines_s=[None, None])


def test_a_batch_too_slow_for_its_tightest_deadline_is_split_at_lease_time() -> None:
    from tests.batcher.scheduler_support import FakeClock, lease, make_request, scheduler_with, worker

    from services.batcher.domain import BatchReport, ItemOutput

    loop = asyncio.new_event_loop()
    try:
        fake = FakeClock()
        scheduler, _ = scheduler_with(fake, "vs")
        scheduler.register(worker())
        for n in range(1, 13):  # a device where each row costs 0.1 s: batches of n rows run 0.1 n s
            requests = [make_request(1000 * n + i, loop) for i in range(n)]
            for request in requests:
                scheduler.admit(request)
            held = lease(scheduler)
            outputs = [ItemOutput(r.request_id, "ok", 16) for r in held.items]
            scheduler.complete("w", held.batch.batch_id, BatchReport(outputs, 0.1 * held.batch.size, 16, 16))
        assert scheduler.run_time_model.predict_s(32, 20, 16) == pytest.approx(3.2, rel=0.05)

        # one batch of 32 (~3.2 s) whose callers give up 1 s from now: admission would have stopped
        # its growth at ~10 (the queued batch's learned time counts as wait), so set the deadlines
        # after admitting, as when a batch grows past what its first members were admitted with
        late = [make_request(i, loop) for i in range(32)]
        for request in late:
            scheduler.admit(request)
            request.deadline_s = fake.now_s + 1.0
        held = lease(scheduler)
        assert 1 <= held.batch.size <= 8, "halved until ~0.1 s a row fits 1 s"
        assert scheduler.expected_run_s(held.batch) <= 1.0
        assert len(scheduler.pending) == 32  # the rest is requeued, not dropped
    finally:
        loop.close()


def test_completion_rate_and_littles_wait() -> None:
    from services.batcher.policy.wait import CompletionRate, littles_wait_s

    rate = CompletionRate(window_s=10.0)
    assert rate.per_s(0.0) is None and littles_wait_s(50, None) == 0.0  # nothing measured: no opinion
    for t in range(21):  # 4 requests answered every second for 20 s
        rate.add(float(t), 4)
    assert rate.per_s(20.0) == pytest.approx(4.0)
    assert littles_wait_s(20, rate.per_s(20.0)) == pytest.approx(5.0)
    assert rate.per_s(40.0) is None  # all of it older than the window


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**16))
def test_predict_each_is_predict_of_each_and_sums_to_the_queued_total(seed: int) -> None:
    from types import SimpleNamespace

    rng = np.random.default_rng(seed)
    model = RunTimeModel()
    for _ in range(32):
        size, input_tokens, gen_tokens = int(rng.integers(1, 17)), int(rng.integers(8, 200)), int(rng.integers(4, 64))
        model.observe(size, input_tokens, gen_tokens, true_run_s(size, input_tokens, gen_tokens))
    shapes = rng.integers(1, 300, size=(20, 3))
    each = model.predict_each_s(shapes[:, 0], shapes[:, 1], shapes[:, 2])
    assert each == pytest.approx([model.predict_s(*map(int, row)) for row in shapes])
    columns = SimpleNamespace(size=np.concatenate((shapes[:, 0], [0, 0])), input_max=np.concatenate((shapes[:, 1], [5, 5])),
                              gen_max=np.concatenate((shapes[:, 2], [5, 5])))  # two empty slots: not counted
    assert model.predict_total_s(columns) == pytest.approx(float(np.sum(each)))
    assert RunTimeModel().predict_each_s([1], [2], [3]) is None


@settings(max_examples=60, deadline=None)
@given(steps=st.lists(st.tuples(st.floats(0.0, 4.0), st.integers(1, 9), st.booleans()), min_size=1, max_size=60))
def test_completion_rate_equals_a_recount_of_its_window(steps) -> None:
    """The running sum gives what counting the window's completions at every call would."""
    from services.batcher.policy.wait import CompletionRate

    window_s, rate, now_s, seen = 10.0, CompletionRate(window_s=10.0), 0.0, []
    for gap_s, num, is_query in steps:
        now_s += gap_s
        if is_query:
            events = [e for e in seen if e[0] >= now_s - window_s]
            expected = (None if len(events) < 2 or now_s - events[0][0] < 1.0
                        else sum(n for _, n in events[1:]) / (now_s - events[0][0]))
            assert rate.per_s(now_s) == (None if expected is None else pytest.approx(expected))
        else:
            rate.add(now_s, num)
            seen.append((now_s, num))
