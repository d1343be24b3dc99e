"""ccb, the paper's continuous-batching baseline: one lease per request, oldest first."""

from __future__ import annotations

from services.batcher.policy.base import BasePolicy
from services.batcher.policy.batch import Member
from services.batcher.policy.columns import BatchColumns, oldest_row, rows_of
from services.batcher.policy.rules import MemoryBudget


class ContinuousBatching(BasePolicy):
    """A worker in continuous mode pulls a request whenever a row of its running batch frees; the
    row's memory is checked at admission (L + max_new_tokens), not here."""

    name = "ccb"
    is_continuous = True
    can_preempt = False  # it plans with no lengths

    @property
    def max_batch_size(self) -> int:
        return 1

    def insert_row(self, cols: BatchColumns, member: Member, budget: MemoryBudget) -> int | None:
        return None  # every request is its own lease

    def next_rows(self, cols: BatchColumns, now_s: float, budget: MemoryBudget) -> list[int]:
        return rows_of(oldest_row(cols))
