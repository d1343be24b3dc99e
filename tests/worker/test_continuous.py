"""ContinuousBatcher on the CPU (eager steps): every request gets the tokens it would get alone."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from services.worker.continuous import ContinuousBatcher
from services.worker.continuous_plan import (
    PREFILL_BUCKET_TOKENS,
    PrefillShape,
    graphed_prefill_shapes,
    join_group_rows,
    prefill_buckets,
    prefill_groups,
    prefill_shape,
    step_sizes,
)
from services.worker.engine import BatchCancelled, BatchOutOfMemory, BatchRejected, EngineItem, StaticBatchEngine

SLOTS = 3
ROW_TOKENS = 64
RESULT_TIMEOUT_S = 20.0
SUBMIT_SLACK_S = 0.005
ITEMS = [
    EngineItem("a", "Translate to German: thank you", 20),
    EngineItem("b", "short", 3),
    EngineItem("c", "", 9),
    EngineItem("d", "修正语法：他们是去学校了昨天。", 30),
    EngineItem("e", "a b c d e f g", 1),
    EngineItem("f", "one more prompt, a little longer than the others were", 12),
]


@pytest.fixture(scope="module")
def static_engine(tiny_model_dir) -> StaticBatchEngine:
    # 3 rows x 64 tokens of KV (the tiny Qwen2 has Delta = 512 bytes in float32)
    return StaticBatchEngine(
        tiny_model_dir, device="cpu", dtype="float32", backend="static", cpu_kv_budget_bytes=SLOTS * ROW_TOKENS * 512
    )


@pytest.fixture(scope="module")
def alone(static_engine):
    """What the static engine gives each item run as a batch of one (before any batcher uses the pool)."""
    return {item.request_id: static_engine.run([item]).items[0] for item in ITEMS}


@pytest.fixture
def batcher(static_engine, alone):
    batcher = ContinuousBatcher(static_engine, SLOTS)
    yield batcher
    batcher.stop(cancel=True, timeout_s=10.0)


def results_of(futures):
    return [future.result(RESULT_TIMEOUT_S) for future in futures]


def test_each_request_gets_its_tokens_alone_with_queueing_and_slot_reuse(batcher, alone):
    batcher.start()
    results = results_of([batcher.submit(item) for item in ITEMS])  # 6 requests on 3 rows
    assert [r.output for r in results] == [alone[item.request_id] for item in ITEMS]
    assert [r.output.generated_tokens for r in results] == [item.max_new_tokens for item in ITEMS]
    assert all(r.total_tokens == r.output.generated_tokens for r in results)
    assert all(0.0 <= r.queued_s <= r.run_s for r in results)
    # "d" (30 tokens) waited for a row: "b" (3 tokens) or "c" had to finish first
    assert results[3].queued_s > results[0].queued_s


def test_requests_joining_at_different_steps_keep_their_tokens(batcher, alone):
    batcher.start()
    futures = [batcher.submit(ITEMS[3])]  # the longest runs throughout
    for item in [ITEMS[0], ITEMS[1], ITEMS[5], ITEMS[2]]:
        time.sleep(0.02)  # join while the others are some steps in
        futures.append(batcher.submit(item))
    results = results_of(futures)
    assert [r.output for r in results] == [alone[i] for i in ("d", "a", "b", "f", "c")]


def test_a_row_stops_at_eos_and_trace_replay_ignores_it(static_engine, alone, monkeypatch):
    first_tokens = static_engine.run_ids(static_engine.encode([ITEMS[0].prompt]), [20], stop_at_eos=False)
    eos = first_tokens.generated_ids[0][4]  # "a"'s fifth token now counts as EOS
    monkeypatch.setattr(static_engine, "eos_token_ids", [eos])
    expected = static_engine.run([ITEMS[0], ITEMS[3]]).items
    stopping = ContinuousBatcher(static_engine, SLOTS)
    stopping.start()
    results = results_of([stopping.submit(ITEMS[0]), stopping.submit(ITEMS[3])])
    stopping.stop()
    assert results[0].output.generated_tokens == first_tokens.generated_ids[0].index(eos) + 1 <= 5
    assert [r.output for r in results] == expected

    monkeypatch.setattr(static_engine, "trace_replay", True)
    replaying = ContinuousBatcher(static_engine, SLOTS)
    replaying.start()
    replayed = replaying.submit(ITEMS[0]).result(RESULT_TIMEOUT_S)
    replaying.stop()
    assert replayed.output == alone["a"] and replayed.output.generated_tokens == 20


def test_a_row_that_filled_its_capacity_idles_without_writing_out_of_range(batcher, static_engine):
    prompt = "ten or so tokens of prompt for this one row"
    full = EngineItem("full", prompt, ROW_TOKENS - len(static_engine.encode([prompt])[0]))  # fills its row
    longer = EngineItem("longer", "go", full.max_new_tokens + 6)  # decodes on while that row idles
    expected = [static_engine.run([item]).items[0] for item in (full, longer)]
    batcher.start()
    assert [r.output for r in results_of([batcher.submit(full), batcher.submit(longer)])] == expected


def test_a_request_longer_than_a_row_runs_alone_once_the_rows_drained(batcher, static_engine, alone):
    too_long = EngineItem("long", "word " * 40, 30)  # 40 prompt tokens + 30 > 64 per row, < 192 in the pool
    expected_long = static_engine.run([too_long]).items[0]
    batcher.start()
    futures = [batcher.submit(ITEMS[0]), batcher.submit(too_long), batcher.submit(ITEMS[1]), batcher.submit(ITEMS[3])]
    results = results_of(futures)
    assert [r.output for r in results] == [alone["a"], expected_long, alone["b"], alone["d"]]
    # it started once "a" (20 tokens, running) had finished, and "d" (submitted after it) joined only
    # after it ended; submits were microseconds apart, so queued = run minus that
    assert results[1].queued_s >= results[0].run_s - SUBMIT_SLACK_S
    assert results[3].queued_s >= results[1].run_s - SUBMIT_SLACK_S
    assert batcher.free_slots() == SLOTS


def test_requests_that_cannot_fit_fail_alone(batcher, alone):
    batcher.start()
    too_long = EngineItem("huge", "word " * 40, 160)  # 40 prompt tokens + 160 > the pool's 192
    futures = [
        batcher.submit(ITEMS[0]),
        batcher.submit(too_long),
        batcher.submit(EngineItem("zero", "hi", 0)),
        batcher.submit(ITEMS[1]),
    ]
    with pytest.raises(BatchRejected, match=r"\+ max_new_tokens 160 = \d+ tokens exceeds the KV pool of 192"):
        futures[1].result(RESULT_TIMEOUT_S)
    with pytest.raises(BatchRejected, match="max_new_tokens must be >= 1"):
        futures[2].result(RESULT_TIMEOUT_S)
    assert [f.result(RESULT_TIMEOUT_S).output for f in (futures[0], futures[3])] == [alone["a"], alone["b"]]
    assert batcher.free_slots() == SLOTS


def test_free_slots_counts_running_and_waiting_requests(batcher):
    freed = threading.Semaphore(0)
    batcher.on_slot_freed = freed.release
    assert batcher.free_slots() == SLOTS
    futures = [batcher.submit(ITEMS[0]), batcher.submit(ITEMS[1])]
    assert batcher.free_slots() == SLOTS - 2  # submitted, not started: waiting still holds a row
    futures += [batcher.submit(ITEMS[3]), batcher.submit(ITEMS[5])]
    assert batcher.free_slots() == 0  # one more than the rows: never below zero
    batcher.start()
    results_of(futures)
    assert all(freed.acquire(timeout=RESULT_TIMEOUT_S) for _ in futures)  # one signal per freed row
    assert batcher.free_slots() == SLOTS


def test_cancelled_request_frees_its_row_and_stop_cancels_the_rest(batcher, alone):
    batcher.start()
    long = EngineItem("long", "keep going", 60)
    cancelled, other = batcher.submit(long), batcher.submit(ITEMS[1])
    assert other.result(RESULT_TIMEOUT_S).output == alone["b"]
    assert cancelled.cancel()
    for _ in range(200):
        if batcher.free_slots() == SLOTS:
            break
        time.sleep(0.01)
    assert batcher.free_slots() == SLOTS
    running = batcher.submit(long)
    time.sleep(0.05)
    batcher.stop(cancel=True, timeout_s=10.0)
    with pytest.raises(BatchCancelled):
        running.result(RESULT_TIMEOUT_S)
    with pytest.raises(BatchCancelled):
        batcher.submit(ITEMS[1]).result(RESULT_TIMEOUT_S)


def test_out_of_memory_in_prefill_fails_that_request_only(batcher, static_engine, alone, monkeypatch):
    prefill = static_engine.static.decoder.prefill

    def prefill_out_of_memory_on_long_prompts(tokens, *args, **kwargs):
        if tokens.shape[1] > PREFILL_BUCKET_TOKENS:  # short prompts are padded up to the first bucket
            raise torch.OutOfMemoryError("simulated: 40 prompt tokens")
        return prefill(tokens, *args, **kwargs)

    monkeypatch.setattr(static_engine.static.decoder, "prefill", prefill_out_of_memory_on_long_prompts)
    batcher.start()
    futures = [batcher.submit(ITEMS[0]), batcher.submit(EngineItem("big", "word " * 40, 5)), batcher.submit(ITEMS[1])]
    with pytest.raises(BatchOutOfMemory, match="simulated"):
        futures[1].result(RESULT_TIMEOUT_S)
    assert [futures[i].result(RESULT_TIMEOUT_S).output for i in (0, 2)] == [alone["a"], alone["b"]]


def test_a_failed_step_fails_its_rows_and_the_loop_serves_on(batcher, static_engine, alone, monkeypatch):
    step = static_engine.static.decode_step
    calls = {"n": 0}

    def step_failing_once(*args):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("simulated kernel failure")
        step(*args)

    monkeypatch.setattr(static_engine.static, "decode_step", step_failing_once)
    batcher.start()
    failing = [batcher.submit(ITEMS[0]), batcher.submit(ITEMS[3])]
    for future in failing:
        with pytest.raises(RuntimeError, match="simulated kernel failure"):
            future.result(RESULT_TIMEOUT_S)
    assert batcher.submit(ITEMS[5]).result(RESULT_TIMEOUT_S).output == alone["f"]


def test_needs_the_static_backend(engine):
    with pytest.raises(ValueError, match="static backend"):
        ContinuousBatcher(engine, SLOTS)  # the CPU default is plain generate


def test_stop_before_start_fails_what_waits(batcher):
    waiting = batcher.submit(ITEMS[0])
    batcher.stop()
    with pytest.raises(BatchCancelled):
        waiting.result(RESULT_TIMEOUT_S)


def test_prefill_groups_pad_little_and_keep_every_row_within_its_capacity():
    # prompt lengths, max_new_tokens; rows of 64 tokens, prefill chunk of 100 padded tokens
    groups = prefill_groups([30, 5, 6, 7, 40], [10, 50, 20, 5, 20], row_capacity_tokens=64, max_group_tokens=100)
    assert sorted(i for group in groups for i in group) == [0, 1, 2, 3, 4]  # every joiner once
    for group in groups:
        padded = max([30, 5, 6, 7, 40][i] for i in group)
        assert all(padded + [10, 50, 20, 5, 20][i] <= 64 for i in group)
        assert padded * len(group) <= 100 or len(group) == 1
    assert groups[0] == [1, 2, 3]  # the short prompts share one prefill; 5 + 50 rules out the 30-token one
    assert prefill_groups([], [], 64, 100) == []


def test_joiner_prefills_round_to_few_shapes_unless_a_row_or_a_graph_would_overflow():
    assert prefill_buckets(300) == [32, 64, 96, 128, 160, 192, 224, 256]
    assert prefill_buckets(1024)[-5:] == [512, 640, 768, 896, 1024]  # coarser when longer
    # for prompt lengths, max_new_tokens, row capacity
    assert prefill_shape([5], [10], 1024) == PrefillShape(1, 32, is_graphed=True)
    assert prefill_shape([40, 300], [10, 5], 1024) == PrefillShape(2, 320, is_graphed=True)
    assert prefill_shape([3, 4, 5], [1, 1, 1], 1024) == PrefillShape(4, 32, is_graphed=True)  # a member repeated
    # exact and eager: 64 + 1000 tokens would overflow the row; 8 x 640 tokens is beyond the graphs;
    # 9 rows is more than any captured shape (a capture while serving would stall every row)
    assert prefill_shape([40], [1000], 1024) == PrefillShape(1, 40, is_graphed=False)
    assert prefill_shape([600] * 7, [10] * 7, 1024) == PrefillShape(7, 600, is_graphed=False)
    assert prefill_shape([20] * 9, [10] * 9, 1024) == PrefillShape(9, 20, is_graphed=False)
    for shape in [prefill_shape([n], [1], 4096) for n in range(1, 1025, 37)]:
        assert shape.is_graphed and shape.tokens in prefill_buckets(1024)
    captured = graphed_prefill_shapes(1027)  # warm-up's shapes for the H100 run's 1,027-token rows
    assert len(captured) == 60 and (8, 512) in captured and (8, 640) not in captured  # 60: as its log says
    for rows in range(1, 10):  # a prefill is graphed exactly when warm-up captured its shape
        for shape in [prefill_shape([n] * rows, [1] * rows, 1027) for n in range(1, 1027, 37)]:
            assert shape.is_graphed == ((shape.rows, shape.tokens) in captured)


def test_padded_prefill_shapes_give_every_request_its_tokens_alone(batcher, static_engine, alone, monkeypatch):
    prefill, shapes = static_engine.static.decoder.prefill, []

    def recording_prefill(tokens, *args, **kwargs):
        shapes.append(tuple(tokens.shape))
        return prefill(tokens, *args, **kwargs)

    monkeypatch.setattr(static_engine.static.decoder, "prefill", recording_prefill)
    futures = [batcher.submit(item) for item in ITEMS[:3]]  # queued before the start: one group of 3
    batcher.start()
    futures += [batcher.submit(item) for item in ITEMS[3:]]
    assert [r.output for r in results_of(futures)] == [alone[item.request_id] for item in ITEMS]
    assert shapes[0] == (4, PREFILL_BUCKET_TOKENS)  # 3 joiners and a copy, padded to the first bucket
    assert all(rows in (1, 2, 4) for rows, _ in shapes)


def test_a_nearly_full_batch_defers_a_joiner_a_bounded_number_of_steps(static_engine, alone):
    slots = 16  # joins wait for 4 free rows while the batch runs
    assert join_group_rows(slots) == 4 and join_group_rows(SLOTS) == 1
    wide = ContinuousBatcher(static_engine, slots)  # 16 rows of 12 tokens each
    long = [EngineItem(f"long{i}", "go", 10) for i in range(slots - 1)]
    wide.start()
    futures = [wide.submit(item) for item in long]
    time.sleep(0.05)  # the 15 run; one row is free
    late = wide.submit(ITEMS[4])  # 1 token: joins alone after at most JOIN_DEFER_MAX_STEPS steps
    assert late.result(RESULT_TIMEOUT_S).output == alone["e"]
    assert len(results_of(futures)) == slots - 1
    wide.stop(timeout_s=10.0)


def test_a_step_runs_the_batch_bucket_up_to_the_highest_row_in_use():
    assert step_sizes(29, 8) == [1, 2, 4, 8, 16, 24, 29]
    assert step_sizes(3, 8) == [1, 2, 3]
    assert step_sizes(29, 1) == [29]  # no buckets: one compiled shape
