"""Dispatch-time packing (policy `magnus_pack`, beyond the paper): form the batch when a worker pulls.

Why: on an engine whose decode step costs about the same for 1 and 64 rows (the weights are read
once per step; reports/gpu/engine.md), a batch's time is mostly G(B) steps, and the best batch is
many requests of similar predicted length. The paper's insertion-time grouping (WMA under Phi)
decides each request's batch when it arrives, before the rest of the queue is known; packing
decides from the whole queue. Requests queue alone; when a worker pulls, they are sorted by
planned generation length (the predictor's upper estimate, see PolicyConfig.uses_upper_lengths;
then prompt length) and the contiguous window with the highest score is leased:

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
        scores = cols.size[sealed] * (1.0 + wait_s[sealed] / t)
        i = int(np.argmax(scores))
        best_rows, best_score = [int(sealed[i])], float(scores[i])
    loose = np.flatnonzero(~cols.is_sealed)
    if loose.size > MAX_CANDIDATE_ROWS:
        loose = loose[np.argpartition(cols.oldest_arrival_s[loose], MAX_CANDIDATE_ROWS)[:MAX_CANDIDATE_ROWS]]
    if loose.size:
        window, score = _best_window(cols, loose, wait_s, cost, max_batch_size, kv_bytes_per_token, free_kv_bytes)
        if score > best_score:
            best_rows = window
    return best_rows


def _best_window(cols, rows, wait_s, cost, max_batch_size, kv_bytes_per_token, free_kv_bytes) -> tuple[list[int], float]:
    order = rows[np.lexsort((cols.input_max[rows], cols.gen_max[rows]))]  # by G, then L
    gen, inp, wait = cols.gen_max[order], cols.input_max[order], wait_s[order]
    m = len(order)
    k_max = min(m, max_batch_size or m)
    # window ending at sorted position j with k members: G(W) = gen[j]; L(W) = max of inp over it
    padded = np.concatenate([np.zeros(k_max - 1, dtype=inp.dtype), inp])
    trailing = np.lib.stride_tricks.sliding_window_view(padded, k_max)[:, ::-1]  # [m, k_max]: inp[j], inp[j-1], ...
    sizes = window_sizes(k_max)
    input_max = np.maximum.accumulate(trailing, axis=1)[:, sizes - 1]  # [m, len(sizes)]
    k = sizes[None, :]
    end = np.arange(m)[:, None]
    start = end - k + 1
    cumulative_wait = np.concatenate([[0.0], np.cumsum(wait)])
    wait_sum = cumulative_wait[end + 1] - cumulative_wait[np.maximum(start, 0)]
    gen_max = gen[:, None]
    t = cost.batch_s(k, input_max, gen_max)
    score = k + wait_sum / t
    allowed = start >= 0
    if kv_bytes_per_token is not None and free_kv_bytes is not None:
        allowed &= k * (input_max + gen_max) * kv_bytes_per_token <= free_kv_bytes
    allowed[:, 0] = True  # a request alone always runs (admission checked that it fits)
    score = np.where(allowed, score, -np.inf)
    j, column = np.unravel_index(int(np.argmax(score)), score.shape)
    size = int(sizes[column])
    return [int(r) for r in order[j - size + 1 : j + 1]], float(score[j, column])


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
