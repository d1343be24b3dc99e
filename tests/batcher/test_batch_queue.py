"""BatchQueue: its indexed decisions agree with a plain scan written from the paper's rules."""

from __future__ import annotations

import math

from hypothesis import given, settings
from hypothesis import strategies as st

from services.batcher.policy.batch import Member, QueuedBatch
from services.batcher.policy.batch_queue import BatchQueue
from services.batcher.policy.config import make_policy
from services.batcher.policy.hrrn import response_ratio
from services.batcher.policy.rules import MemoryBudget, memory_bytes
from services.batcher.policy.split import split_batch

POLICIES = {
    name: make_policy(name, phi_token_reads=20_000, fixed_batch_size=3, max_batch_size=6)
    for name in ("vs", "glp", "abp", "magnus")
}
BUDGET = MemoryBudget(kv_bytes_per_token=4, free_kv_bytes=4 * 6000)
# the paper's table, written out: (insertion, memory cap, choice) of each family
RULES = {
    "vs": ("fcfs", False, "fcfs"),
    "glp": ("wma", False, "fcfs"),
    "abp": ("wma", True, "fcfs"),
    "magnus": ("wma", True, "hrrn"),
}


def scan_insert(member, batches, policy, budget):
    """The reference: one loop over the batches in queue order, straight from the rules."""
    insertion, has_memory_cap, _ = RULES[policy.name]
    if insertion == "fcfs":
        last = batches[-1] if batches else None
        if last is None or last.is_sealed or last.size >= policy.max_batch_size:
            return None
        return last
    best, best_wma = None, math.inf
    for b in batches:
        if b.is_sealed or (policy.max_batch_size and b.size >= policy.max_batch_size):
            continue
        size, l_max, g_max = b.size + 1, max(b.input_tokens_max, member.input_tokens), max(b.gen_tokens_max, member.gen_tokens)
        if has_memory_cap and memory_bytes(size, l_max, g_max, budget.kv_bytes_per_token) > budget.free_kv_bytes:
            continue
        members = b.members + [member]
        wma = max(m.gen_tokens * (l_max - m.input_tokens) + sum(g + l_max for g in range(m.gen_tokens, g_max + 1)) for m in members)
        if wma < best_wma:
            best, best_wma = b, wma
    if best is None or best_wma >= policy.knobs.phi_token_reads:
        return None
    return best


def scan_next(batches, policy, now_s):
    if RULES[policy.name][2] == "fcfs":
        return min(batches, key=lambda b: b.oldest_arrival_s, default=None)
    return max(batches, key=lambda b: response_ratio(b, now_s), default=None)


ops_st = st.lists(
    st.tuples(
        st.sampled_from(["admit", "admit", "admit", "lease", "split", "cancel", "estimate"]),
        st.integers(1, 800),
        st.integers(1, 800),
        st.floats(0.01, 50),
    ),
    min_size=1,
    max_size=60,
)


@settings(max_examples=60, deadline=None)
@given(st.sampled_from(sorted(POLICIES)), ops_st)
def test_indexed_decisions_match_a_plain_scan(policy_name, ops):
    policy = POLICIES[policy_name]
    queue = BatchQueue()
    order: list[QueuedBatch] = []  # the reference's view of queue order
    now_s = 0.0
    for i, (op, a, b, x) in enumerate(ops):
        now_s += 0.5
        if op == "admit":
            m = Member(f"r{i}", a, b, now_s)
            expected = scan_insert(m, order, policy, BUDGET)
            got = queue.choose_for(m, policy, BUDGET)
            assert (got and got.batch_id) == (expected and expected.batch_id)
            if got is None:
                got = QueuedBatch(f"b{i}")
                queue.append(got)
                order.append(got)
            queue.add_member(got, m)
        elif op == "lease" and order:
            expected = scan_next(order, policy, now_s)
            got = queue.choose_next(policy, now_s)
            assert got.batch_id == expected.batch_id
            queue.pop(got.batch_id)
            order.remove(got)
        elif op == "split" and order and order[a % len(order)].size >= 2:
            victim = order[a % len(order)]
            queue.pop(victim.batch_id)
            order.remove(victim)
            for half in reversed(split_batch(victim, (f"x{i}", f"y{i}"))):
                queue.push_front(half)
                order.insert(0, half)
        elif op == "cancel" and order:
            victim = order[a % len(order)]
            queue.remove_member(victim.batch_id, victim.members[b % victim.size].request_id)
            if not victim.members:
                order.remove(victim)
        elif op == "estimate" and order:
            victim = order[a % len(order)]
            assert queue.set_estimate(victim.batch_id, victim.revision, x, 1)
        assert [bb.batch_id for bb in queue.values()] == [bb.batch_id for bb in order]
        assert len(queue) == len(order)


def test_a_stale_estimate_is_not_cached():
    queue = BatchQueue()
    batch = QueuedBatch("b")
    queue.append(batch)
    queue.add_member(batch, Member("r", 10, 10, 0.0))
    revision = batch.revision
    queue.add_member(batch, Member("s", 10, 10, 0.0))
    assert not queue.set_estimate("b", revision, 5.0, 1)
    assert batch.estimated_s is None
