"""magnus_ccb (beyond the paper; its future work): continuous batching, highest response ratio first;
magnus_ccb_tail: the same after any request predicted to outlast the queue's drain."""

from __future__ import annotations

from services.batcher.policy.columns import BatchColumns, highest_ratio_row, outlasting_row, rows_of
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


class MagnusContinuousTail(MagnusContinuous):
    """magnus_ccb, but a request whose estimate is at least the queue's drain time (the queued estimates
    over the workers' lanes) goes first, the longest first: under HRRN alone a burst's longest requests go
    last and end long after the rest, which sets the burst's end and its slowest latencies. A burst ends
    sooner and its mean latency is higher (reports/gpu/serving_tail); with lanes unknown, magnus_ccb."""

    name = "magnus_ccb_tail"

    def next_rows(self, cols: BatchColumns, now_s: float, budget: MemoryBudget) -> list[int]:
        row = outlasting_row(cols, budget.lanes) if budget.lanes else None
        return rows_of(row if row is not None else highest_ratio_row(cols, now_s))
