"""magnus_sw (beyond the paper): magnus with the response ratio weighted by the batch size (hrrn.py)."""

from __future__ import annotations

from services.batcher.policy.columns import BatchColumns, highest_ratio_row, rows_of
from services.batcher.policy.families.magnus import Magnus
from services.batcher.policy.rules import MemoryBudget


class MagnusSizeWeighted(Magnus):
    name = "magnus_sw"

    def next_rows(self, cols: BatchColumns, now_s: float, budget: MemoryBudget) -> list[int]:
        return rows_of(highest_ratio_row(cols, now_s, is_size_weighted=True))
