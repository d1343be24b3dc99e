"""Where a new request goes: the open batch with minimal WMA under Phi and the memory cap."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from services.batcher.policy.batch import Member, QueuedBatch, memory_bytes
from services.batcher.policy.config import InsertMode, PolicyConfig
from services.batcher.policy.wma import wma_after_insert


@dataclass(frozen=True)
class MemoryBudget:
    """Delta (KV bytes per token) and Theta (free KV bytes) of the workers; None = unknown/no cap."""

    kv_bytes_per_token: int | None = None
    free_kv_bytes: int | None = None

    def fits(self, size: int, input_tokens_max: int, gen_tokens_max: int) -> bool:
        if self.kv_bytes_per_token is None or self.free_kv_bytes is None:
            return True
        return memory_bytes(size, input_tokens_max, gen_tokens_max, self.kv_bytes_per_token) <= self.free_kv_bytes


def can_join(batch: QueuedBatch, member: Member, policy: PolicyConfig, budget: MemoryBudget) -> bool:
    """Whether `member` may be added to `batch` at all (sealed, size and memory checks)."""
    if batch.is_sealed:
        return False
    if policy.max_batch_size is not None and batch.size >= policy.max_batch_size:
        return False
    if policy.use_memory_cap:
        return budget.fits(
            batch.size + 1,
            max(batch.input_tokens_max, member.input_tokens),
            max(batch.gen_tokens_max, member.gen_tokens),
        )
    return True


def choose_batch_for(
    member: Member,
    open_batches: Iterable[QueuedBatch],
    policy: PolicyConfig,
    budget: MemoryBudget,
) -> QueuedBatch | None:
    """The batch `member` should join, or None to open a new batch.

    `open_batches` must be in creation order (FCFS appends to the newest). O(number of batches),
    each candidate O(1) thanks to the WMA aggregates.
    """
    if policy.insert_mode is InsertMode.FCFS:
        newest = None
        for newest in open_batches:
            pass
        return newest if newest is not None and can_join(newest, member, policy, budget) else None

    best, best_wma = None, float("inf")
    for batch in open_batches:
        if not can_join(batch, member, policy, budget):
            continue
        wma = wma_after_insert(
            batch.input_tokens_max, batch.gen_tokens_max, batch.max_member_term, member.input_tokens, member.gen_tokens
        )
        if wma < best_wma:
            best, best_wma = batch, wma
    if best is None:
        return None
    if policy.phi_token_reads is not None and best_wma >= policy.phi_token_reads:
        return None
    return best
