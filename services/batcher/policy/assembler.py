"""Where a new request goes, for a handful of batches (tests, examples): the policy's insertion rule."""

from __future__ import annotations

from collections.abc import Iterable

from services.batcher.policy.base import Policy
from services.batcher.policy.batch import Member, QueuedBatch
from services.batcher.policy.columns import BatchColumns
from services.batcher.policy.rules import MemoryBudget  # noqa: F401  (re-exported: benches import it here)


def choose_batch_for(
    member: Member,
    open_batches: Iterable[QueuedBatch],
    policy: Policy,
    budget: MemoryBudget,
) -> QueuedBatch | None:
    """The batch `member` should join, or None to open a new batch.

    `open_batches` must be in queue order (FCFS appends to the last one). A long-lived queue should
    use `batch_queue.BatchQueue.choose_for`, which runs the same kernel on columns it keeps up to date.
    """
    batches = list(open_batches)
    row = policy.insert_row(BatchColumns.from_batches(batches), member, budget)
    return None if row is None else batches[row]
