"""Calibrated upper quantiles and out-of-distribution flags for a forest's length predictions.

Method: locally weighted split-conformal regression in log-token space, calibrated on the
forest's out-of-bag rows (each training row is scored only by the trees that did not see it, as
in jackknife+-after-bootstrap, so no rows are held back from the fit). A row's score is

    r = (log1p(true tokens) - log1p(OOB point)) / spread,   spread = std of the trees' log1p tokens + floor

and the q-quantile for a new request is expm1(log1p(point) + spread(x) * Q_q(r | its instruction)).
One score distribution serves every level, so the levels are a serving setting, not a fit-time
choice; the trees' spread makes the interval wider where the trees disagree; the per-instruction
groups keep one task's tight errors from shrinking another's (coverage holds per task, not only
on average). Why not CQR on the trees' quantiles: that needs one score per level, and the trees'
spread of a median-aggregated forest is narrow and biased low, so its correction is most of the
answer anyway.

Out of distribution: an unseen instruction, an input length outside its group's range, or a user
embedding farther from its group's centroid than its calibration rows' 99th percentile. Such a
request is given the widest group's score quantile, times `ood_inflation`, at a spread no smaller
than the median calibration spread: never a confident short guess. And its upper quantiles
(levels >= 0.5) are never narrower, relative to the point, than a group-level conformal floor:
each group's q-quantile of its *unnormalized* log residuals (log1p true - log1p point), and of
those the split-conformal q-quantile over the groups (with fewer than q / (1 - q) groups, 9 at
p90, the widest group's); `ood_inflation` does not multiply it. Why: the trees' spread measures their disagreement on rows like the training rows; trees fit on
other tasks can agree on a new task and all be wrong about it (a new translation direction of a
known language pair), so the spread says nothing about a task-level shift. Treating tasks as
exchangeable, a new task's q-quantile residual falls below that floor with probability about q.
Pure numpy, no I/O.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

DEFAULT_LEVELS = (0.5, 0.9, 0.95)
MIN_GROUP_ROWS = 30  # fewer calibration rows than this: the group uses the pooled scores
LENGTH_MARGIN_LOG = math.log(1.5)  # input lengths within 1.5x of a group's range are in range
DISTANCE_QUANTILE = 0.99
_CACHE = "_level_lookups"  # per-levels lookups, kept in the instance's __dict__, never pickled
# How much an OOD request's score quantile is widened: the largest factor any task needed, when
# left out of training, for its p90 to cover 90 % of its rows (`bench.predictor_shift`,
# reports/predictor/shift.json "ood_inflation").
# With the lexical stage the known instructions' corrected residuals are smaller, so is the floor
# they set, and code_comment left out needs 1.5 (1.25 before the stage); every other task 1.0.
DEFAULT_OOD_INFLATION = 1.5


def tree_log_stats(log_tokens: np.ndarray, is_used: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(median, std) over trees of (num_trees, n) log1p-token predictions; `is_used` masks trees
    per row (out-of-bag rows); a row with no tree used gets NaN."""
    if is_used is None:
        return np.median(log_tokens, axis=0), log_tokens.std(axis=0)
    masked = np.where(is_used, log_tokens, np.nan)
    with warnings.catch_warnings():
        # all-NaN columns (rows every tree saw) warn; the caller drops those rows
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmedian(masked, axis=0), np.nanstd(masked, axis=0)


def conformal_quantile(sorted_scores: np.ndarray, level: float) -> float:
    """The split-conformal q-quantile: the ceil((n + 1) q)-th smallest score (the largest when
    that exceeds n, a slight under-guarantee for levels near 1 on small groups)."""
    n = len(sorted_scores)
    if n == 0:
        raise ValueError("no calibration scores")
    k = min(n, max(1, math.ceil((n + 1) * level)))
    return float(sorted_scores[k - 1])


@dataclass(frozen=True)
class GroupCalibration:
    """One instruction's calibration: sorted scores, input-length range (log1p tokens), user
    embedding centroid and the DISTANCE_QUANTILE of its rows' distances to it, and its sorted
    unnormalized log1p-token residuals (None in calibrations pickled before them)."""

    scores: np.ndarray
    log_input_low: float
    log_input_high: float
    centroid: np.ndarray
    radius: float
    log_residuals: np.ndarray | None = None


@dataclass(frozen=True)
class _Lookup:
    index: dict[str, int]
    scores: np.ndarray  # (groups, levels)
    widest: np.ndarray  # (levels,)
    ood_log_floor: np.ndarray  # (levels,) least log1p-token width of an OOD request's quantile; -inf = none
    centroids: np.ndarray
    radii: np.ndarray
    log_input_low: np.ndarray
    log_input_high: np.ndarray


@dataclass(frozen=True)
class Calibration:
    groups: dict[str, GroupCalibration]
    pooled_scores: np.ndarray
    embed_scale: np.ndarray  # per-feature std of the embeddings, so distances are unit-free
    median_spread: float
    spread_floor: float
    ood_inflation: float = DEFAULT_OOD_INFLATION
    num_rows: int = 0

    def __getstate__(self) -> dict:
        # lookups are rebuilt on use ("_lookups": the cache's name in artifacts pickled before this one)
        return {k: v for k, v in self.__dict__.items() if k not in (_CACHE, "_lookups")}

    def lookup(self, levels: tuple[float, ...]) -> _Lookup:
        """The per-group arrays predict_quantiles needs at `levels`, built once per levels tuple."""
        cache = self.__dict__.setdefault(_CACHE, {})
        if levels not in cache:
            per_group, widest = self.score_quantiles(levels)
            names = sorted(self.groups)
            cache[levels] = _Lookup(
                index={name: i for i, name in enumerate(names)},
                scores=np.array([per_group[name] for name in names]).reshape(len(names), len(levels)),
                widest=widest,
                ood_log_floor=self.ood_log_floor(levels),
                centroids=np.array([self.groups[name].centroid for name in names]),
                radii=np.array([self.groups[name].radius for name in names]),
                log_input_low=np.array([self.groups[name].log_input_low for name in names]),
                log_input_high=np.array([self.groups[name].log_input_high for name in names]),
            )
        return cache[levels]

    def score_quantiles(self, levels: Sequence[float]) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """({group: (L,) score quantiles}, (L,) the widest group's, for OOD rows)."""
        per_group = {}
        for name, group in self.groups.items():
            scores = group.scores if len(group.scores) >= MIN_GROUP_ROWS else self.pooled_scores
            per_group[name] = np.array([conformal_quantile(scores, q) for q in levels])
        pooled = np.array([conformal_quantile(self.pooled_scores, q) for q in levels])
        widest = np.max(np.vstack([pooled, *per_group.values()]), axis=0)
        return per_group, widest

    def ood_log_floor(self, levels: Sequence[float]) -> np.ndarray:
        """(L,) per level q >= 0.5: the split-conformal q-quantile over the groups of each group's
        q-quantile of its log residuals (groups of >= MIN_GROUP_ROWS rows; all rows as one group if
        none is that large); -inf below 0.5, and for calibrations without residuals."""
        residuals = [g.log_residuals for g in self.groups.values() if getattr(g, "log_residuals", None) is not None]
        if not residuals:
            return np.full(len(levels), -np.inf)
        large = [r for r in residuals if len(r) >= MIN_GROUP_ROWS] or [np.sort(np.concatenate(residuals))]
        return np.array([
            conformal_quantile(np.sort([conformal_quantile(r, q) for r in large]), q) if q >= 0.5 else -np.inf
            for q in levels
        ])


@dataclass(frozen=True)
class QuantilePrediction:
    """Per request: `quantiles` (n, L) tokens at `levels`; `uncertainty` the spread of log1p
    tokens used (~ relative error, unitless); `ood_score` >= 0 (> 1 = beyond the training range);
    `is_ood` the flag."""

    levels: tuple[float, ...]
    quantiles: np.ndarray
    uncertainty: np.ndarray
    ood_score: np.ndarray
    is_ood: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=bool))


def calibrate(
    *,
    log_true: np.ndarray,
    log_point: np.ndarray,
    spread: np.ndarray,
    groups: Sequence[str],
    log_input: np.ndarray,
    embeddings: np.ndarray,
    spread_floor: float = 0.05,
    ood_inflation: float = DEFAULT_OOD_INFLATION,
) -> Calibration:
    """Calibration from out-of-bag rows (log1p tokens; `spread` without the floor). Rows with a
    NaN point (no out-of-bag tree) are dropped."""
    keep = np.isfinite(log_point) & np.isfinite(spread)
    if not keep.any():
        raise ValueError("no calibration rows")
    groups_arr = np.asarray(groups, dtype=object)[keep]
    log_true, log_point, spread = log_true[keep], log_point[keep], spread[keep] + spread_floor
    log_input, embeddings = log_input[keep], embeddings[keep]
    residuals = log_true - log_point
    scores = residuals / spread
    scale = embeddings.std(axis=0) + 1e-6
    built = {}
    for name in sorted(set(groups_arr)):
        rows = groups_arr == name
        unit = embeddings[rows] / scale
        centroid = unit.mean(axis=0)
        distances = np.linalg.norm(unit - centroid, axis=1)
        built[name] = GroupCalibration(
            scores=np.sort(scores[rows]),
            log_input_low=float(log_input[rows].min()),
            log_input_high=float(log_input[rows].max()),
            centroid=centroid,
            radius=float(np.quantile(distances, DISTANCE_QUANTILE)) + 1e-6,
            log_residuals=np.sort(residuals[rows]),
        )
    return Calibration(
        groups=built,
        pooled_scores=np.sort(scores),
        embed_scale=scale,
        median_spread=float(np.median(spread)),
        spread_floor=spread_floor,
        ood_inflation=ood_inflation,
        num_rows=int(keep.sum()),
    )


def predict_quantiles(
    calibration: Calibration,
    *,
    log_point: np.ndarray,
    spread: np.ndarray,
    groups: Sequence[str],
    log_input: np.ndarray,
    embeddings: np.ndarray,
    levels: Sequence[float],
) -> QuantilePrediction:
    """Calibrated quantiles (tokens, float, not yet clipped) and OOD flags for n requests."""
    levels = tuple(float(q) for q in levels)
    if any(not 0.0 < q < 1.0 for q in levels):
        raise ValueError(f"quantile levels must be in (0, 1), got {levels}")
    if list(levels) != sorted(set(levels)):
        raise ValueError(f"quantile levels must be strictly increasing, got {levels}")
    table = calibration.lookup(levels)
    index = np.array([table.index.get(name, -1) for name in groups], dtype=np.int64)
    is_seen = index >= 0
    unit = embeddings / calibration.embed_scale
    # (n, groups) distance to every centroid in units of that group's radius
    distance = np.linalg.norm(unit[:, None, :] - table.centroids[None, :, :], axis=2) / table.radii[None, :]
    own = np.where(is_seen, distance[np.arange(len(index)), np.maximum(index, 0)], np.inf)
    safe = np.maximum(index, 0)
    below = (table.log_input_low[safe] - LENGTH_MARGIN_LOG) - log_input
    above = log_input - (table.log_input_high[safe] + LENGTH_MARGIN_LOG)
    length_score = 1.0 + np.maximum(np.maximum(below, above), -1.0)  # > 1 only outside the widened range
    # an unseen instruction is past the edge by construction: 1 + its nearest centroid's distance
    ood_score = np.where(is_seen, np.maximum(own, length_score), 1.0 + distance.min(axis=1, initial=np.inf))
    is_ood = ood_score > 1.0
    score_q = table.scores[safe]
    total_spread = spread + calibration.spread_floor
    if is_ood.any():
        total_spread[is_ood] = np.maximum(total_spread[is_ood], calibration.median_spread)
        widest = table.widest
        score_q[is_ood] = np.where(widest > 0, widest * calibration.ood_inflation, widest)
    log_q = log_point[:, None] + total_spread[:, None] * score_q
    if is_ood.any():
        log_q[is_ood] = np.maximum(log_q[is_ood], log_point[is_ood, None] + table.ood_log_floor[None, :])
    return QuantilePrediction(
        levels=levels,
        quantiles=np.expm1(np.maximum(log_q, 0.0)),
        uncertainty=total_spread,
        ood_score=ood_score,
        is_ood=is_ood,
    )
