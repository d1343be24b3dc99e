"""Dispatch-time packing (policy `magnus_pack`, beyond the paper): form the batch when a worker pulls.

Why: on an engine whose decode step costs about the same for 1 and 64 rows (the weights are read
once per step; reports/gpu/engine.md), a batch's time is mostly G(B) steps, and the best batch is
many requests of similar predicted length. The paper's insertion-time grouping (WMA under Phi)
decides each request's batch when it arrives, before the rest of the queue is known; packing
decides from the whole queue. Requests queue alone; when a worker pulls, they are sorted by prompt
length and, separately, by planned generation length (the predictor's upper estimate, see
families/magnus_pack.py), and the contiguous window with the highest score in either order
is leased (its L(B) and G(B) are the window's maxima):

    score(W) = sum_{p in W} (wait(p) + T(W)) / T(W) = |W| + sum wait / T(W)

the sum of the members' response ratios (HRRN per request, not per batch). Under load the waits
dominate and the window with the most waiting per second of work wins, i.e. the highest
throughput one; a request that keeps losing keeps aging, so nothing starves. At light load |W|
dominates and everything queued runs together. T(W) comes from a linear batch-time model (below),
not the KNN estimator: thousands of candidate windows are scored per decision.

Windows respect the batch ceiling and the memory cap with the policy's fill fraction. Batches
that must not be merged (sealed halves of an OOM split) compete as they are.
"""

from __future__ import annotations

import numpy as np

from services.batcher.policy import rules
from services.batcher.policy.columns import BatchColumns
from services.batcher.policy.pack_cost import LinearBatchCost

# candidates per decision: the oldest requests, so the work per pull stays bounded (~10 ms)
MAX_CANDIDATE_ROWS = 2048


def pack_rows(
    cols: BatchColumns,
    now_s: float,
    cost: LinearBatchCost,
    *,
    max_batch_size: int | None,
    kv_bytes_per_token: int | None,
    free_kv_bytes: float | None,
) -> list[int]:
    """Rows of the queued batches to merge into the next lease; [] when the queue is empty.

    `free_kv_bytes` is the share of Theta predictions may fill. Unsealed rows are single requests.
    """
    n = len(cols.size)
    if n == 0:
        return []
    wait_s = np.maximum(0.0, now_s - cols.oldest_arrival_s)
    best_rows, best_score = [], -np.inf
    sealed = np.flatnonzero(cols.is_sealed)
    if sealed.size:
        t = cost.batch_s(cols.size[sealed], cols.input_max[sealed], cols.gen_max[sealed])
        scores = rules.size_weighted_ratio(cols.size[sealed], wait_s[sealed], t)
        i = int(np.argmax(scores))
        best_rows, best_score = [int(sealed[i])], float(scores[i])
    loose = np.flatnonzero(~cols.is_sealed)
    if loose.size > MAX_CANDIDATE_ROWS:
        loose = loose[np.argpartition(cols.oldest_arrival_s[loose], MAX_CANDIDATE_ROWS)[:MAX_CANDIDATE_ROWS]]
    # Two orders: by prompt length (prefill and KV reads pay for L(B) on every row) and by
    # generation length (rows that finish early idle until G(B)); the better window of either wins.
    for order in (
        loose[np.lexsort((cols.gen_max[loose], cols.input_max[loose]))],  # by L, then G
        loose[np.lexsort((cols.input_max[loose], cols.gen_max[loose]))],  # by G, then L
    ):
        window, score = _best_window(cols, order, wait_s, cost, max_batch_size, kv_bytes_per_token, free_kv_bytes)
        if score > best_score:
            best_rows, best_score = window, score
    return best_rows


def _best_window(cols, order, wait_s, cost, max_batch_size, kv_bytes_per_token, free_kv_bytes) -> tuple[list[int], float]:
    """The best contiguous window of the candidate rows in `order`, and its score."""
    gen, inp, wait = cols.gen_max[order], cols.input_max[order], wait_s[order]
    m = len(order)
    k_max = min(m, max_batch_size or m)
    # the window ending at sorted position j with k members: its L(W) and G(W) are running maxima
    sizes = window_sizes(k_max)
    input_max = trailing_max(inp, sizes)  # [m, len(sizes)]: L(W) of each window
    k = sizes[None, :]
    end = np.arange(m)[:, None]
    start = end - k + 1
    cumulative_wait = np.concatenate([[0.0], np.cumsum(wait)])
    wait_sum = cumulative_wait[end + 1] - cumulative_wait[np.maximum(start, 0)]
    gen_max = trailing_max(gen, sizes)  # G(W)
    t = cost.batch_s(k, input_max, gen_max)
    score = rules.summed_ratio(k, wait_sum, t)
    allowed = (start >= 0) & rules.fits_memory(k, input_max, gen_max, kv_bytes_per_token, free_kv_bytes)
    allowed[:, 0] = True  # a request alone always runs (admission checked that it fits)
    score = np.where(allowed, score, -np.inf)
    j, column = np.unravel_index(int(np.argmax(score)), score.shape)
    size = int(sizes[column])
    return [int(r) for r in order[j - size + 1 : j + 1]], float(score[j, column])


def trailing_max(values: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """[m, len(sizes)]: entry (j, c) = max(values[j - sizes[c] + 1 .. j]); positions before 0 count as 0.

    A sparse table: level p holds the max of the 2^p values ending at each position, and any window
    of k values is two overlapping level-floor(log2 k) windows. O(m log k) to build, O(1) per entry
    (a running max over every size up to 256 cost ~3 ms per call with 2,048 candidates).
    """
    k_max = int(sizes[-1])
    levels = [np.concatenate([np.zeros(k_max, dtype=values.dtype), values])]  # k_max zeros in front
    while (1 << len(levels)) <= k_max:
        previous, step = levels[-1], 1 << (len(levels) - 1)
        levels.append(np.maximum(previous, np.concatenate([np.zeros(step, dtype=values.dtype), previous[:-step]])))
    table = np.stack(levels)
    level = np.floor(np.log2(sizes)).astype(np.int64)[None, :]
    end = np.arange(len(values))[:, None] + k_max
    return np.maximum(table[level, end], table[level, end - sizes[None, :] + (1 << level)])


def window_sizes(k_max: int) -> np.ndarray:
    """Window sizes scored: every size up to 16, then about 7 % apart up to k_max.

    Scoring every size up to 256 cost 25 ms per pull with 2,048 candidates; a batch of 120 instead
    of 121 makes no difference worth that.
    """
    small = np.arange(1, min(16, k_max) + 1)
    if k_max <= 16:
        return small
    large = np.rint(np.geomspace(16, k_max, 40)).astype(np.int64)
    return np.unique(np.concatenate([small, large, [k_max]]))
