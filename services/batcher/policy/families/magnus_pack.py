"""magnus_pack (beyond the paper): requests queue alone; the batch is packed when a worker pulls (pack.py)."""

from __future__ import annotations

from services.batcher.policy.base import BasePolicy
from services.batcher.policy.batch import Member
from services.batcher.policy.columns import BatchColumns
from services.batcher.policy.pack import pack_rows
from services.batcher.policy.pack_cost import LinearBatchCost
from services.batcher.policy.rules import MemoryBudget


class MagnusPack(BasePolicy):
    """Plans with the predictor's upper estimate: one under-predicted request stretches a whole
    packed batch (reports/gpu/e2e.md), and the forest's spread flags most of them.
    knobs: max_batch_size, memory_fill_fraction, pack_cost."""

    name = "magnus_pack"
    times_batches_itself = True  # the linear model times every candidate window; no KNN per pull

    def __init__(self, knobs) -> None:
        super().__init__(knobs)
        self.cost = knobs.pack_cost or LinearBatchCost()

    @property
    def fill_fraction(self) -> float:
        return self.knobs.memory_fill_fraction

    def planned_gen_tokens(self, *, predicted_tokens: int, upper_tokens: int | None, max_new_tokens: int) -> int:
        """The upper estimate where the predictor gave one, else the point prediction."""
        if upper_tokens is not None:
            predicted_tokens = max(predicted_tokens, upper_tokens)
        return super().planned_gen_tokens(predicted_tokens=predicted_tokens, upper_tokens=None,
                                          max_new_tokens=max_new_tokens)

    def insert_row(self, cols: BatchColumns, member: Member, budget: MemoryBudget) -> int | None:
        return None  # every request queues alone until a worker pulls

    def next_rows(self, cols: BatchColumns, now_s: float, budget: MemoryBudget) -> list[int]:
        free_kv_bytes = None if budget.free_kv_bytes is None else budget.free_kv_bytes * self.fill_fraction
        return pack_rows(cols, now_s, self.cost, max_batch_size=self.knobs.max_batch_size,
                         kv_bytes_per_token=budget.kv_bytes_per_token, free_kv_bytes=free_kv_bytes)

    def merged_estimate_s(self, size: int, input_tokens_max: int, gen_tokens_max: int) -> float:
        return float(self.cost.batch_s(size, input_tokens_max, gen_tokens_max))
