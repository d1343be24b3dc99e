"""Each paper rule (policy/rules.py) against its definition, and each vectorised kernel against the rule.

WMA term, response ratio (HRRN, size-weighted, summed for packing), memory of a batch, the KV cap:
first the rule is checked against a count written from the paper, then every kernel that applies it
to columns (columns.py, pack.py) is checked against a plain loop over the scalar rule.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.batcher.policy import rules
from services.batcher.policy.batch import Member, QueuedBatch
from services.batcher.policy.columns import BatchColumns, highest_ratio_row, least_wma_row
from services.batcher.policy.hrrn import batch_estimate_s
from services.batcher.policy.pack import pack_rows
from services.batcher.policy.pack_cost import LinearBatchCost
from services.batcher.policy.rules import MemoryBudget

lengths_st = st.tuples(st.integers(1, 1500), st.integers(1, 1500))
batches_st = st.lists(
    st.tuples(st.lists(lengths_st, min_size=1, max_size=5), st.floats(0, 100), st.booleans(),
              st.one_of(st.none(), st.floats(0.01, 50))),
    min_size=1,
    max_size=12,
)


def build(spec) -> list[QueuedBatch]:
    """Batches from (member lengths, arrival of the first, sealed, cached estimate) tuples."""
    batches = []
    for i, (lengths, arrival_s, is_sealed, estimate_s) in enumerate(spec):
        batch = QueuedBatch(f"b{i}", is_sealed=is_sealed)
        for j, (input_tokens, gen_tokens) in enumerate(lengths):
            batch.add(Member(f"r{i}.{j}", input_tokens, gen_tokens, arrival_s + j))
        batch.estimated_s, batch.estimate_revision = estimate_s, batch.revision
        batches.append(batch)
    return batches


def first_best(keys: list[float], *, lowest: bool) -> int | None:
    """The reference tie rule: the first (queue order) of the best finite keys."""
    finite = [k for k in keys if math.isfinite(k)]
    if not finite:
        return None
    best = min(finite) if lowest else max(finite)
    return keys.index(best)


# ---- WMA -----------------------------------------------------------------------------------------


@given(st.lists(lengths_st, min_size=1, max_size=10), lengths_st)
def test_wma_rule_matches_the_papers_count_after_an_insertion(members, new):
    """rules.wma_after_insert from aggregates = max_p padding(p) + waiting(p), counted read by read."""
    everyone = [*members, new]
    l_max, g_max = max(x for x, _ in everyone), max(g for _, g in everyone)
    counted = max(g * (l_max - x) + sum(t + l_max for t in range(g, g_max + 1)) for x, g in everyone)
    term_max = max(rules.member_term(x, g) for x, g in members)
    aggregates = (max(x for x, _ in members), max(g for _, g in members), term_max)
    assert rules.wma_after_insert(*aggregates, *new) == counted


@settings(max_examples=150, deadline=None)
@given(batches_st, lengths_st, st.sampled_from([None, 5_000.0, 50_000.0]), st.sampled_from([None, 3, 6]))
def test_least_wma_kernel_matches_a_scan_of_the_scalar_rule(spec, new, phi, max_batch_size):
    batches = build(spec)
    member = Member("new", *new, 0.0)
    expected_keys = []
    for b in batches:
        allowed = not b.is_sealed and (max_batch_size is None or b.size < max_batch_size)
        wma = rules.wma_after_insert(b.input_tokens_max, b.gen_tokens_max, b.max_member_term, *new)
        expected_keys.append(float(wma) if allowed else math.inf)
    expected = first_best(expected_keys, lowest=True)
    if expected is not None and phi is not None and expected_keys[expected] >= phi:
        expected = None
    got = least_wma_row(BatchColumns.from_batches(batches), member, phi_token_reads=phi,
                        max_batch_size=max_batch_size, budget=None)
    assert got == expected


# ---- response ratio ------------------------------------------------------------------------------


@given(st.floats(0, 1e4), st.floats(1e-3, 1e4), st.integers(1, 256))
def test_response_ratio_rules(wait_s, run_s, size):
    assert rules.response_ratio(wait_s, run_s) == pytest.approx(1 + wait_s / run_s)
    assert rules.response_ratio(0.0, run_s) == 1.0  # a batch that has not waited
    assert rules.size_weighted_ratio(size, wait_s, run_s) == pytest.approx(size * (1 + wait_s / run_s))
    # packing's window score is the members' ratios summed: all waited wait_s here
    assert rules.summed_ratio(size, size * wait_s, run_s) == pytest.approx(size * rules.response_ratio(wait_s, run_s))


@settings(max_examples=150, deadline=None)
@given(batches_st, st.floats(0, 200), st.booleans())
def test_highest_ratio_kernel_matches_a_scan_of_the_scalar_rule(spec, now_s, is_size_weighted):
    batches = build(spec)
    keys = []
    for b in batches:
        wait_s, run_s = max(0.0, now_s - b.oldest_arrival_s), batch_estimate_s(b)
        keys.append(rules.size_weighted_ratio(b.size, wait_s, run_s) if is_size_weighted
                    else rules.response_ratio(wait_s, run_s))
    got = highest_ratio_row(BatchColumns.from_batches(batches), now_s, is_size_weighted=is_size_weighted)
    assert got == first_best(keys, lowest=False)


# ---- memory of a batch and the KV cap ------------------------------------------------------------


@given(st.lists(lengths_st, min_size=1, max_size=20), st.integers(1, 1 << 20))
def test_memory_rule_counts_every_row_padded_to_the_longest_prompt_and_generation(members, delta):
    """MEM(B): at its last step every row of a static batch holds L(B) + G(B) KV entries of Delta bytes."""
    l_max, g_max = max(x for x, _ in members), max(g for _, g in members)
    counted = sum((l_max + g_max) * delta for _ in members)
    assert rules.memory_bytes(len(members), l_max, g_max, delta) == counted
    sizes, ls, gs = (np.array(v) for v in zip(*[(i + 1, x, g) for i, (x, g) in enumerate(members)], strict=True))
    vectorised = rules.memory_bytes(sizes, ls, gs, delta)
    assert list(vectorised) == [rules.memory_bytes(int(n), int(x), int(g), delta) for n, x, g in zip(sizes, ls, gs)]


@settings(max_examples=150, deadline=None)
@given(batches_st, lengths_st, st.integers(1, 8), st.integers(500, 20_000), st.sampled_from([1.0, 0.85, 0.5]))
def test_kv_cap_kernel_in_wma_insertion_matches_the_scalar_cap(spec, new, delta, theta_tokens, fill):
    """least_wma_row with a budget picks exactly what the scan picks among batches MemoryBudget.fits."""
    batches = build(spec)
    budget = MemoryBudget(kv_bytes_per_token=delta, free_kv_bytes=theta_tokens * delta)
    keys = []
    for b in batches:
        fits = budget.fits(b.size + 1, max(b.input_tokens_max, new[0]), max(b.gen_tokens_max, new[1]), fill)
        wma = rules.wma_after_insert(b.input_tokens_max, b.gen_tokens_max, b.max_member_term, *new)
        keys.append(float(wma) if fits and not b.is_sealed else math.inf)
    got = least_wma_row(BatchColumns.from_batches(batches), Member("new", *new, 0.0), phi_token_reads=None,
                        max_batch_size=None, budget=budget, fill_fraction=fill)
    assert got == first_best(keys, lowest=True)
    assert MemoryBudget().fits(10**6, 10**6, 10**6)  # unknown Delta/Theta: no cap


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(lengths_st, st.floats(0, 50)), min_size=1, max_size=40), st.integers(1_000, 30_000),
       st.sampled_from([None, 4, 16]))
def test_pack_kernel_windows_respect_the_cap_and_score_as_summed_ratios(requests, theta_tokens, max_batch_size):
    """pack_rows: the chosen window fits the scalar cap (or is one request), and its score is the sum of
    its members' response ratios; no single request alone scores higher (a window of one is a candidate)."""
    batches = [QueuedBatch(f"b{i}") for i in range(len(requests))]
    for batch, ((input_tokens, gen_tokens), arrival_s) in zip(batches, requests, strict=True):
        batch.add(Member(batch.batch_id, input_tokens, gen_tokens, arrival_s))
    cost, now_s = LinearBatchCost(), 60.0
    budget = MemoryBudget(kv_bytes_per_token=1, free_kv_bytes=theta_tokens)
    rows = pack_rows(BatchColumns.from_batches(batches), now_s, cost, max_batch_size=max_batch_size,
                     kv_bytes_per_token=budget.kv_bytes_per_token, free_kv_bytes=budget.free_kv_bytes)
    chosen = [batches[r] for r in rows]
    size = len(chosen)
    l_max, g_max = max(b.input_tokens_max for b in chosen), max(b.gen_tokens_max for b in chosen)
    assert size == 1 or budget.fits(size, l_max, g_max)
    assert max_batch_size is None or size <= max_batch_size
    run_s = cost.batch_s(size, l_max, g_max)
    score = sum(rules.response_ratio(now_s - b.oldest_arrival_s, run_s) for b in chosen)
    for b in batches:  # any request alone is a window the kernel scored
        alone = rules.response_ratio(now_s - b.oldest_arrival_s, cost.batch_s(1, b.input_tokens_max, b.gen_tokens_max))
        assert alone <= score * (1 + 1e-9)
