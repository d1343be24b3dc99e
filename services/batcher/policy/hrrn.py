"""Which queued batch a free worker runs next, for a handful of batches (tests, examples).

Waiting time of a batch = now - arrival of its oldest request: the batch's response time is
bounded below by that request's, so that is the wait HRRN should age by (rules.response_ratio).

Size-weighted HRRN (policy `magnus_sw`, beyond the paper) multiplies the ratio by the batch size.
Plain HRRN dispatches a freshly opened short batch as soon as a worker is free (its small estimate
makes its ratio high), so on a fast engine batches run before they have grown and throughput falls
below FCFS; weighting by size prefers the batch that holds the most waiting requests per second of
work. Because the ratio of every waiting batch grows without bound while estimates stay finite, no
batch starves (tests/batcher).
Estimates are cached per batch (`QueuedBatch.estimated_s`) and refreshed by the caller only when
the batch's revision changes; until then the last estimate (or the fallback guess) is used.
"""

from __future__ import annotations

from collections.abc import Iterable

from services.batcher.policy import rules
from services.batcher.policy.base import Policy
from services.batcher.policy.batch import QueuedBatch
from services.batcher.policy.columns import BatchColumns
from services.batcher.policy.fallback import fallback_estimate_s
from services.batcher.policy.rules import MemoryBudget


def batch_estimate_s(batch: QueuedBatch) -> float:
    """The cached estimate if any (even of an older revision), else the fallback guess, seconds."""
    if batch.estimated_s is not None and batch.estimated_s > 0:
        return batch.estimated_s
    return float(fallback_estimate_s(batch.size, batch.input_tokens_max, batch.gen_tokens_max))


def response_ratio(batch: QueuedBatch, now_s: float) -> float:
    """rules.response_ratio of one batch at `now_s` (wait = now - oldest member's arrival, >= 0)."""
    return rules.response_ratio(max(0.0, now_s - batch.oldest_arrival_s), batch_estimate_s(batch))


def choose_next(batches: Iterable[QueuedBatch], policy: Policy, now_s: float) -> QueuedBatch | None:
    """The batch `policy` runs next, or None when there is none; ties go to the earlier batch.

    A long-lived queue should use `batch_queue.BatchQueue.take_next`, which keeps the columns.
    """
    batches = list(batches)
    rows = policy.next_rows(BatchColumns.from_batches(batches), now_s, MemoryBudget())
    return batches[rows[0]] if rows else None
