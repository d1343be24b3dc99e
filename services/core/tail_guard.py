"""The tail guard of a length-aware queue (beyond the paper; reports/gpu/serving_tail): under HRRN a burst's
longest requests start last and end long after the rest. A waiting request whose own work is at least what
the whole queue needs to drain would, started any later, end after everything else: the guard starts such
requests first. Pure; the batcher's `magnus_ccb_tail` (estimates in seconds over its workers' lanes) and the
paged worker's `hrrn_tail` order (predicted steps over its rows) both ask it."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def outlasts_drain(work: Sequence[float] | np.ndarray, lanes: int) -> np.ndarray:
    """work[i] >= sum(work) / lanes for each waiting request (any unit: seconds, steps): its own work is at
    least the queue's drain time with `lanes` of them running at once."""
    work = np.asarray(work, dtype=float)
    return work >= work.sum() / max(1, lanes)
