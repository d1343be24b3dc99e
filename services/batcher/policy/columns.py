"""The two queue decisions as array kernels over per-batch aggregates (one row per queued batch).

Why arrays: with 10,000 requests queued there can be thousands of batches, and a Python loop over
them costs milliseconds per decision; the same arithmetic over numpy columns costs tens of
microseconds. Both the list-based helpers (`assembler.choose_batch_for`, `hrrn.choose_next`) and
the indexed `queue.BatchQueue` call these kernels, so there is one implementation of each rule.

Ties are broken by `seq` (smaller = earlier in queue order), as a scan in queue order would.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from services.batcher.policy.batch import Member, QueuedBatch
from services.batcher.policy.config import ChooseMode, InsertMode, PolicyConfig
from services.batcher.policy.fallback import fallback_estimate_s


@dataclass
class BatchColumns:
    """Aggregates of `n` batches, row i = one batch. Views; the kernels never write to them.

    input_max / gen_max: L(B), G(B) in tokens; term_max: max_p h(p) (wma.member_term), token reads;
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


def insert_row(
    cols: BatchColumns, member: Member, policy: PolicyConfig, kv_bytes_per_token: int | None, free_kv_bytes: int | None
) -> int | None:
    """Row of the batch `member` should join, or None to open a new batch.

    FCFS: the newest batch (largest seq) if it can take one more. WMA: the batch with the smallest
    WMA after insertion among those it may join, if that WMA is below Phi. "May join": not sealed,
    below max_batch_size, and with the memory cap MEM = |B| (L + G) Delta <= Theta (times the
    policy's memory_fill_fraction) after insertion.
    """
    if len(cols.size) == 0 or policy.insert_mode is InsertMode.SINGLE:
        return None
    new_input = np.maximum(cols.input_max, member.input_tokens)
    new_gen = np.maximum(cols.gen_max, member.gen_tokens)
    allowed = ~cols.is_sealed
    if policy.max_batch_size is not None:
        allowed &= cols.size < policy.max_batch_size
    if policy.use_memory_cap and kv_bytes_per_token is not None and free_kv_bytes is not None:
        allowed &= (cols.size + 1) * (new_input + new_gen) * kv_bytes_per_token <= free_kv_bytes * policy.memory_fill_fraction
    if policy.insert_mode is InsertMode.FCFS:
        newest = int(np.argmax(cols.seq))
        return newest if allowed[newest] else None
    term = -member.gen_tokens * member.input_tokens + (member.gen_tokens - member.gen_tokens**2) / 2
    # WMA after insertion = C(L', G') + max(h_max, h(p)); see wma.py for the closed form.
    wma = (new_gen + 1) * new_input + new_gen * (new_gen + 1) / 2 + np.maximum(cols.term_max, term)
    wma = np.where(allowed, wma, np.inf)
    row = _first_best(wma, cols.seq, lowest=True)
    if row is None or (policy.phi_token_reads is not None and wma[row] >= policy.phi_token_reads):
        return None
    return row


def next_row(cols: BatchColumns, policy: PolicyConfig, now_s: float) -> int | None:
    """Row of the batch a free worker should run now, or None when there is none.

    FCFS: the batch holding the oldest request. HRRN: the highest (wait + estimate) / estimate,
    wait = now - oldest member's arrival (see hrrn.py), estimate = cached or the fallback guess.
    HRRN_SIZE_WEIGHTED: that ratio times the batch's size.
    """
    nonempty = cols.size > 0
    if not nonempty.any():
        return None
    if policy.choose_mode is ChooseMode.FCFS:
        return _first_best(np.where(nonempty, cols.oldest_arrival_s, np.inf), cols.seq, lowest=True)
    fallback_s = fallback_estimate_s(cols.size, cols.input_max, cols.gen_max)
    estimate_s = np.where(np.isnan(cols.estimate_s), fallback_s, cols.estimate_s)
    wait_s = np.maximum(0.0, now_s - cols.oldest_arrival_s)
    ratio = (wait_s + estimate_s) / estimate_s
    if policy.choose_mode is ChooseMode.HRRN_SIZE_WEIGHTED:
        ratio = ratio * cols.size
    return _first_best(np.where(nonempty, ratio, -np.inf), cols.seq, lowest=False)
