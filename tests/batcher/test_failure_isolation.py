"""The scheduler alone (no gRPC): poison isolation, context limits, deadline-aware admission, callers
that leave while their request runs, and a restarted worker's leases."""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.batcher.domain import BatchReport, ItemOutput
from services.batcher.policy.split import FailureAction, after_failure
from services.batcher.policy.wait import (
    MAX_SCALE,
    own_run_s,
    queue_wait_s,
    running_left_s,
    updated_scale,
    wait_excess_s,
)
from services.shared.errors import Internal, InvalidArgument, ResourceExhausted
from tests.batcher.scheduler_support import FakeClock, lease, make_request, scheduler_with, worker


# ---- the pure decision ---------------------------------------------------------------------------

@given(size=st.integers(1, 512), failures=st.integers(1, 20), max_failures=st.integers(1, 5), oom=st.booleans())
def test_after_failure_splits_any_batch_of_two_or_more_and_bounds_a_lone_request(size, failures, max_failures, oom):
    action = after_failure(size, failures, max_failures, is_out_of_memory=oom)
    if size >= 2:
        assert action is FailureAction.SPLIT
    elif oom or failures >= max_failures:
        assert action is FailureAction.FAIL
    else:
        assert action is FailureAction.RETRY
    assert after_failure(size, failures, max_failures, is_out_of_memory=oom, is_worker_stopping=True) is (
        FailureAction.REQUEUE
    )
    lost = after_failure(size, failures, max_failures, is_out_of_memory=False, is_lost=True)
    if failures == 1 and max_failures > 1:
        assert lost is FailureAction.RETRY  # a first loss is retried whole: usually the worker's fault
    else:
        assert lost is after_failure(size, failures, max_failures, is_out_of_memory=False)


def test_wait_rule():
    assert queue_wait_s(10.0, 2) == 5.0 and queue_wait_s(10.0, 0) == 10.0  # no worker yet counts as one
    assert own_run_s(0, 100) == pytest.approx(2.01)
    assert wait_excess_s(5.0, 2.0, None, 0.0) < 0  # neither a deadline nor a cap
    assert wait_excess_s(5.0, 2.0, 6.0, 0.0) == pytest.approx(1.0)  # answered 1 s after the deadline
    assert wait_excess_s(5.0, 200.0, None, 10.0) < 0  # the cap is on queueing, not on its own length
    assert wait_excess_s(15.0, 0.0, 600.0, 10.0) == pytest.approx(5.0)
    assert running_left_s([10.0, 2.0], [4.0, 5.0]) == 6.0  # the overrun batch counts as done


def test_the_run_time_scale_follows_completed_batches_and_ignores_nonsense():
    assert updated_scale(1.0, 1.0, 3.0, num_samples=0) == 3.0  # the first batch sets it
    scale = 3.0
    for n in range(1, 40):  # then the device turns 2x slower than estimated
        scale = updated_scale(scale, 1.0, 2.0, n)
    assert scale == pytest.approx(2.0, rel=0.01)
    assert updated_scale(scale, 0.0, 5.0, 9) == scale and updated_scale(scale, 1.0, 0.0, 9) == scale
    assert updated_scale(1.0, 1e-9, 1e9, 0) <= MAX_SCALE


def test_deadline_admission_learns_a_slow_device(loop):
    fake = FakeClock()
    scheduler, _ = scheduler_with(fake, "vs")
    scheduler.register(worker())
    for i in range(10):  # batches estimated (fallback) at ~0.33 s run 2 s: the device is 6x slower
        scheduler.admit(make_request(i, loop))
        held = lease(scheduler)
        scheduler.complete("w", held.batch.batch_id, BatchReport([ItemOutput(f"r{i}", "ok", 16)], 2.0, 16, 16))
    assert scheduler.run_time_scale == pytest.approx(2.0 / 0.3306, rel=0.01)
    with pytest.raises(ResourceExhausted):  # 0.33 s by the fallback, but ~2 s on this device
        scheduler.admit(make_request(99, loop, deadline_s=fake.now_s + 1.0))


# ---- poison isolation ----------------------------------------------------------------------------

def test_a_poison_request_fails_alone_and_every_neighbour_is_answered(loop):
    fake = FakeClock()
    scheduler, sink = scheduler_with(fake, max_batch_failures=3)
    scheduler.register(worker())
    requests = [make_request(i, loop) for i in range(21)]
    for r in requests:
        scheduler.admit(r)
    poison = "r7"
    runs = 0
    while scheduler.pending:
        held = lease(scheduler)
        runs += 1
        ids = [r.request_id for r in held.items]
        if poison in ids:
            assert scheduler.fail("w", held.batch.batch_id, is_out_of_memory=False, message="boom: bad token")
        else:
            outputs = [ItemOutput(i, "ok", 3) for i in ids]
            assert scheduler.complete("w", held.batch.batch_id, BatchReport(outputs, 0.1, len(ids) * 3, len(ids) * 3))
        assert runs < 40, "isolation must end"
    error = requests[7].future.exception()
    assert isinstance(error, Internal) and "boom: bad token" in error.message
    assert all(r.future.result().text == "ok" for r in requests if r.request_id != poison)
    # 21 requests: halved 5 times (21 -> 10 -> 5 -> 2 -> 1), then failed at once (5 failures >= 3)
    assert sum(b["outcome"] == "failed" for b in sink.batches) == 5


def test_a_lone_request_is_retried_before_it_fails_and_a_stopping_worker_costs_no_failure(loop):
    fake = FakeClock()
    scheduler, _ = scheduler_with(fake, max_batch_failures=2)
    scheduler.register(worker())
    request = make_request(0, loop)
    scheduler.admit(request)
    held = lease(scheduler)
    scheduler.fail("w", held.batch.batch_id, is_out_of_memory=False, message="shutting down", is_worker_stopping=True)
    held = lease(scheduler)
    scheduler.fail("w", held.batch.batch_id, is_out_of_memory=False, message="flaky")
    assert not request.future.done(), "one failure alone is retried"
    held = lease(scheduler)
    scheduler.fail("w", held.batch.batch_id, is_out_of_memory=False, message="flaky again")
    assert isinstance(request.future.exception(), Internal)


def test_a_request_that_kills_its_workers_is_split_out_after_a_second_loss(loop):
    fake = FakeClock()
    scheduler, _ = scheduler_with(fake, max_batch_failures=3, lease_s=10.0)
    scheduler.register(worker())
    requests = [make_request(i, loop) for i in range(4)]
    for r in requests:
        scheduler.admit(r)
    sizes = []
    while scheduler.pending:
        held = lease(scheduler)
        sizes.append(held.batch.size)
        if any(r.request_id == "r2" for r in held.items):  # the worker dies whenever it runs r2
            fake.now_s += 11.0
            scheduler.expire()
        else:
            ids = [r.request_id for r in held.items]
            scheduler.complete("w", held.batch.batch_id, BatchReport([ItemOutput(i, "ok", 1) for i in ids], 0.1, 1, 1))
    assert sizes[:2] == [4, 4], "a first loss reruns the batch whole"
    assert [r.future.done() and r.future.exception() is None for r in requests] == [True, True, False, True]
    assert requests[2].future.exception() is not None


# ---- context ------------------------------------------------------------------------------------

def test_requests_longer_than_the_smallest_worker_context_are_invalid_argument(loop):
    fake = FakeClock()
    scheduler, _ = scheduler_with(fake, max_context_tokens=8192)
    assert scheduler.context_limit_tokens() == 8192  # no worker yet: the configured cap
    scheduler.register(worker("a", context=4096))
    scheduler.register(worker("b", context=0))  # an older worker: unknown, ignored
    assert scheduler.context_limit_tokens() == 4096
    scheduler.check_context(20, 4076)
    with pytest.raises(InvalidArgument) as refused:
        scheduler.check_context(20, 4077)
    assert refused.value.field == "prompt.max_new_tokens" and "4096" in refused.value.message
    unlimited, _ = scheduler_with(fake)
    assert unlimited.context_limit_tokens() is None
    unlimited.check_context(10**6, 10**6)


# ---- deadlines ----------------------------------------------------------------------------------

def test_a_request_that_cannot_make_its_deadline_is_refused_at_once_with_retry_after(loop):
    fake = FakeClock()
    scheduler, _ = scheduler_with(fake, "vs")
    scheduler.register(worker())
    for i in range(4):  # one queued batch of ~10 s (fallback: 0.02 s a step x 500 steps)
        scheduler.admit(make_request(i, loop, max_new=500))
    queued = len(scheduler.pending)
    with pytest.raises(ResourceExhausted) as refused:
        scheduler.admit(make_request(10, loop, max_new=16, deadline_s=fake.now_s + 5.0))
    assert refused.value.retry_after_s >= 1.0 and "estimated queue wait" in refused.value.message
    assert len(scheduler.pending) == queued, "a refused request is not queued"
    scheduler.admit(make_request(11, loop, max_new=16, deadline_s=fake.now_s + 60.0))
    scheduler.admit(make_request(12, loop, max_new=16))  # no deadline, no cap: admitted


def test_the_running_batches_left_count_as_wait(loop):
    fake = FakeClock()
    scheduler, _ = scheduler_with(fake, "vs")
    scheduler.register(worker())
    scheduler.admit(make_request(0, loop, max_new=500))  # ~10 s by the fallback
    lease(scheduler)
    fake.now_s += 4.0  # ~6 s left of it
    with pytest.raises(ResourceExhausted):
        scheduler.admit(make_request(1, loop, max_new=16, deadline_s=fake.now_s + 5.0))
    scheduler.admit(make_request(2, loop, max_new=16, deadline_s=fake.now_s + 7.0))


def test_max_queue_wait_caps_callers_without_a_deadline(loop):
    fake = FakeClock()
    scheduler, _ = scheduler_with(fake, "vs", max_queue_wait_s=5.0)
    scheduler.register(worker())
    scheduler.admit(make_request(0, loop, max_new=1000))  # a long request alone is admitted: no backlog
    with pytest.raises(ResourceExhausted):  # ~20 s of work queued ahead
        scheduler.admit(make_request(1, loop, max_new=16))


# ---- callers that leave -----------------------------------------------------------------------

def test_a_caller_leaving_a_running_request_is_told_to_the_worker_and_its_result_ignored(loop):
    fake = FakeClock()
    scheduler, sink = scheduler_with(fake, "vs")
    scheduler.register(worker())
    requests = [make_request(i, loop) for i in range(3)]
    for r in requests:
        scheduler.admit(r)
    held = lease(scheduler)
    assert scheduler.cancel("r1") == "running"
    reply = scheduler.heartbeat("w", held.batch.batch_id)
    assert reply.is_lease_valid and reply.cancelled_request_ids == ["r1"]
    outputs = [ItemOutput(f"r{i}", "ok", 2) for i in (0, 2)]
    assert scheduler.complete("w", held.batch.batch_id, BatchReport(outputs, 0.1, 4, 4))
    assert [r.future.done() for r in requests] == [True, False, True]  # r1's caller is gone: never set
    assert {row["status"] for row in sink.requests} == {"completed", "cancelled"}
    assert scheduler.cancel("r0") is None, "answered already"


def test_a_lease_whose_callers_all_left_is_revoked(loop):
    fake = FakeClock()
    scheduler, _ = scheduler_with(fake, "ccb")
    scheduler.register(worker(max_batch_size=4))
    scheduler.admit(make_request(0, loop))
    scheduler.admit(make_request(1, loop))
    held = lease(scheduler)
    assert scheduler.cancel("r1") == "queued"
    assert scheduler.cancel("r0") == "running"
    assert not scheduler.heartbeat("w", held.batch.batch_id).is_lease_valid  # the worker stops it
    assert not scheduler.complete("w", held.batch.batch_id, BatchReport([ItemOutput("r0", "late", 1)], 0.1, 1, 1))
    assert scheduler.pending == {} and scheduler.leases == {}


# ---- restarts ---------------------------------------------------------------------------------

def test_a_restarted_worker_gets_its_batch_back_at_once_and_the_old_report_is_refused(loop):
    fake = FakeClock()
    scheduler, sink = scheduler_with(fake, "vs", lease_s=600.0)
    scheduler.register(worker(incarnation="one"))
    scheduler.admit(make_request(0, loop))
    old = lease(scheduler)
    scheduler.register(worker(incarnation="one"))  # a repeat registration keeps the lease
    assert old.batch.batch_id in scheduler.leases
    scheduler.register(worker(incarnation="two"))  # a new process under the same id
    assert old.batch.batch_id not in scheduler.leases and [b["outcome"] for b in sink.batches] == ["lost"]
    new = lease(scheduler)  # requeued ahead of new work, well before the 600 s lease
    assert [r.request_id for r in new.items] == ["r0"] and new.batch.batch_id != old.batch.batch_id
    assert not scheduler.complete("w", old.batch.batch_id, BatchReport([ItemOutput("r0", "old", 1)], 0.1, 1, 1))
    assert scheduler.complete("w", new.batch.batch_id, BatchReport([ItemOutput("r0", "new", 1)], 0.1, 1, 1))
    assert loop.run_until_complete(asyncio.wait_for(asyncio.shield(old.items[0].future), 1)).text == "new"
