"""vs, the paper's baseline: fixed-size batches filled in arrival order, run oldest first."""

from __future__ import annotations

from services.batcher.policy.base import BasePolicy
from services.batcher.policy.batch import Member
from services.batcher.policy.columns import BatchColumns, newest_row_with_room, oldest_row, rows_of
from services.batcher.policy.rules import MemoryBudget


class VanillaScheduling(BasePolicy):
    """Groups without lengths; its plan (the point prediction) only feeds the wait estimate and the
    worker's fit check. knobs: fixed_batch_size."""

    name = "vs"
    can_preempt = False  # it plans with no lengths, so no request is a straggler by its plan

    @property
    def max_batch_size(self) -> int:
        return self.knobs.fixed_batch_size

    def insert_row(self, cols: BatchColumns, member: Member, budget: MemoryBudget) -> int | None:
        return newest_row_with_room(cols, max_batch_size=self.knobs.fixed_batch_size)

    def next_rows(self, cols: BatchColumns, now_s: float, budget: MemoryBudget) -> list[int]:
        return rows_of(oldest_row(cols))
