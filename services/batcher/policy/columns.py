"""The two queue decisions as array kernels over per-batch aggregates (one row per queued batch).

Why arrays: with 10,000 requests queued there can be thousands of batches, and a Python loop over
them costs milliseconds per decision; the same arithmetic over numpy columns costs tens of
microseconds. The policies (policy/families/) are built from these kernels, and the kernels from
the rules (rules.py), so each rule has one definition whether it runs on one batch or on columns.

Ties are broken by `seq` (smaller = earlier in queue order), as a scan in queue order would.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from services.batcher.policy import rules
from services.batcher.policy.batch import Member, QueuedBatch
from services.batcher.policy.fallback import fallback_estimate_s
from services.batcher.policy.rules import MemoryBudget
from services.core.tail_guard import outlasts_drain


@dataclass
class BatchColumns:
    """Aggregates of `n` batches, row i = one batch. Views; the kernels never write to them.

    input_max / gen_max: L(B), G(B) in tokens; term_max: max_p h(p) (rules.member_term), token reads;
    size: requests; oldest_arrival_s: arrival of the oldest member, s; estimate_s: cached batch
    time, s, NaN when none; is_sealed: no insertions; seq: queue order (requeued batches negative).
    """

    input_max: np.ndarray
    gen_max: np.ndarray
    term_max: np.ndarray
    size: np.ndarray
    oldest_arrival_s: np.ndarray
    estimate_s: np.ndarray
    is_sealed: np.ndarray
    seq: np.ndarray

    @classmethod
    def from_batches(cls, batches: Sequence[QueuedBatch]) -> BatchColumns:
        """Columns of `batches` in the given order (seq = position)."""
        return cls(
            input_max=np.array([b.input_tokens_max for b in batches], dtype=np.int64),
            gen_max=np.array([b.gen_tokens_max for b in batches], dtype=np.int64),
            term_max=np.array([b.max_member_term for b in batches], dtype=np.float64),
            size=np.array([b.size for b in batches], dtype=np.int64),
            oldest_arrival_s=np.array([b.oldest_arrival_s for b in batches], dtype=np.float64),
            estimate_s=np.array([cached_estimate(b) for b in batches], dtype=np.float64),
            is_sealed=np.array([b.is_sealed for b in batches], dtype=bool),
            seq=np.arange(len(batches), dtype=np.int64),
        )


def cached_estimate(batch: QueuedBatch) -> float:
    """The batch's cached estimate in seconds (possibly of an older revision), NaN if none."""
    return batch.estimated_s if batch.estimated_s is not None and batch.estimated_s > 0 else float("nan")


def _first_best(key: np.ndarray, seq: np.ndarray, *, lowest: bool) -> int | None:
    """Row of the best finite key; among equal keys the smallest seq. None if none is finite."""
    finite = np.isfinite(key)
    if not finite.any():
        return None
    best = key[finite].min() if lowest else key[finite].max()
    ties = np.flatnonzero(key == best)
    return int(ties[np.argmin(seq[ties])])


def newest_row_with_room(cols: BatchColumns, *, max_batch_size: int) -> int | None:
    """FCFS insertion: the newest batch (largest seq) if it is open and below max_batch_size."""
    if len(cols.size) == 0:
        return None
    newest = int(np.argmax(cols.seq))
    return newest if not cols.is_sealed[newest] and cols.size[newest] < max_batch_size else None


def least_wma_row(
    cols: BatchColumns,
    member: Member,
    *,
    phi_token_reads: float | None,
    max_batch_size: int | None,
    budget: MemoryBudget | None,
    fill_fraction: float = 1.0,
) -> int | None:
    """WMA insertion: the batch with the smallest WMA after `member` joins, among those it may join,
    if that WMA is below Phi (None = no threshold). "May join": not sealed, below max_batch_size,
    and, with a `budget`, within the KV cap (rules.fits_memory) at `fill_fraction` after joining.
    """
    if len(cols.size) == 0:
        return None
    new_input = np.maximum(cols.input_max, member.input_tokens)
    new_gen = np.maximum(cols.gen_max, member.gen_tokens)
    allowed = ~cols.is_sealed
    if max_batch_size is not None:
        allowed &= cols.size < max_batch_size
    if budget is not None:
        allowed &= rules.fits_memory(cols.size + 1, new_input, new_gen, budget.kv_bytes_per_token,
                                     budget.free_kv_bytes, fill_fraction)
    wma = rules.wma_after_insert(cols.input_max, cols.gen_max, cols.term_max, member.input_tokens, member.gen_tokens)
    wma = np.where(allowed, wma, np.inf)
    row = _first_best(wma, cols.seq, lowest=True)
    if row is None or (phi_token_reads is not None and wma[row] >= phi_token_reads):
        return None
    return row


def oldest_row(cols: BatchColumns) -> int | None:
    """FCFS choice: the batch holding the oldest request; None when nothing is queued."""
    nonempty = cols.size > 0
    if not nonempty.any():
        return None
    return _first_best(np.where(nonempty, cols.oldest_arrival_s, np.inf), cols.seq, lowest=True)


def estimates_s(cols: BatchColumns) -> np.ndarray:
    """Each batch's cached estimate, else the fallback guess, seconds."""
    fallback_s = fallback_estimate_s(cols.size, cols.input_max, cols.gen_max)
    return np.where(np.isnan(cols.estimate_s), fallback_s, cols.estimate_s)


def highest_ratio_row(cols: BatchColumns, now_s: float, *, is_size_weighted: bool = False) -> int | None:
    """HRRN choice: the highest response ratio (rules.response_ratio; times the size with
    `is_size_weighted`, rules.size_weighted_ratio), wait = now - oldest member's arrival."""
    nonempty = cols.size > 0
    if not nonempty.any():
        return None
    wait_s = np.maximum(0.0, now_s - cols.oldest_arrival_s)
    run_s = estimates_s(cols)
    if is_size_weighted:
        ratio = rules.size_weighted_ratio(cols.size, wait_s, run_s)
    else:
        ratio = rules.response_ratio(wait_s, run_s)
    return _first_best(np.where(nonempty, ratio, -np.inf), cols.seq, lowest=False)


def outlasting_row(cols: BatchColumns, lanes: int) -> int | None:
    """The tail guard's choice (services.core.tail_guard): of the batches whose estimate outlasts the
    queue's drain over `lanes`, the longest; None when none does."""
    nonempty = cols.size > 0
    if not nonempty.any():
        return None
    run_s = estimates_s(cols)
    outlasting = np.zeros(len(run_s), dtype=bool)
    outlasting[nonempty] = outlasts_drain(run_s[nonempty], lanes)
    return _first_best(np.where(outlasting, run_s, -np.inf), cols.seq, lowest=False)


def rows_of(row: int | None) -> list[int]:
    """A single chosen row as the row list policies return; [] for none."""
    return [] if row is None else [row]
