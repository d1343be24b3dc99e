"""The one percentile rule of every bench report: nearest rank, the smallest value with at least q of them
at or below it (the p99 of 200 latencies is the third longest). The reports used three rules before
(nearest rank, round(q (n - 1)), int(q n): the p99 of 200 was the second longest in some)."""

from __future__ import annotations

import math
from collections.abc import Iterable


def nearest_rank(values: Iterable[float], q: float) -> float:
    """The q-quantile (0 < q <= 1) of `values` by nearest rank; nan when there are none."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)] if ordered else float("nan")
