"""abp, adaptive batching: WMA grouping under Phi and the KV cap by planned lengths, run oldest first."""

from __future__ import annotations

from services.batcher.policy.base import BasePolicy
from services.batcher.policy.batch import Member
from services.batcher.policy.columns import BatchColumns, least_wma_row, oldest_row, rows_of
from services.batcher.policy.rules import MemoryBudget


class AdaptiveBatching(BasePolicy):
    """Batches grow while their WMA stays below Phi and MEM(B) within Theta x memory_fill_fraction.
    knobs: phi_token_reads, max_batch_size (a ceiling, None = memory only), memory_fill_fraction."""

    name = "abp"

    @property
    def fill_fraction(self) -> float:
        """Share of Theta a batch may fill by its planned lengths."""
        return self.knobs.memory_fill_fraction

    def insert_row(self, cols: BatchColumns, member: Member, budget: MemoryBudget) -> int | None:
        return least_wma_row(cols, member, phi_token_reads=self.knobs.phi_token_reads,
                             max_batch_size=self.knobs.max_batch_size, budget=budget,
                             fill_fraction=self.fill_fraction)

    def next_rows(self, cols: BatchColumns, now_s: float, budget: MemoryBudget) -> list[int]:
        return rows_of(oldest_row(cols))
