"""magnus, the paper's whole system: abp's grouping, and the highest response ratio runs next."""

from __future__ import annotations

from services.batcher.policy.columns import BatchColumns, highest_ratio_row, rows_of
from services.batcher.policy.families.abp import AdaptiveBatching
from services.batcher.policy.rules import MemoryBudget


class Magnus(AdaptiveBatching):
    """HRRN over the queued batches with the estimator's batch times (fallback guess until then)."""

    name = "magnus"
    uses_estimates = True

    def next_rows(self, cols: BatchColumns, now_s: float, budget: MemoryBudget) -> list[int]:
        return rows_of(highest_ratio_row(cols, now_s))
