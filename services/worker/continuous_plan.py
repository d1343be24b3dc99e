"""The continuous batcher's pure decisions: which rows a step runs, when joiners wait for company,
and how joiners are grouped for one prefill (no device, no state: unit-tested alone)."""

from __future__ import annotations

from dataclasses import dataclass

from services.worker.static_backend import bucket_rows

# A joiner may wait this many steps (~16 x 10 ms on a GPU) for others to share its prefill: on an
# H100 a prefill of ~2 joiners took ~34 ms against a ~10 ms step, and took half the thread's time
JOIN_DEFER_MAX_STEPS = 16
# Joiner prompts are left-padded to a multiple of this (coarser when longer, as batch buckets are):
# few prefill shapes recur, so each one replays as a captured graph (static_backend.prefill_rows)
PREFILL_BUCKET_TOKENS = 32
# Joiner prefills of up to this many (padded) tokens are captured as CUDA graphs: eagerly a 40-token
# prefill of a 7B model took 10-12 ms of kernel launches (15-25 ms at a new shape) for ~5 ms of GPU
# work (reports/gpu/continuous_steps/run2_prefill.log); larger ones are compute-bound anyway
PREFILL_GRAPH_MAX_TOKENS = 4096
PREFILL_GRAPH_ROWS = (1, 2, 4, 8)  # joiner counts captured at warm-up (groups are padded to these)


def join_group_rows(slots: int) -> int:
    """Free rows worth one prefill while the batch runs: a quarter of the slots (1 for small batches)."""
    return max(1, slots // 4)


def step_sizes(slots: int, bucket_rows_granularity: int) -> list[int]:
    """Row counts a step may run: the batch buckets below `slots`, and `slots`. A step runs only the
    rows up to the highest one in use (rows are taken lowest first), so a lightly loaded batch steps
    as a small one; without buckets (granularity 1) always all `slots`, one compiled shape."""
    if bucket_rows_granularity == 1:
        return [slots]
    return sorted({min(slots, bucket_rows(rows, bucket_rows_granularity)) for rows in range(1, slots + 1)})


def prefill_groups(prompt_tokens: list[int], max_new_tokens: list[int], row_capacity_tokens: int,
                   max_group_tokens: int) -> list[list[int]]:
    """Indices of the joiners, grouped for one left-padded prefill each. In prompt-length order, so
    padding stays small; a group's padded length plus each member's max_new_tokens must fit a row,
    and its padded tokens the prefill chunk (the workspace the memory model allows for)."""
    groups: list[list[int]] = []
    current: list[int] = []
    for index in sorted(range(len(prompt_tokens)), key=lambda i: prompt_tokens[i]):
        padded_tokens = prompt_tokens[index]  # the longest of current + [index]
        candidate = [*current, index]
        fits = all(padded_tokens + max_new_tokens[i] <= row_capacity_tokens for i in candidate)
        if current and (not fits or padded_tokens * len(candidate) > max_group_tokens):
            groups.append(current)
            candidate = [index]
        current = candidate
    if current:
        groups.append(current)
    return groups


def prefill_buckets(max_padded_tokens: int) -> list[int]:
    """The padded prompt lengths prefill_shape can return, up to max_padded_tokens."""
    buckets, tokens = [], PREFILL_BUCKET_TOKENS
    while tokens <= max_padded_tokens:
        buckets.append(tokens)
        tokens = bucket_rows(tokens + 1, PREFILL_BUCKET_TOKENS)
    return buckets


def graphed_prefill_shapes(row_capacity_tokens: int) -> list[tuple[int, int]]:
    """The (rows, padded prompt tokens) the worker captures at warm-up: every shape prefill_shape
    marks is_graphed for rows of row_capacity_tokens."""
    return [(rows, tokens) for rows in PREFILL_GRAPH_ROWS for tokens in prefill_buckets(row_capacity_tokens - 1)
            if rows * tokens <= PREFILL_GRAPH_MAX_TOKENS]


@dataclass(frozen=True)
class PrefillShape:
    rows: int  # the group's joiners, or more: the caller repeats a member
    tokens: int  # padded prompt tokens
    is_graphed: bool  # one of graphed_prefill_shapes: replayed as a graph captured at warm-up


def prefill_shape(prompt_tokens: list[int], max_new_tokens: list[int], row_capacity_tokens: int) -> PrefillShape:
    """The shape a group's prefill runs as: rows up to the next of PREFILL_GRAPH_ROWS, tokens up to
    the next bucket (the rounding of batch buckets, at least PREFILL_BUCKET_TOKENS), replayed as a
    graph. The exact shape, eagerly, where the padding would overflow a member's row or the group is
    too large for the captured shapes (then it is compute-bound: padding would only cost, and a
    capture while serving would stall every row for a shape that seldom recurs)."""
    rows, exact_tokens = len(prompt_tokens), max(prompt_tokens)
    padded_rows = next((size for size in PREFILL_GRAPH_ROWS if size >= rows), 0)
    padded_tokens = bucket_rows(max(exact_tokens, PREFILL_BUCKET_TOKENS), PREFILL_BUCKET_TOKENS)
    if (not padded_rows or padded_tokens + max(max_new_tokens) > row_capacity_tokens
            or padded_rows * padded_tokens > PREFILL_GRAPH_MAX_TOKENS):
        return PrefillShape(rows, exact_tokens, is_graphed=False)
    return PrefillShape(padded_rows, padded_tokens, is_graphed=True)
