"""A second stage on the forest: per instruction, a ridge regression of the forest's error on the
input's words and character n-grams.

Why: within one instruction the forest sees the input through 16 summed embedding dimensions, its
token count and four surface counts, and that is where it stops (translation en->zh: MAE ~4.7 with
any of the forest variants, or a line on input length). The length of a translation or a code edit
is closer to a sum of what each input word costs (a name becomes three or four Chinese characters,
"the" none), which a linear model on the words' counts learns from a few hundred rows of the
instruction; the forest cannot, it has one split per step and shares its trees with every task.

How: for each instruction with at least MIN_ROWS rows, the target is the forest's out-of-bag error
(true tokens - OOB point), the features hashed word counts, alone or with hashed character
2-3-gram counts (Chinese has no spaces: a "word" there is a whole clause), plus the input's token
count. Ridge in its dual form (n <= MAX_ROWS rows, far fewer than
features), so one eigendecomposition per feature kind gives the exact leave-one-out error of every
alpha. The kind and alpha with the lowest leave-one-out MAE are kept only if that MAE is below the
forest's OOB MAE on the same rows by MIN_GAIN_REL; otherwise the instruction keeps the forest
alone. No task is special-cased: an instruction earns its stage by its own held-out rows, and an
unseen instruction, or one with few rows, is answered by the forest.

The leave-one-out corrections are also returned for the fit rows (and the fitted stage's for the
rest), so the conformal calibration scores the corrected points, not the forest's.
Pure numpy/scipy, no I/O.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import sparse
from sklearn.feature_extraction.text import HashingVectorizer

MIN_ROWS = 100  # an instruction with fewer rows keeps the forest alone
MAX_ROWS = 600  # the newest rows of an instruction fit its stage: bounds the O(n^3) eigendecompositions
MIN_GAIN_REL = 0.02  # leave-one-out MAE must beat the forest's OOB MAE by 2 %
ALPHAS = (3.0, 10.0, 30.0, 100.0)
KINDS = ("words", "both")  # characters alone never won on the eight tasks; each kind costs one eigh
INPUT_TOKENS_SCALE = 10.0  # the length feature in tens of tokens: about the scale of a word count
_HASH_FEATURES = 2**18
# Stateless (hashing): nothing to fit, pickles as its parameters.
_WORDS = HashingVectorizer(
    n_features=_HASH_FEATURES, token_pattern=r"\S+", lowercase=False, alternate_sign=False, norm=None
)
_CHARS = HashingVectorizer(
    n_features=_HASH_FEATURES, analyzer="char_wb", ngram_range=(2, 3), alternate_sign=False, norm=None
)


def lexical_features(kind: str, inputs: Sequence[str], input_tokens: Sequence[int]) -> sparse.csr_matrix:
    """(n, features) counts of the `kind` ("words", "chars" or "both") and input tokens / 10."""
    if kind not in (*KINDS, "chars"):
        raise ValueError(f"kind must be one of {KINDS} or 'chars', got {kind!r}")
    texts = list(inputs)
    parts = [sparse.csr_matrix(np.asarray(input_tokens, dtype=np.float64)[:, None] / INPUT_TOKENS_SCALE)]
    parts.append(_WORDS.transform(texts) if kind != "chars" else sparse.csr_matrix((len(texts), _HASH_FEATURES)))
    parts.append(_CHARS.transform(texts) if kind != "words" else sparse.csr_matrix((len(texts), _HASH_FEATURES)))
    return sparse.hstack(parts, format="csr")


@dataclass(frozen=True)
class HashedWeights:
    """Weights of the hashed features some fit row had (`ids` sorted); every other feature's is 0.
    Sparse because the hash space is 2^18 wide and an instruction uses a few thousand of it."""

    ids: np.ndarray
    weights: np.ndarray

    def dot(self, x: sparse.csr_matrix) -> np.ndarray:
        """(n,) x @ weights for hashed counts x (n, 2^18), in O(non-zeros of x)."""
        if not len(self.ids) or not x.nnz:
            return np.zeros(x.shape[0])
        at = np.minimum(np.searchsorted(self.ids, x.indices), len(self.ids) - 1)
        contribution = np.where(self.ids[at] == x.indices, self.weights[at], 0.0) * x.data
        rows = np.repeat(np.arange(x.shape[0]), np.diff(x.indptr))
        return np.bincount(rows, weights=contribution, minlength=x.shape[0])


@dataclass(frozen=True)
class LinearCorrection:
    """One instruction's stage: correction tokens = words . word_weights + chars . char_weights +
    input_tokens / 10 * length_weight + intercept_tokens (a block is empty when `kind` leaves it
    out). `loo_mae_tokens` / `forest_mae_tokens`: the evidence it was kept on (its fit rows)."""

    kind: str
    alpha: float
    word_weights: HashedWeights
    char_weights: HashedWeights
    length_weight: float
    intercept_tokens: float
    loo_mae_tokens: float
    forest_mae_tokens: float

    def predict(self, inputs: Sequence[str], input_tokens: Sequence[int]) -> np.ndarray:
        # Per block, not through lexical_features: no hstack of 2^18-wide matrices on the request path.
        texts = list(inputs)
        out = np.asarray(input_tokens, dtype=np.float64) / INPUT_TOKENS_SCALE * self.length_weight
        if self.kind != "chars":
            out += self.word_weights.dot(_WORDS.transform(texts))
        if self.kind != "words":
            out += self.char_weights.dot(_CHARS.transform(texts))
        return out + self.intercept_tokens


def _loo_ridge(gram: np.ndarray, target: np.ndarray, alpha: float, eigen: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """Leave-one-out predictions of kernel ridge on a centred gram matrix (exact for the dual fit)."""
    values, vectors = eigen
    shrink = values / (values + alpha)
    centred = target - target.mean()
    fitted = vectors @ (shrink * (vectors.T @ centred))
    leverage = (vectors**2) @ shrink + 1.0 / len(target)  # the intercept's share
    return target - (centred - fitted) / np.maximum(1.0 - leverage, 1e-9)


def _centred_gram(x: sparse.csr_matrix) -> np.ndarray:
    gram = (x @ x.T).toarray()
    row_mean = gram.mean(axis=0)
    return gram - row_mean[None, :] - row_mean[:, None] + row_mean.mean()


def fit_correction(
    inputs: Sequence[str], input_tokens: Sequence[int], forest_error_tokens: np.ndarray
) -> tuple[LinearCorrection | None, np.ndarray]:
    """(the best stage, or None when none beats the forest; leave-one-out corrections, tokens,
    zeros when None). `forest_error_tokens` = true - forest OOB point, one per row."""
    error = np.asarray(forest_error_tokens, dtype=np.float64)
    forest_mae = float(np.abs(error).mean())
    best: tuple[float, str, float, np.ndarray] | None = None
    # the gram of "both" is the sum of the words' and the characters' (the length column counted once)
    grams = {kind: _centred_gram(lexical_features(kind, inputs, input_tokens)) for kind in ("words", "chars")}
    length = _centred_gram(lexical_features("chars", [""] * len(error), input_tokens))
    grams["both"] = grams["words"] + grams["chars"] - length
    for kind in KINDS:
        gram = grams[kind]
        eigen = np.linalg.eigh(gram)
        eigen = (np.maximum(eigen[0], 0.0), eigen[1])
        for alpha in ALPHAS:
            loo = _loo_ridge(gram, error, alpha, eigen)
            loo_mae = float(np.abs(error - loo).mean())
            if best is None or loo_mae < best[0]:
                best = (loo_mae, kind, alpha, loo)
    assert best is not None
    loo_mae, kind, alpha, loo = best
    if loo_mae > forest_mae * (1.0 - MIN_GAIN_REL):
        return None, np.zeros(len(error))
    x = lexical_features(kind, inputs, input_tokens)
    dual = np.linalg.solve(grams[kind] + alpha * np.eye(len(error)), error - error.mean())
    column_mean = np.asarray(x.mean(axis=0)).ravel()
    # weights on centred features: w = (X - mean)^T c; kept sparse (zero where no row had a feature)
    dense = np.asarray(x.T @ dual).ravel() - column_mean * dual.sum()
    used = np.flatnonzero(x.getnnz(axis=0))  # column 0 the length, then the words' block, the characters'
    intercept = float(error.mean() - column_mean[used] @ dense[used])

    def block(start: int) -> HashedWeights:
        ids = used[(used >= start) & (used < start + _HASH_FEATURES)]
        return HashedWeights(ids - start, dense[ids])

    correction = LinearCorrection(kind, alpha, block(1), block(1 + _HASH_FEATURES), float(dense[0]), intercept,
                                  loo_mae, forest_mae)
    return correction, loo


def fit_corrections(
    instructions: Sequence[str], inputs: Sequence[str], input_tokens: Sequence[int], forest_error_tokens: np.ndarray
) -> tuple[dict[str, LinearCorrection], np.ndarray]:
    """({instruction: stage} for those that earned one; per row the correction to calibrate with:
    leave-one-out on a stage's fit rows, the fitted stage's on its other rows, 0 elsewhere)."""
    by_app: dict[str, list[int]] = defaultdict(list)
    for i, instruction in enumerate(instructions):
        by_app[instruction].append(i)
    corrections: dict[str, LinearCorrection] = {}
    per_row = np.zeros(len(instructions))
    error = np.asarray(forest_error_tokens, dtype=np.float64)
    for instruction, rows in by_app.items():
        if len(rows) < MIN_ROWS:
            continue
        fit_rows = np.asarray(rows[-MAX_ROWS:])  # the newest: the trainer appends logged rows last
        correction, loo = fit_correction([inputs[i] for i in fit_rows], [input_tokens[i] for i in fit_rows],
                                         error[fit_rows])
        if correction is None:
            continue
        corrections[instruction] = correction
        per_row[fit_rows] = loo
        other = np.asarray(rows[:-MAX_ROWS], dtype=np.int64)
        if len(other):
            per_row[other] = correction.predict([inputs[i] for i in other], [input_tokens[i] for i in other])
    return corrections, per_row


def apply_corrections(
    corrections: dict[str, LinearCorrection],
    point_tokens: np.ndarray,
    instructions: Sequence[str],
    inputs: Sequence[str],
    input_tokens: Sequence[int],
) -> np.ndarray:
    """`point_tokens` plus each row's instruction's correction (unchanged where it has none)."""
    corrected = np.asarray(point_tokens, dtype=np.float64).copy()
    if not corrections:
        return corrected
    by_app: dict[str, list[int]] = defaultdict(list)
    for i, instruction in enumerate(instructions):
        if instruction in corrections:
            by_app[instruction].append(i)
    for instruction, rows in by_app.items():
        corrected[rows] += corrections[instruction].predict([inputs[i] for i in rows], [input_tokens[i] for i in rows])
    return corrected
