"""Batch run time learned online from completed batches (pure): the clock of deadline decisions.

The estimator's KNN answers well near the shapes it was calibrated on but cannot extrapolate: a batch
25x larger than any calibrated one gets about the largest one's time, and a single actual/estimated
scale (policy/wait.py) cannot fix an error that grows with the batch. Deadline-aware admission and
the lease-time deadline split need a model that extrapolates. A static batch's run time is close to
linear in its work: a prefill of size x L tokens, then G decode steps, each a fixed part plus a part
per row:

    run_s = c0 + c1 * size * L + c2 * G + c3 * size * G        (all c >= 0)

fitted by non-negative least squares over the last WINDOW completed batches (the device, the model
and the machine's load all move the coefficients, so old batches are forgotten). Until MIN_SAMPLES
batches have completed, or while they do not vary enough to fit four coefficients, it answers None
and the caller keeps its scaled estimate.
"""

from __future__ import annotations

from collections import deque

import numpy as np
from scipy.optimize import nnls

WINDOW = 256
MIN_SAMPLES = 8


def _features(size: float, input_tokens: float, gen_tokens: float) -> list[float]:
    return [1.0, size * input_tokens, gen_tokens, size * gen_tokens]


class RunTimeModel:
    """Online least-squares run time of a batch, seconds. Owned by the scheduler; no clock, no I/O."""

    def __init__(self, window: int = WINDOW, min_samples: int = MIN_SAMPLES) -> None:
        self._rows: deque[list[float]] = deque(maxlen=window)
        self._run_s: deque[float] = deque(maxlen=window)
        self._min_samples = min_samples
        self._coefficients: np.ndarray | None = None
        self._is_stale = False

    def observe(self, size: int, input_tokens: int, gen_tokens: int, run_s: float) -> None:
        """Learn from one completed batch: its size, L(B), actual G(B) in tokens, its run time in s."""
        if size < 1 or run_s <= 0:
            return
        self._rows.append(_features(size, input_tokens, gen_tokens))
        self._run_s.append(run_s)
        self._is_stale = True

    @property
    def num_samples(self) -> int:
        return len(self._run_s)

    def predict_s(self, size: int, input_tokens: int, gen_tokens: int) -> float | None:
        """Seconds a batch of this shape should run, or None while the model knows too little."""
        each_s = self.predict_each_s([size], [input_tokens], [gen_tokens])
        return None if each_s is None else float(each_s[0])

    def predict_each_s(self, size, input_tokens, gen_tokens) -> np.ndarray | None:
        """`predict_s` of many batches at once (array-likes of their shapes), or None. The batcher asks
        this for every running lease at each admission: one call instead of one per lease."""
        coefficients = self._fitted()
        if coefficients is None:
            return None
        size, input_tokens, gen_tokens = (np.asarray(a, dtype=float) for a in (size, input_tokens, gen_tokens))
        c0, c1, c2, c3 = coefficients
        return c0 + c1 * size * input_tokens + c2 * gen_tokens + c3 * size * gen_tokens

    def predict_total_s(self, columns) -> float | None:
        """Summed run time of the queued batches in `columns` (policy/columns.BatchColumns), or None."""
        live = np.asarray(columns.size) > 0
        each_s = self.predict_each_s(*(np.asarray(a)[live] for a in (columns.size, columns.input_max, columns.gen_max)))
        return None if each_s is None else float(np.sum(each_s))

    def _fitted(self) -> np.ndarray | None:
        if self._is_stale:
            self._is_stale = False
            self._coefficients = None
            if len(self._run_s) >= self._min_samples:
                rows, run_s = np.asarray(self._rows), np.asarray(self._run_s)
                # columns of very different magnitudes (1 against size x L): scale each to unit size
                norms = np.maximum(np.abs(rows).max(axis=0), 1e-12)
                scaled, _ = nnls(rows / norms, run_s)
                if np.linalg.matrix_rank(rows / norms) >= 2 and np.any(scaled > 0):
                    self._coefficients = scaled / norms
        return self._coefficients
