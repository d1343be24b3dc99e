"""Which queued batch a free worker runs next.

Waiting time of a batch = now - arrival of its oldest request: the batch's response time is
bounded below by that request's, so that is the wait HRRN should age by. Because the ratio of
every waiting batch grows without bound while estimates stay finite, no batch starves.
"""

from __future__ import annotations

from collections.abc import Iterable

from services.batcher.policy.batch import QueuedBatch
from services.batcher.policy.config import ChooseMode, PolicyConfig

# Used only until the estimator has answered for a batch: a rough CPU/GPU-agnostic guess so the
# ratio is defined; seconds per generated token step and per prompt token.
FALLBACK_STEP_S = 0.02
FALLBACK_PREFILL_S_PER_TOKEN = 1e-4


def fallback_estimate_s(size: int, input_tokens_max: int, gen_tokens_max: int) -> float:
    """A rough batch time, seconds, for when no estimate is cached."""
    return 0.01 + size * input_tokens_max * FALLBACK_PREFILL_S_PER_TOKEN + gen_tokens_max * FALLBACK_STEP_S


def batch_estimate_s(batch: QueuedBatch) -> float:
    """The cached estimate if fresh, else the last one scaled by the current shape's fallback."""
    if batch.estimated_s is not None and batch.estimated_s > 0:
        return batch.estimated_s
    return fallback_estimate_s(batch.size, batch.input_tokens_max, batch.gen_tokens_max)


def response_ratio(batch: QueuedBatch, now_s: float) -> float:
    estimate_s = batch_estimate_s(batch)
    wait_s = max(0.0, now_s - batch.oldest_arrival_s)
    return (wait_s + estimate_s) / estimate_s


def choose_next(batches: Iterable[QueuedBatch], policy: PolicyConfig, now_s: float) -> QueuedBatch | None:
    """The batch to run next, or None when the queue is empty. O(number of batches)."""
    best, best_key = None, None
    for batch in batches:
        if not batch.members:
            continue
        if policy.choose_mode is ChooseMode.FCFS:
            key = -batch.oldest_arrival_s
        else:
            key = response_ratio(batch, now_s)
        if best_key is None or key > best_key:
            best, best_key = batch, key
    return best
