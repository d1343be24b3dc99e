"""Dispatch-time packing (magnus_pack): which queued requests become the next batch."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from services.batcher.policy.batch import Member, QueuedBatch
from services.batcher.policy.batch_queue import BatchQueue
from services.batcher.policy.config import make_policy
from services.batcher.policy.pack_cost import LinearBatchCost
from services.batcher.policy.rules import MemoryBudget

COST = LinearBatchCost()


def pack_policy(max_batch_size: int | None = 256):
    return make_policy("magnus_pack", phi_token_reads=1e4, fixed_batch_size=8, max_batch_size=max_batch_size)


def queue_of(requests: list[tuple[int, int, float]]) -> BatchQueue:
    """One singleton batch per (input tokens, predicted gen tokens, arrival s), ids r0, r1, ..."""
    queue, policy = BatchQueue(), pack_policy()
    for index, (input_tokens, gen_tokens, arrival_s) in enumerate(requests):
        member = Member(f"r{index}", input_tokens, gen_tokens, arrival_s)
        assert queue.choose_for(member, policy, MemoryBudget()) is None  # SINGLE: every request alone
        batch = QueuedBatch(f"b{index}")
        queue.append(batch)
        queue.add_member(batch, member)
    return queue


def take(queue: BatchQueue, now_s: float, policy=None, budget: MemoryBudget | None = None) -> QueuedBatch | None:
    ids = (f"m{i}" for i in itertools.count())
    return queue.take_next(policy or pack_policy(), now_s, budget or MemoryBudget(), lambda: next(ids))


def ids(batch: QueuedBatch) -> set[str]:
    return {m.request_id for m in batch.members}


def test_empty_queue_gives_nothing():
    assert take(BatchQueue(), 0.0) is None


def test_light_load_runs_everything_queued_together():
    queue = queue_of([(50, 10, 0.0), (60, 40, 0.0), (40, 80, 0.0)])
    batch = take(queue, now_s=0.0)
    assert ids(batch) == {"r0", "r1", "r2"} and len(queue) == 0
    assert batch.estimated_s == pytest.approx(COST.batch_s(3, 60, 80))


def test_under_load_the_short_requests_go_first_together():
    # everyone has waited 10 s: the 6 short ones are far more work-efficient than mixing in the long
    short = [(50, 10, 0.0)] * 6
    long = [(50, 400, 0.0)] * 2
    queue = queue_of(long + short)
    batch = take(queue, now_s=10.0)
    assert ids(batch) == {f"r{i}" for i in range(2, 8)}
    second = take(queue, now_s=10.5)
    assert ids(second) == {"r0", "r1"}


def test_a_long_request_that_waited_long_enough_wins():
    # ratio of the long one alone: 1 + 100 s / ~1.9 s; of the fresh short ones: 3 + 3 x 0.1 s / ~0.05 s
    queue = queue_of([(50, 400, 0.0)] + [(50, 10, 99.9)] * 3)
    batch = take(queue, now_s=100.0)
    assert "r0" in ids(batch)


def test_windows_group_by_predicted_length_not_arrival():
    queue = queue_of([(30, 10, 0.0), (30, 300, 0.0), (30, 12, 0.0), (30, 310, 0.0), (30, 11, 0.0)])
    first = take(queue, now_s=5.0)
    assert ids(first) == {"r0", "r2", "r4"}


def test_batch_ceiling_and_memory_cap_bound_the_window():
    queue = queue_of([(100, 20, 0.0)] * 10)
    assert take(queue, 1.0, policy=pack_policy(max_batch_size=4)).size == 4
    # rows of (100 + 20) tokens at 1 byte/token: 2 fit in 300 bytes, 3 do not
    queue = queue_of([(100, 20, 0.0)] * 10)
    batch = take(queue, 1.0, budget=MemoryBudget(kv_bytes_per_token=1, free_kv_bytes=300))
    assert batch.size == 2


def test_sealed_split_halves_run_whole_and_are_never_merged():
    queue = queue_of([(50, 10, 5.0)] * 3)
    half = QueuedBatch("half", is_sealed=True, parent_batch_id="oom")
    for i in range(4):
        half.add(Member(f"h{i}", 50, 10, 0.0))
    queue.push_front(half)
    first = take(queue, now_s=6.0)  # the half waited longest and holds more requests
    assert first.batch_id == "half" and ids(first) == {f"h{i}" for i in range(4)}
    assert ids(take(queue, now_s=6.0)) == {"r0", "r1", "r2"}


def test_pack_queues_every_request_alone_and_times_its_own_batches():
    policy = pack_policy()
    queue = BatchQueue()
    batch = QueuedBatch("b")
    queue.append(batch)
    queue.add_member(batch, Member("r", 10, 10, 0.0))
    assert policy.insert_row(queue.columns, Member("s", 10, 10, 0.0), MemoryBudget()) is None
    assert policy.times_batches_itself and policy.merged_estimate_s(4, 10, 10) == pytest.approx(COST.batch_s(4, 10, 10))


def test_magnus_pack_plans_with_the_upper_estimate_and_magnus_with_the_point():
    pack = pack_policy()
    magnus = make_policy("magnus", phi_token_reads=1e4, fixed_batch_size=8, max_batch_size=256)
    assert pack.planned_gen_tokens(predicted_tokens=30, upper_tokens=120, max_new_tokens=500) == 120
    assert magnus.planned_gen_tokens(predicted_tokens=30, upper_tokens=120, max_new_tokens=500) == 30
    # an older predictor sends no upper estimate; no plan passes max_new_tokens
    assert pack.planned_gen_tokens(predicted_tokens=30, upper_tokens=None, max_new_tokens=500) == 30
    assert pack.planned_gen_tokens(predicted_tokens=30, upper_tokens=900, max_new_tokens=500) == 500


def test_window_sizes_cover_small_batches_fully_and_large_ones_geometrically():
    from services.batcher.policy.pack import window_sizes

    assert window_sizes(5).tolist() == [1, 2, 3, 4, 5]
    sizes = window_sizes(256)
    assert sizes[:16].tolist() == list(range(1, 17)) and sizes[-1] == 256
    assert (np.diff(sizes) > 0).all() and len(sizes) < 64
    assert (sizes[16:] / sizes[15:-1]).max() <= 1.12  # past 16, scored sizes ~7 % apart (12 % after rounding)


def test_trailing_max_equals_a_brute_force_window_max():
    from services.batcher.policy.pack import trailing_max, window_sizes

    values = np.random.default_rng(0).integers(1, 1000, size=300)
    sizes = window_sizes(256)
    got = trailing_max(values, sizes)
    for j in (0, 1, 15, 16, 17, 100, 255, 256, 299):
        for c, k in enumerate(sizes):
            assert got[j, c] == values[max(0, j - k + 1) : j + 1].max()
