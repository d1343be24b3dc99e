"""The queued batches, indexed by column arrays so both decisions stay fast with 10,000 requests.

`BatchQueue` is plain bookkeeping (no I/O, no clock): it keeps every queued `QueuedBatch` and, per
batch, one row of aggregates in dense numpy columns (a removed row is filled by the last one).
Every change to a queued batch must go through the queue (`add_member`, `remove_member`,
`set_estimate`) so its row stays in step; the decisions are the policy's (`insert_row`, `next_rows`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np

from services.batcher.policy.base import Policy
from services.batcher.policy.batch import Member, QueuedBatch
from services.batcher.policy.columns import BatchColumns, cached_estimate
from services.batcher.policy.rules import MemoryBudget

_INITIAL_ROWS = 64
_COLUMNS = (
    ("input_max", np.int64),
    ("gen_max", np.int64),
    ("term_max", np.float64),
    ("size", np.int64),
    ("oldest_arrival_s", np.float64),
    ("estimate_s", np.float64),
    ("is_sealed", bool),
    ("seq", np.int64),
)


class BatchQueue:
    """Queued batches in queue order: appended at the back, requeued (older work) at the front."""

    def __init__(self) -> None:
        self._arrays = {name: np.zeros(_INITIAL_ROWS, dtype=dtype) for name, dtype in _COLUMNS}
        self._batches: list[QueuedBatch] = []  # row -> batch
        self._row_of: dict[str, int] = {}  # batch id -> row
        self._next_back_seq = 0
        self._next_front_seq = -1

    # ---- mapping-like reads ------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._batches)

    def __contains__(self, batch_id: object) -> bool:
        return batch_id in self._row_of

    def __getitem__(self, batch_id: str) -> QueuedBatch:
        return self._batches[self._row_of[batch_id]]

    def get(self, batch_id: str) -> QueuedBatch | None:
        row = self._row_of.get(batch_id)
        return None if row is None else self._batches[row]

    def values(self) -> Iterator[QueuedBatch]:
        """The batches in queue order."""
        order = np.argsort(self._arrays["seq"][: len(self._batches)], kind="stable")
        return (self._batches[int(row)] for row in order)

    @property
    def columns(self) -> BatchColumns:
        """Views of the live rows (valid until the next change)."""
        n = len(self._batches)
        return BatchColumns(**{name: array[:n] for name, array in self._arrays.items()})

    # ---- changes -----------------------------------------------------------------------------
    def append(self, batch: QueuedBatch) -> None:
        """Queue `batch` behind every other one (a new batch)."""
        self._insert(batch, self._next_back_seq)
        self._next_back_seq += 1

    def push_front(self, batch: QueuedBatch) -> None:
        """Queue `batch` ahead of every other one (a requeued, older batch)."""
        self._insert(batch, self._next_front_seq)
        self._next_front_seq -= 1

    def pop(self, batch_id: str) -> QueuedBatch:
        """Remove and return a batch; KeyError if it is not queued. O(1)."""
        row = self._row_of.pop(batch_id)
        batch = self._batches[row]
        last = len(self._batches) - 1
        if row != last:
            moved = self._batches[last]
            self._batches[row] = moved
            self._row_of[moved.batch_id] = row
            for array in self._arrays.values():
                array[row] = array[last]
        self._batches.pop()
        return batch

    def clear(self) -> None:
        self._batches.clear()
        self._row_of.clear()

    def add_member(self, batch: QueuedBatch, member: Member) -> None:
        """Add `member` to the queued `batch` and update its row. O(1)."""
        batch.add(member)
        self._write_row(self._row_of[batch.batch_id], batch)

    def remove_member(self, batch_id: str, request_id: str) -> Member | None:
        """Remove one request; a batch left empty leaves the queue. None if it was not there."""
        batch = self[batch_id]
        removed = batch.remove(request_id)
        if not batch.members:
            self.pop(batch_id)
        elif removed is not None:
            self._write_row(self._row_of[batch_id], batch)
        return removed

    def set_estimate(self, batch_id: str, revision: int, estimated_s: float, version: int) -> bool:
        """Cache an estimate made for `revision`; ignored (False) if the batch changed since."""
        batch = self.get(batch_id)
        if batch is None or batch.revision != revision:
            return False
        batch.estimated_s, batch.estimate_revision, batch.estimator_version = estimated_s, revision, version
        self._arrays["estimate_s"][self._row_of[batch_id]] = cached_estimate(batch)
        return True

    # ---- decisions ---------------------------------------------------------------------------
    def choose_for(self, member: Member, policy: Policy, budget: MemoryBudget) -> QueuedBatch | None:
        """The queued batch `member` should join, or None to open a new one (policy.insert_row)."""
        row = policy.insert_row(self.columns, member, budget)
        return None if row is None else self._batches[row]

    def choose_next(self, policy: Policy, now_s: float, budget: MemoryBudget | None = None) -> QueuedBatch | None:
        """The first batch of what a free worker would run now; it stays queued (benches, tests)."""
        rows = policy.next_rows(self.columns, now_s, budget or MemoryBudget())
        return self._batches[rows[0]] if rows else None

    def take_next(
        self, policy: Policy, now_s: float, budget: MemoryBudget, new_batch_id: Callable[[], str]
    ) -> QueuedBatch | None:
        """Remove and return what a free worker runs now (policy.next_rows): the chosen batch, or the
        chosen ones merged into one new batch (`new_batch_id()` names it). None when empty."""
        chosen = [self._batches[row] for row in policy.next_rows(self.columns, now_s, budget)]  # before popping
        if not chosen:
            return None
        if len(chosen) == 1:
            return self.pop(chosen[0].batch_id)
        merged = QueuedBatch(new_batch_id())
        for batch in chosen:
            self.pop(batch.batch_id)
            for member in batch.members:
                merged.add(member)
        # the policy's own time is the estimate the lease and the log carry (no KNN call per pull)
        merged.estimated_s = policy.merged_estimate_s(merged.size, merged.input_tokens_max, merged.gen_tokens_max)
        merged.estimate_revision = merged.revision
        return merged

    # ---- internals ---------------------------------------------------------------------------
    def _insert(self, batch: QueuedBatch, seq: int) -> None:
        if batch.batch_id in self._row_of:
            raise ValueError(f"batch {batch.batch_id} is already queued")
        row = len(self._batches)
        if row == len(self._arrays["seq"]):
            self._arrays = {name: np.resize(array, 2 * row) for name, array in self._arrays.items()}
        self._batches.append(batch)
        self._row_of[batch.batch_id] = row
        self._arrays["seq"][row] = seq
        self._write_row(row, batch)

    def _write_row(self, row: int, batch: QueuedBatch) -> None:
        arrays = self._arrays
        arrays["input_max"][row] = batch.input_tokens_max
        arrays["gen_max"][row] = batch.gen_tokens_max
        arrays["term_max"][row] = batch.max_member_term
        arrays["size"][row] = batch.size
        arrays["oldest_arrival_s"][row] = batch.oldest_arrival_s
        arrays["estimate_s"][row] = cached_estimate(batch)
        arrays["is_sealed"][row] = batch.is_sealed
