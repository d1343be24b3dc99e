"""Which waiting worker a batch goes to: the pure rule (policy/placement.py) and the Scheduler using it
with two fake workers of different KV sizes (no GPU, no gRPC)."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import pytest

from services.batcher.domain import Lease, PendingRequest, WorkerInfo
from services.batcher.policy.placement import WorkerLoad, free_kv_now, pick_worker
from services.batcher.policy.registry import make_policy
from services.batcher.scheduler import Clock, Scheduler, SchedulerLimits
from tests.batcher.scheduler_support import Sink, make_request

INPUT_TOKENS, GEN_TOKENS = 20, 100
ROW_BYTES = INPUT_TOKENS + GEN_TOKENS  # Delta = 1 byte per token: one request's KV at its last step
BIG_ROWS, SMALL_ROWS = 16, 4


# ---- the pure rule -------------------------------------------------------------------------------

def load(worker_id: str, free: int | None, rows: int = 0, order: int = 0) -> WorkerLoad:
    return WorkerLoad(worker_id, 1, free, rows, order)


def test_a_batch_goes_to_a_worker_that_holds_it_whole_before_the_roomiest():
    shape = (8, INPUT_TOKENS, GEN_TOKENS)  # 960 bytes
    assert pick_worker([load("a", 900), load("b", 1000)], shape).worker_id == "b"
    # both hold it: the most free KV, then the fewest leased rows, then the oldest pull
    assert pick_worker([load("a", 2000), load("b", 1000)], shape).worker_id == "a"
    assert pick_worker([load("a", 2000, rows=3), load("b", 2000, rows=1)], shape).worker_id == "b"
    assert pick_worker([load("a", 2000, order=1), load("b", 2000, order=0)], shape).worker_id == "b"
    # neither holds it: the one that splits least (most free KV)
    assert pick_worker([load("a", 500), load("b", 900)], shape).worker_id == "b"
    # unknown budgets never lose to a too-small known one
    assert pick_worker([load("a", 500), load("b", None)], shape).worker_id == "b"
    with pytest.raises(ValueError):
        pick_worker([], shape)


def test_free_kv_now_is_theta_less_each_open_lease():
    assert free_kv_now(1000, 1, []) == 1000
    assert free_kv_now(1000, 1, [(2, 20, 100), (1, 10, 10)]) == 1000 - 240 - 20
    assert free_kv_now(100, 2, [(1, 20, 100)]) == 0  # never below zero


# ---- the Scheduler with two workers ----------------------------------------------------------------

def request(i: int, loop) -> PendingRequest:
    return make_request(i, loop, now_s=float(i), max_new=512, predicted_tokens=GEN_TOKENS, input_tokens=INPUT_TOKENS)


def two_worker_scheduler(policy_name: str) -> Scheduler:
    policy = make_policy(policy_name, phi_token_reads=1e9, fixed_batch_size=8, max_batch_size=None)
    scheduler = Scheduler(policy, SchedulerLimits(), Clock(lambda: 10.0, lambda: datetime.now(UTC)), Sink())
    scheduler.register(WorkerInfo("big", 1, BIG_ROWS * ROW_BYTES, 0, "m", "cpu", 0.0))
    scheduler.register(WorkerInfo("small", 1, SMALL_ROWS * ROW_BYTES, 0, "m", "cpu", 0.0))
    return scheduler


def test_static_workers_waiting_together_the_big_one_gets_the_big_packed_batch(loop):
    """magnus_pack packs at pull time within the puller's KV: when both wait, the big worker pulls first
    and takes a batch only it can hold, the small one takes the rest; nothing is leased twice."""
    scheduler = two_worker_scheduler("magnus_pack")

    async def scenario() -> dict[str, Lease]:
        pulls = {w: scheduler.pull(w) for w in ("small", "big")}  # small asked first
        assert all(isinstance(p, asyncio.Future) for p in pulls.values())
        for i in range(BIG_ROWS + 2):
            scheduler.admit(request(i, loop))
        await asyncio.sleep(0)  # the dispatch runs on the next loop turn
        return {w: p.result() for w, p in pulls.items()}

    leases = loop.run_until_complete(scenario())
    assert leases["big"].batch.size == BIG_ROWS  # all it holds; first-come would have given it 14
    assert leases["small"].batch.size == 2
    ids = [r.request_id for lease in leases.values() for r in lease.items]
    assert len(ids) == len(set(ids))


def test_continuous_workers_share_by_free_kv_and_neither_starves(loop):
    """One request per lease (magnus_ccb), each worker re-pulls at once (a free row): the next request
    goes to the worker with the most free KV now, so the big one takes about four in five and the
    small one still gets work; no worker is ever given more KV than it has."""
    scheduler = two_worker_scheduler("magnus_ccb")
    counts = {"big": 0, "small": 0}
    num_requests = BIG_ROWS + SMALL_ROWS

    async def scenario() -> None:
        pulls = {w: scheduler.pull(w) for w in ("small", "big")}
        for i in range(num_requests):
            scheduler.admit(request(i, loop))
            await asyncio.sleep(0)
            for worker_id, pull in list(pulls.items()):
                if isinstance(pull, Lease) or pull.done():
                    counts[worker_id] += 1
                    pulls[worker_id] = scheduler.pull(worker_id)  # a row is still free: pull again

    loop.run_until_complete(scenario())
    assert sum(counts.values()) == num_requests
    assert counts == {"big": BIG_ROWS, "small": SMALL_ROWS}  # each filled to its own KV, in proportion
    for worker in scheduler.workers.values():
        held = sum(l.batch.size * ROW_BYTES for l in scheduler.leases.values() if l.worker_id == worker.worker_id)
        assert held <= worker.free_kv_bytes


def test_equal_workers_take_turns(loop):
    """Two equal static workers both waiting: batches alternate (oldest pull first), none idles."""
    policy = make_policy("abp", phi_token_reads=1e9, fixed_batch_size=8, max_batch_size=2)
    scheduler = Scheduler(policy, SchedulerLimits(), Clock(lambda: 10.0, lambda: datetime.now(UTC)), Sink())
    for worker_id in ("a", "b"):
        scheduler.register(WorkerInfo(worker_id, 1, 10**9, 0, "m", "cpu", 0.0))
    owners: list[str] = []

    async def scenario() -> None:
        for round_ in range(3):
            pulls = {w: scheduler.pull(w) for w in ("a", "b")}
            for i in range(4):
                scheduler.admit(request(10 * round_ + i, loop))
            await asyncio.sleep(0)
            for worker_id, pull in pulls.items():
                lease = pull if isinstance(pull, Lease) else pull.result()
                owners.append(worker_id)
                assert scheduler.complete(worker_id, lease.batch.batch_id, _report(lease))
            while isinstance(lease := scheduler.pull("a"), Lease):  # drain what is left
                scheduler.complete("a", lease.batch.batch_id, _report(lease))
            scheduler.cancel_pull(lease)

    loop.run_until_complete(scenario())
    assert owners.count("a") == owners.count("b") == 3


def _report(lease: Lease):
    from services.batcher.domain import BatchReport, ItemOutput

    return BatchReport([ItemOutput(r.request_id, "x", 1) for r in lease.items], run_s=0.1, valid_tokens=1,
                       total_tokens=1)


def test_magnus_ccb_tail_gets_the_workers_lanes_and_leases_the_outlasting_request_first(loop):
    """The scheduler hands the policy every worker's rows (max_batch_size of continuous workers): with 8
    lanes a queue of 12 short requests and one 10x longer drains before the long one would end, so the
    long one is leased first; magnus_ccb leases it last."""
    leased_first = {}
    for name in ("magnus_ccb", "magnus_ccb_tail"):
        policy = make_policy(name, phi_token_reads=1e9, fixed_batch_size=8, max_batch_size=None)
        scheduler = Scheduler(policy, SchedulerLimits(), Clock(lambda: 10.0, lambda: datetime.now(UTC)), Sink())
        scheduler.register(WorkerInfo("w", 1, 10**9, 8, "m", "cpu", 0.0))
        for i in range(12):
            scheduler.admit(make_request(i, loop, now_s=1.0, max_new=512, predicted_tokens=20, input_tokens=10))
        scheduler.admit(make_request(12, loop, now_s=1.0, max_new=512, predicted_tokens=200, input_tokens=10))
        assert scheduler.memory_budget().lanes == 8
        lease = scheduler.pull("w")
        assert isinstance(lease, Lease)
        leased_first[name] = lease.batch.members[0].gen_tokens
    assert leased_first == {"magnus_ccb": 20, "magnus_ccb_tail": 200}
