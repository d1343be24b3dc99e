"""magnus_ccb (beyond the paper; its future work): continuous batching, highest response ratio first."""

from __future__ import annotations

from services.batcher.policy.columns import BatchColumns, highest_ratio_row, rows_of
from services.batcher.policy.families.ccb import ContinuousBatching
from services.batcher.policy.rules import MemoryBudget


class MagnusContinuous(ContinuousBatching):
    """Still one lease per request, but the next to join the running batch is the one with the highest
    response ratio by its predicted length: short requests stop queueing behind long ones, and the
    long ones age until they go."""

    name = "magnus_ccb"
    uses_estimates = True
    can_preempt = True

    def next_rows(self, cols: BatchColumns, now_s: float, budget: MemoryBudget) -> list[int]:
        return rows_of(highest_ratio_row(cols, now_s))
