"""Pure policy: WMA closed form, memory cap, insertion, HRRN, split."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.batcher.policy.assembler import choose_batch_for
from services.batcher.policy.batch import Member, QueuedBatch
from services.batcher.policy.columns import BatchColumns
from services.batcher.policy.config import make_policy
from services.batcher.policy.hrrn import choose_next
from services.batcher.policy.rules import MemoryBudget, memory_bytes
from services.batcher.policy.split import split_batch

members_st = st.lists(
    st.builds(
        Member,
        request_id=st.uuids().map(str),
        input_tokens=st.integers(1, 2000),
        gen_tokens=st.integers(1, 2000),
        arrival_s=st.floats(0, 1000),
    ),
    min_size=1,
    max_size=12,
    unique_by=lambda m: m.request_id,
)


def brute_force_wma(members: list[Member]) -> int:
    """Count wasted reads member by member, straight from the paper's definitions."""
    input_max = max(m.input_tokens for m in members)
    gen_max = max(m.gen_tokens for m in members)
    worst = 0
    for m in members:
        padding = m.gen_tokens * (input_max - m.input_tokens)
        waiting = sum(g + input_max for g in range(m.gen_tokens, gen_max + 1))
        worst = max(worst, padding + waiting)
    return worst


def batch_of(members: list[Member], batch_id: str = "b") -> QueuedBatch:
    batch = QueuedBatch(batch_id)
    for m in members:
        batch.add(m)
    return batch


MAGNUS = make_policy("magnus", phi_token_reads=50_000, fixed_batch_size=4, max_batch_size=None)


@given(members_st)
def test_wma_closed_form_matches_brute_force(members):
    assert batch_of(members).wma == pytest.approx(brute_force_wma(members))


@given(members_st, st.integers(1, 10_000))
def test_remove_rebuilds_aggregates(members, seed):
    batch = batch_of(members)
    victim = members[seed % len(members)]
    batch.remove(victim.request_id)
    rest = [m for m in members if m is not victim]
    if rest:
        assert batch.wma == pytest.approx(brute_force_wma(rest))
    assert batch.size == len(rest)


@settings(max_examples=200)
@given(st.lists(members_st, min_size=1, max_size=4).map(lambda xs: [m for x in xs for m in x]), st.integers(1, 64))
def test_no_batch_exceeds_theta_by_predicted_lengths(members, delta):
    theta = 3000 * delta
    budget = MemoryBudget(kv_bytes_per_token=delta, free_kv_bytes=theta)
    batches: list[QueuedBatch] = []
    seen = set()
    for m in members:
        if m.request_id in seen or not budget.fits(1, m.input_tokens, m.gen_tokens):
            continue
        seen.add(m.request_id)
        target = choose_batch_for(m, batches, MAGNUS, budget)
        if target is None:
            target = QueuedBatch(f"b{len(batches)}")
            batches.append(target)
        target.add(m)
    for b in batches:
        assert memory_bytes(b.size, b.input_tokens_max, b.gen_tokens_max, delta) <= theta
        assert b.size == 1 or b.wma < MAGNUS.knobs.phi_token_reads


def test_short_and_long_requests_go_to_different_batches():
    short = [Member(f"s{i}", 20, 20, i) for i in range(5)]
    long = [Member(f"l{i}", 800, 900, i) for i in range(5)]
    batches: list[QueuedBatch] = []
    for m in [x for pair in zip(short, long) for x in pair]:
        target = choose_batch_for(m, batches, MAGNUS, MemoryBudget())
        if target is None:
            target = QueuedBatch(f"b{len(batches)}")
            batches.append(target)
        target.add(m)
    assert sorted(sorted(m.request_id[0] for m in b.members) for b in batches) == [["l"] * 5, ["s"] * 5]


def test_fixed_size_policy_fills_newest_batch_in_arrival_order():
    vs = make_policy("vs", phi_token_reads=1, fixed_batch_size=2, max_batch_size=None)
    batches: list[QueuedBatch] = []
    for i in range(5):
        m = Member(str(i), 10 * (i + 1), 10, i)
        target = choose_batch_for(m, batches, vs, MemoryBudget())
        if target is None:
            target = QueuedBatch(f"b{len(batches)}")
            batches.append(target)
        target.add(m)
    assert [[m.request_id for m in b.members] for b in batches] == [["0", "1"], ["2", "3"], ["4"]]


def test_hrrn_prefers_short_batches_but_ages_long_ones():
    short = batch_of([Member("s", 10, 10, arrival_s=100.0)], "short")
    long = batch_of([Member("l", 500, 500, arrival_s=0.0)], "long")
    short.estimated_s, long.estimated_s = 1.0, 1000.0
    # t=100.05: short (0.05+1)/1 = 1.05 < long (100.05+1000)/1000 = 1.10005: the old batch wins
    assert choose_next([short, long], MAGNUS, now_s=100.05).batch_id == "long"
    # t=100.5: short 1.5 > long 1.1005: the short batch overtakes
    assert choose_next([short, long], MAGNUS, now_s=100.5).batch_id == "short"


def test_hrrn_never_starves_a_long_batch_under_a_stream_of_short_ones():
    long = batch_of([Member("l", 500, 500, arrival_s=0.0)], "long")
    long.estimated_s = 50.0
    now_s = 0.0
    for step in range(10_000):  # a new 1-second batch arrives every second, forever
        short = batch_of([Member(f"s{step}", 10, 10, arrival_s=now_s)], f"s{step}")
        short.estimated_s = 1.0
        if choose_next([short, long], MAGNUS, now_s=now_s + 1.0).batch_id == "long":
            break
        now_s += 1.0
    assert now_s < 100.0, "the long batch waited more than 100 s behind fresh short batches"


@given(members_st.filter(lambda ms: len(ms) >= 2))
def test_split_keeps_every_request_once_and_arrival_times(members):
    first, second = split_batch(batch_of(members), ("x", "y"))
    assert abs(first.size - second.size) <= 1
    together = first.members + second.members
    assert sorted(m.request_id for m in together) == sorted(m.request_id for m in members)
    assert {m.request_id: m.arrival_s for m in together} == {m.request_id: m.arrival_s for m in members}
    assert first.is_sealed and second.is_sealed


def test_single_request_cannot_be_split():
    with pytest.raises(ValueError):
        split_batch(batch_of([Member("a", 1, 1, 0)]), ("x", "y"))


def test_unknown_policy_is_rejected():
    with pytest.raises(ValueError, match="unknown policy"):
        make_policy("fastest", phi_token_reads=1, fixed_batch_size=1, max_batch_size=None)


MAGNUS_SW = make_policy("magnus_sw", phi_token_reads=50_000, fixed_batch_size=4, max_batch_size=None)


def test_size_weighted_hrrn_prefers_the_batch_holding_more_waiting_requests():
    small = batch_of([Member("a", 10, 10, arrival_s=0.0)], "small")
    large = batch_of([Member(f"b{i}", 10, 10, arrival_s=1.0) for i in range(8)], "large")
    small.estimated_s, large.estimated_s = 1.0, 2.0
    # plain HRRN: small (2+1)/1 = 3 > large (1+2)/2 = 1.5; weighted: 3 x 1 < 1.5 x 8 = 12
    assert choose_next([small, large], MAGNUS, now_s=2.0).batch_id == "small"
    assert choose_next([small, large], MAGNUS_SW, now_s=2.0).batch_id == "large"


def test_size_weighted_hrrn_still_never_starves_a_small_long_batch():
    long = batch_of([Member("l", 500, 500, arrival_s=0.0)], "long")
    long.estimated_s = 50.0
    now_s = 0.0
    for step in range(100_000):  # every second a fresh batch of 16 one-second requests
        fresh = batch_of([Member(f"s{step}-{i}", 10, 10, arrival_s=now_s) for i in range(16)], f"s{step}")
        fresh.estimated_s = 1.0
        if choose_next([fresh, long], MAGNUS_SW, now_s=now_s + 1.0).batch_id == "long":
            break
        now_s += 1.0
    # the long batch wins once (w + 50) / 50 > 16 x 2, i.e. after about 1,550 s: bounded
    assert now_s < 2_000.0


def test_magnus_ccb_leases_single_requests_shortest_predicted_first():
    policy = make_policy("magnus_ccb", phi_token_reads=1, fixed_batch_size=4, max_batch_size=None)
    batches: list[QueuedBatch] = []
    for i, gen_tokens in enumerate((500, 20, 100)):  # arrival order: long, short, medium
        m = Member(str(i), 50, gen_tokens, arrival_s=0.0)
        target = choose_batch_for(m, batches, policy, MemoryBudget())
        if target is None:
            target = QueuedBatch(f"b{i}")
            batches.append(target)
        target.add(m)
    assert [b.size for b in batches] == [1, 1, 1]  # one lease per request, as for ccb
    order = []
    while batches:  # no estimates yet: the fallback's grows with the predicted length
        chosen = choose_next(batches, policy, now_s=1.0)
        order.append(chosen.members[0].gen_tokens)
        batches.remove(chosen)
    assert order == [20, 100, 500]
    ccb = make_policy("ccb", phi_token_reads=1, fixed_batch_size=4, max_batch_size=None)
    assert not ccb.can_preempt and policy.can_preempt  # only a plan made with predictions has stragglers


def test_magnus_ccb_tail_leases_a_request_that_outlasts_the_queue_first_and_is_hrrn_otherwise():
    policy = make_policy("magnus_ccb_tail", phi_token_reads=1, fixed_batch_size=4, max_batch_size=None)

    def queue(gen_tokens):
        batches = []
        for i, gen in enumerate(gen_tokens):
            batch = QueuedBatch(f"b{i}")
            batch.add(Member(str(i), 50, gen, arrival_s=0.0))
            batch.estimated_s = gen / 100  # continuous: a request's run time follows its length
            batches.append(batch)
        return batches

    def first(batches, lanes):
        rows = policy.next_rows(BatchColumns.from_batches(batches), 1.0, MemoryBudget(lanes=lanes))
        return batches[rows[0]].members[0].gen_tokens

    burst = queue([20] * 30 + [100, 500, 30])  # 12.5 s of work
    assert first(burst, lanes=8) == 500  # drain 1.54 s: only the 5 s request outlasts it
    assert first(burst, lanes=1) == 20  # one lane: nothing outlasts a 12.5 s drain, so HRRN's shortest
    assert first(burst, lanes=None) == 20  # lanes unknown: magnus_ccb


def test_the_registry_keeps_every_setting_name_and_each_family_answers_the_protocol():
    from services.batcher.policy.base import Policy
    from services.batcher.policy.columns import BatchColumns
    from services.batcher.policy.registry import POLICIES, SERVING_POLICY_NAMES

    assert SERVING_POLICY_NAMES == ("vs", "glp", "abp", "magnus", "magnus_sw", "magnus_pack", "oracle",
                                    "oracle_pack", "ccb", "magnus_ccb", "magnus_ccb_tail")  # MAGNUS_BATCHER_POLICY
    empty = BatchColumns.from_batches([])
    for name in SERVING_POLICY_NAMES:
        policy: Policy = make_policy(name, phi_token_reads=1e4, fixed_batch_size=4, max_batch_size=None)
        assert policy.name == name and isinstance(policy, POLICIES[name])
        planned = policy.planned_gen_tokens(predicted_tokens=900, upper_tokens=None, max_new_tokens=100)
        assert planned == 100  # no plan passes max_new_tokens (the oracle's is max_new_tokens itself)
        assert policy.insert_row(empty, Member("r", 10, 10, 0.0), MemoryBudget()) is None
        assert policy.next_rows(empty, 0.0, MemoryBudget()) == []
