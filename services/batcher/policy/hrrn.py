"""Which queued batch a free worker runs next.

Waiting time of a batch = now - arrival of its oldest request: the batch's response time is
bounded below by that request's, so that is the wait HRRN should age by.

Size-weighted HRRN (policy `magnus_sw`, beyond the paper) multiplies the ratio by the batch size.
Plain HRRN dispatches a freshly opened short batch as soon as a worker is free (its small estimate
makes its ratio high), so on a fast engine batches run before they have grown and throughput falls
below FCFS; weighting by size prefers the batch that holds the most waiting requests per second of
work. It still ages every batch without bound, so nothing starves (tests/batcher). Because the ratio of
every waiting batch grows without bound while estimates stay finite, no batch starves.
Estimates are cached per batch (`QueuedBatch.estimated_s`) and refreshed by the caller only when
the batch's revision changes; until then the last estimate (or the fallback guess) is used.
"""

from __future__ import annotations

from collections.abc import Iterable

from services.batcher.policy.batch import QueuedBatch
from services.batcher.policy.columns import BatchColumns, next_row
from services.batcher.policy.config import PolicyConfig
from services.batcher.policy.fallback import (  # noqa: F401  (re-exported: the names callers know)
    FALLBACK_PREFILL_S_PER_TOKEN,
    FALLBACK_STEP_S,
    fallback_estimate_s,
)


def batch_estimate_s(batch: QueuedBatch) -> float:
    """The cached estimate if any (even of an older revision), else the fallback guess, seconds."""
    if batch.estimated_s is not None and batch.estimated_s > 0:
        return batch.estimated_s
    return float(fallback_estimate_s(batch.size, batch.input_tokens_max, batch.gen_tokens_max))


def response_ratio(batch: QueuedBatch, now_s: float) -> float:
    """(wait + estimate) / estimate, wait = now - oldest member's arrival (>= 0), seconds."""
    estimate_s = batch_estimate_s(batch)
    wait_s = max(0.0, now_s - batch.oldest_arrival_s)
    return (wait_s + estimate_s) / estimate_s


def choose_next(batches: Iterable[QueuedBatch], policy: PolicyConfig, now_s: float) -> QueuedBatch | None:
    """The batch to run next, or None when the queue is empty; ties go to the earlier batch.

    For a handful of batches; a long-lived queue should use `queue.BatchQueue.choose_next`, which
    runs the same kernel on columns it keeps up to date.
    """
    batches = list(batches)
    row = next_row(BatchColumns.from_batches(batches), policy, now_s)
    return None if row is None else batches[row]
