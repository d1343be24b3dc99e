"""glp, the paper's first step: fixed-size batches grouped by WMA under Phi, run oldest first."""

from __future__ import annotations

from services.batcher.policy.base import BasePolicy
from services.batcher.policy.batch import Member
from services.batcher.policy.columns import BatchColumns, least_wma_row, oldest_row, rows_of
from services.batcher.policy.rules import MemoryBudget


class GenerationLengthPrediction(BasePolicy):
    """A request joins the open batch with the least WMA after insertion if that is below Phi.
    Without Phi every request would join some open batch and the batches would fill in arrival
    order, i.e. glp would be vs. knobs: phi_token_reads, fixed_batch_size."""

    name = "glp"

    @property
    def max_batch_size(self) -> int:
        return self.knobs.fixed_batch_size

    def insert_row(self, cols: BatchColumns, member: Member, budget: MemoryBudget) -> int | None:
        return least_wma_row(cols, member, phi_token_reads=self.knobs.phi_token_reads,
                             max_batch_size=self.knobs.fixed_batch_size, budget=None)

    def next_rows(self, cols: BatchColumns, now_s: float, budget: MemoryBudget) -> list[int]:
        return rows_of(oldest_row(cols))
