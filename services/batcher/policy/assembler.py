"""Where a new request goes: the open batch with minimal WMA under Phi and the memory cap."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from services.batcher.policy.batch import Member, QueuedBatch, memory_bytes
from services.batcher.policy.columns import BatchColumns, insert_row
from services.batcher.policy.config import PolicyConfig


@dataclass(frozen=True)
class MemoryBudget:
    """Delta (KV bytes per token) and Theta (free KV bytes) of the workers; None = unknown/no cap."""

    kv_bytes_per_token: int | None = None
    free_kv_bytes: int | None = None

    def fits(self, size: int, input_tokens_max: int, gen_tokens_max: int) -> bool:
        if self.kv_bytes_per_token is None or self.free_kv_bytes is None:
            return True
        return memory_bytes(size, input_tokens_max, gen_tokens_max, self.kv_bytes_per_token) <= self.free_kv_bytes


def choose_batch_for(
    member: Member,
    open_batches: Iterable[QueuedBatch],
    policy: PolicyConfig,
    budget: MemoryBudget,
) -> QueuedBatch | None:
    """The batch `member` should join, or None to open a new batch.

    `open_batches` must be in queue order (FCFS appends to the last one). For a handful of batches;
    a long-lived queue should use `queue.BatchQueue.choose_for`, which runs the same kernel
    (`columns.insert_row`) on columns it keeps up to date.
    """
    batches = list(open_batches)
    row = insert_row(
        BatchColumns.from_batches(batches), member, policy, budget.kv_bytes_per_token, budget.free_kv_bytes
    )
    return None if row is None else batches[row]
