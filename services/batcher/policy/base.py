"""What a batching policy is: the `Policy` protocol, its knobs, and the defaults most families share.

A policy answers three questions, all pure (no I/O, no clock reads):
  * what length it plans a request with (`planned_gen_tokens`, `replanned_gen_tokens`),
  * which queued batch a new request joins (`insert_row`, None = a batch of its own),
  * what a free worker runs next (`next_rows`: one row, or several to merge into one lease).
The scheduler and the simulator hand it the queue's columns (columns.BatchColumns) and act on the
rows it returns. One class per family lives in policy/families/; policy/registry.py names them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Protocol

from services.batcher.policy.batch import Member
from services.batcher.policy.columns import BatchColumns
from services.batcher.policy.pack_cost import LinearBatchCost
from services.batcher.policy.rules import MemoryBudget


@dataclass(frozen=True)
class PolicyKnobs:
    """The settings a family may read (each family says which it uses).

    phi_token_reads: WMA threshold Phi, token reads (glp, abp, magnus*, oracle).
    fixed_batch_size: requests per batch of the fixed-size families (vs, glp).
    max_batch_size: ceiling of the memory-capped families; None = memory cap only.
    memory_fill_fraction: share of Theta a batch may fill by *predicted* lengths; the rest is
      headroom for under-predictions, each of which would otherwise cost an OOM and a split.
    pack_cost: the batch-time model magnus_pack scores windows with; None = its default.
    """

    phi_token_reads: float
    fixed_batch_size: int
    max_batch_size: int | None = None
    memory_fill_fraction: float = 1.0
    pack_cost: LinearBatchCost | None = None

    def __post_init__(self) -> None:
        if self.phi_token_reads <= 0:
            raise ValueError(f"phi_token_reads must be > 0, got {self.phi_token_reads}")
        if self.fixed_batch_size < 1:
            raise ValueError(f"fixed_batch_size must be >= 1, got {self.fixed_batch_size}")
        if self.max_batch_size is not None and self.max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {self.max_batch_size}")
        if not 0.0 < self.memory_fill_fraction <= 1.0:
            raise ValueError(f"memory_fill_fraction must be in (0, 1], got {self.memory_fill_fraction}")


class Policy(Protocol):
    """The interface the scheduler, the batch queue and the simulator use."""

    name: str
    max_batch_size: int | None  # the most requests one lease may hold; None = no ceiling
    is_continuous: bool  # one lease per request, a lane per row of a continuous worker
    uses_estimates: bool  # its choice reads batch-time estimates (HRRN): keep them fresh
    times_batches_itself: bool  # it estimates its own batches (packing): no estimator calls
    can_preempt: bool  # planned with predictions, so stragglers may be cut (preempt_share)
    plans_with_true_lengths: bool  # the oracle: max_new_tokens is the true length

    def planned_gen_tokens(self, *, predicted_tokens: int, upper_tokens: int | None, max_new_tokens: int) -> int:
        """G(p) a new request is planned with, tokens, in [1, max_new_tokens]."""
        ...

    def replanned_gen_tokens(
        self, *, remaining_tokens: int, generated_tokens: int, num_preemptions: int, max_preemptions: int
    ) -> int:
        """G(p) of a request cut by straggler preemption, for its continuation, tokens."""
        ...

    def insert_row(self, cols: BatchColumns, member: Member, budget: MemoryBudget) -> int | None:
        """Row of the queued batch `member` joins, or None to open a batch of its own."""
        ...

    def next_rows(self, cols: BatchColumns, now_s: float, budget: MemoryBudget) -> list[int]:
        """Rows a free worker runs now (two or more are merged into one lease); [] when empty."""
        ...

    def merged_estimate_s(self, size: int, input_tokens_max: int, gen_tokens_max: int) -> float | None:
        """Run time of a batch this policy merged, seconds; None = ask the estimator."""
        ...


class BasePolicy:
    """Defaults: plan with the point prediction, never merge, preempt, static batches."""

    name: ClassVar[str]
    is_continuous: ClassVar[bool] = False
    uses_estimates: ClassVar[bool] = False
    times_batches_itself: ClassVar[bool] = False
    can_preempt: ClassVar[bool] = True
    plans_with_true_lengths: ClassVar[bool] = False

    def __init__(self, knobs: PolicyKnobs) -> None:
        self.knobs = knobs

    @property
    def max_batch_size(self) -> int | None:
        return self.knobs.max_batch_size

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, {self.knobs})"

    def planned_gen_tokens(self, *, predicted_tokens: int, upper_tokens: int | None, max_new_tokens: int) -> int:
        """The point prediction: a request never generates more than max_new_tokens."""
        return max(1, min(predicted_tokens, max_new_tokens))

    def replanned_gen_tokens(
        self, *, remaining_tokens: int, generated_tokens: int, num_preemptions: int, max_preemptions: int
    ) -> int:
        """As much again as it generated so far (it outran its prediction once already); its whole
        remaining budget once cut max_preemptions times, so it is never cut again."""
        if num_preemptions >= max_preemptions:
            return max(1, remaining_tokens)
        return max(1, min(remaining_tokens, generated_tokens))

    def merged_estimate_s(self, size: int, input_tokens_max: int, gen_tokens_max: int) -> float | None:
        return None
