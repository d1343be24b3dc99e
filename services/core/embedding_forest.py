"""The paper's predictor and its variants: compressed sentence embeddings + input length -> trees.

Features per request (see `ForestConfig`): the user input's sentence vector in `user_groups`
group sums, the instruction's in `app_groups` (cached per distinct instruction), the prompt's
token count, and optionally cheap surface counts of the user input. The regressor is a random
forest (the paper) or gradient boosting; the target is the token count (the paper) or
log((generated + 1) / (input + 1)), which lets trees predict lengths beyond those seen in
training (a ratio extrapolates, a leaf mean cannot) and makes their mean closer to the median
of a skewed task like code comments. An optional exact-match table answers repeated prompts
with their observed length (greedy decoding makes a repeat generate the same output). An optional
second stage (`use_lexical_stage`, see `services.core.lexical_stage`) adds to the forest's point,
per instruction that has earned one on its own out-of-bag rows, a ridge regression of the forest's
error on the input's word (and character n-gram) counts; the served family has it.

Each named configuration is registered as a model family (`make_length_model(name)`), so the
trainer refits the family it found serving with the same settings.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields, replace
from typing import Any

import numpy as np
from sklearn.ensemble import HistGradientBoostingRegressor, RandomForestRegressor

from services.core.conformal import (
    DEFAULT_LEVELS,
    Calibration,
    QuantilePrediction,
    calibrate,
    predict_quantiles,
    tree_log_stats,
)
from services.core.encoders import SentenceEncoder, TextEncoder, build_static_encoder
from services.core.length_model import LengthSample, check_same_length, register_length_model
from services.core.lexical_stage import LinearCorrection, apply_corrections, fit_corrections
from services.core.packed_forest import AGGREGATES, PackedForest
from services.core.text_features import surface_features

DEFAULT_MAX_TOKENS = 8192
MAX_CACHED_INSTRUCTIONS = 4096
MAX_CALIBRATION_ROWS_PER_APP = 2500  # out-of-bag rows calibrating one instruction's quantiles


@dataclass(frozen=True, slots=True)
class ForestConfig:
    """One model configuration. Lengths in tokens; `max_prefix_pieces` in encoder word pieces."""

    encoder: str = "static"  # "static" (distilled table) or "sentence" (the transformer itself)
    user_groups: int = 16
    app_groups: int = 4
    use_surface_features: bool = False
    target: str = "tokens"  # "tokens" or "log_ratio"
    regressor: str = "rf"  # "rf", "rf_leaf5" or "hgb_l1"
    num_trees: int = 100
    max_depth: int | None = None  # forest depth cap (bounds the packed forest's steps)
    aggregate: str = "mean"  # forests: "mean" of trees (the paper) or "median"
    use_exact_cache: bool = False
    max_prefix_pieces: int = 256
    max_tokens: int = DEFAULT_MAX_TOKENS
    seed: int = 0
    # Last: a slots dataclass pickles its fields as a list by position, so a field added anywhere
    # else would shift the values of every artifact stored before it (see __setstate__).
    use_lexical_stage: bool = False  # per-instruction ridge on the forest's error (services.core.lexical_stage)

    def __setstate__(self, state: list[Any]) -> None:
        # An artifact stored before the trailing fields were added holds fewer values: those take
        # their defaults.
        names = fields(self)
        values = [*state, *(f.default for f in names[len(state):])]
        for f, value in zip(names, values, strict=True):
            object.__setattr__(self, f.name, value)

    def __post_init__(self) -> None:
        if self.encoder not in ("static", "sentence"):
            raise ValueError(f"encoder must be 'static' or 'sentence', got {self.encoder!r}")
        if self.target not in ("tokens", "log_ratio"):
            raise ValueError(f"target must be 'tokens' or 'log_ratio', got {self.target!r}")
        if self.regressor not in ("rf", "rf_leaf5", "hgb_l1"):
            raise ValueError(f"unknown regressor {self.regressor!r}")
        if self.aggregate not in AGGREGATES or (self.aggregate == "median" and self.regressor == "hgb_l1"):
            raise ValueError(f"aggregate {self.aggregate!r} does not apply to regressor {self.regressor!r}")
        if min(self.user_groups, self.app_groups, self.num_trees, self.max_tokens, self.max_prefix_pieces) < 1:
            raise ValueError("groups, trees, max_tokens and max_prefix_pieces must all be >= 1")


def make_regressor(config: ForestConfig) -> Any:
    if config.regressor == "hgb_l1":
        return HistGradientBoostingRegressor(
            loss="absolute_error", max_iter=3 * config.num_trees, random_state=config.seed
        )
    leaf = {"rf": {}, "rf_leaf5": {"min_samples_leaf": 5, "max_features": 0.5}}[config.regressor]
    return RandomForestRegressor(
        n_estimators=config.num_trees, max_depth=config.max_depth, n_jobs=-1, random_state=config.seed, **leaf
    )


def fit_predictor(config: ForestConfig, x: np.ndarray, target: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
    """Fit the configured regressor; return its predict function (forests packed, see PackedForest)."""
    return fit_predictor_with_bags(config, x, target)[0]


def fit_predictor_with_bags(
    config: ForestConfig, x: np.ndarray, target: np.ndarray
) -> tuple[Callable[[np.ndarray], np.ndarray], np.ndarray | None]:
    """`fit_predictor` and, for a bootstrapped forest, its (num_trees, n) in-bag mask (None otherwise)."""
    regressor = make_regressor(config).fit(x, target)
    if isinstance(regressor, RandomForestRegressor):
        in_bag = np.zeros((len(regressor.estimators_), len(x)), dtype=bool)
        for t, rows in enumerate(regressor.estimators_samples_):
            in_bag[t, rows] = True
        return _ForestPredict(PackedForest.from_sklearn(regressor), config.aggregate), in_bag
    return regressor.predict, None


@dataclass(frozen=True)
class _ForestPredict:
    # A picklable callable; the scikit-learn forest itself is dropped (it is 5x larger).
    forest: PackedForest
    aggregate: str

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.forest.predict(x, self.aggregate)


def calibration_rows(instructions: Sequence[str], seed: int) -> np.ndarray:
    """Indices of the rows that calibrate: all of an instruction's up to MAX_CALIBRATION_ROWS_PER_APP,
    a seeded sample beyond, so the (trees x rows) predictions stay bounded when the trainer's set grows
    (200,000 samples x 100 trees would be ~160 MB a copy) and every instruction keeps its group."""
    by_app: dict[str, list[int]] = defaultdict(list)
    for i, instruction in enumerate(instructions):
        by_app[instruction].append(i)
    rng = np.random.default_rng(seed)
    kept = [
        np.asarray(rows) if len(rows) <= MAX_CALIBRATION_ROWS_PER_APP
        else rng.choice(rows, MAX_CALIBRATION_ROWS_PER_APP, replace=False)
        for rows in by_app.values()
    ]
    return np.sort(np.concatenate(kept)) if kept else np.zeros(0, dtype=np.int64)


def prompt_key(instruction: str, user_input: str) -> bytes:
    """A 16-byte digest of the exact prompt, the exact-match table's key."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(instruction.encode("utf-8", "surrogatepass"))
    digest.update(b"\x00")
    digest.update(user_input.encode("utf-8", "surrogatepass"))
    return digest.digest()


class EmbeddingForestModel:
    """A `LengthModel`: see the module docstring. Picklable (the encoder pickles its weights or path)."""

    def __init__(self, name: str = "embedding_forest", config: ForestConfig | None = None, **overrides: Any) -> None:
        self.name = name
        self.config = replace(config or ForestConfig(), **overrides)
        self.samples: list[LengthSample] = []
        self.encoder: TextEncoder | None = None
        self.regressor: Any = None
        self.app_vectors: dict[str, np.ndarray] = {}
        self.exact_lengths: dict[bytes, int] = {}
        self.calibration: Calibration | None = None
        self.corrections: dict[str, LinearCorrection] = {}

    def _make_encoder(self) -> TextEncoder:
        if self.config.encoder == "sentence":
            return SentenceEncoder()
        return build_static_encoder(
            [self.config.user_groups, self.config.app_groups], max_prefix_pieces=self.config.max_prefix_pieces
        )

    def _app_features(self, instructions: Sequence[str]) -> np.ndarray:
        assert self.encoder is not None
        missing = sorted(set(instructions) - self.app_vectors.keys())
        if missing:
            vectors = self.encoder.encode_grouped(missing, self.config.app_groups)
            if len(self.app_vectors) + len(missing) > MAX_CACHED_INSTRUCTIONS:
                self.app_vectors = {}  # many distinct instructions: a cache this big no longer pays
            # One dict replacement, not item by item: concurrent readers see the old or new map.
            self.app_vectors = {**self.app_vectors, **dict(zip(missing, vectors, strict=True))}
        table = self.app_vectors
        known = [table.get(i) for i in instructions]
        if any(v is None for v in known):  # evicted meanwhile by another call
            return self.encoder.encode_grouped(list(instructions), self.config.app_groups)
        return np.stack(known) if known else np.zeros((0, self.config.app_groups), np.float32)

    def features(self, instructions: Sequence[str], inputs: Sequence[str], input_tokens: Sequence[int]) -> np.ndarray:
        """(n, user_groups + app_groups + 1 [+ 4]) float32 feature rows."""
        assert self.encoder is not None
        parts = [
            self.encoder.encode_grouped(list(inputs), self.config.user_groups),
            self._app_features(instructions),
            np.asarray(input_tokens, dtype=np.float32)[:, None],
        ]
        if self.config.use_surface_features:
            parts.append(surface_features(inputs))
        return np.hstack(parts)

    def fit(self, samples: Sequence[LengthSample]) -> None:
        if not samples:
            raise ValueError(f"{self.name} needs at least one sample to fit")
        if self.encoder is None:
            self.encoder = self._make_encoder()
        self.corrections = {}
        x = self.features(
            [s.instruction for s in samples], [s.input_text for s in samples], [s.input_tokens for s in samples]
        )
        generated = np.array([s.generated_tokens for s in samples], dtype=np.float64)
        input_tokens = np.array([s.input_tokens for s in samples], dtype=np.float64)
        target = generated if self.config.target == "tokens" else np.log1p(generated) - np.log1p(input_tokens)
        self.regressor, in_bag = fit_predictor_with_bags(self.config, x, target)
        self.calibration = self._calibrate(samples, x, generated, in_bag)
        self.exact_lengths = self._exact_table(samples) if self.config.use_exact_cache else {}
        self.samples = list(samples)

    def _calibrate(
        self, samples: Sequence[LengthSample], x: np.ndarray, generated: np.ndarray, in_bag: np.ndarray | None
    ) -> Calibration | None:
        # Out-of-bag rows calibrate the quantiles (see services.core.conformal); no bags, no quantiles.
        if in_bag is None or (~in_bag).any(axis=0).sum() < 2:
            return None
        rows = calibration_rows([s.instruction for s in samples], self.config.seed)
        samples = [samples[i] for i in rows]
        input_tokens = [s.input_tokens for s in samples]
        per_tree = self.regressor.forest.tree_predictions(x[rows])
        log_point, spread = tree_log_stats(self._tree_log_tokens(per_tree, input_tokens), ~in_bag[:, rows])
        if self.config.use_lexical_stage:
            log_point = self._fit_stage(samples, generated[rows], log_point)
        return calibrate(
            log_true=np.log1p(generated[rows]),
            log_point=log_point,
            spread=spread,
            groups=[s.instruction for s in samples],
            log_input=np.log1p(np.asarray(input_tokens, dtype=np.float64)),
            embeddings=x[rows, : self.config.user_groups],
        )

    def _fit_stage(self, samples: Sequence[LengthSample], generated: np.ndarray, log_point: np.ndarray) -> np.ndarray:
        """Fit `corrections` on the forest's out-of-bag errors; return the calibration rows' log1p
        points with them (leave-one-out, so the conformal scores stay out-of-sample)."""
        has_oob = np.flatnonzero(np.isfinite(log_point))
        oob_tokens = np.expm1(log_point[has_oob])
        self.corrections, correction = fit_corrections(
            [samples[i].instruction for i in has_oob], [samples[i].input_text for i in has_oob],
            [samples[i].input_tokens for i in has_oob], generated[has_oob] - oob_tokens,
        )
        corrected = log_point.copy()
        corrected[has_oob] = np.log1p(np.maximum(oob_tokens + correction, 0.0))
        return corrected

    def _corrected(
        self, point: np.ndarray, upper: np.ndarray, instructions: Sequence[str], inputs: Sequence[str],
        input_tokens: Sequence[int],
    ) -> tuple[np.ndarray, np.ndarray]:
        """Point and upper moved by each row's instruction stage (the same tokens for both)."""
        corrections = getattr(self, "corrections", None)  # artifacts pickled before the stage have none
        if not corrections:
            return point, upper
        corrected = apply_corrections(corrections, point, instructions, inputs, input_tokens)
        return corrected, upper + (corrected - point)

    def _tree_log_tokens(self, per_tree: np.ndarray, input_tokens: Sequence[int]) -> np.ndarray:
        """(num_trees, n) every tree's raw prediction as log1p tokens."""
        if self.config.target == "log_ratio":
            return per_tree + np.log1p(np.asarray(input_tokens, dtype=np.float64))[None, :]
        return np.log1p(np.maximum(per_tree, 0.0))

    def predict_quantiles(
        self,
        instructions: Sequence[str],
        inputs: Sequence[str],
        input_tokens: Sequence[int],
        levels: Sequence[float] = DEFAULT_LEVELS,
        tree_quantile: float = 0.9,
    ) -> tuple[np.ndarray, np.ndarray, QuantilePrediction | None]:
        """(points, upper estimates, calibrated quantiles): the first two as `predict_with_upper`
        gives them at `tree_quantile`, from one pass over the trees; the quantiles None when this
        model has no calibration (an artifact older than it, a boosting regressor). Quantile
        tokens are ints in [1, max_tokens], non-decreasing in the level; a level >= 0.5 is never
        below the point."""
        calibration = getattr(self, "calibration", None)  # artifacts pickled before it have none
        if calibration is None or not len(inputs):
            return *self.predict_with_upper(instructions, inputs, input_tokens, quantile=tree_quantile), None
        check_same_length(instructions, inputs, input_tokens)
        x = self.features(instructions, inputs, input_tokens)
        per_tree = self.regressor.forest.tree_predictions(x)  # once: the point, the upper and the spread
        aggregate = np.median if self.regressor.aggregate == "median" else np.mean
        point = self._to_tokens(aggregate(per_tree, axis=0), input_tokens)
        upper = self._to_tokens(np.quantile(per_tree, tree_quantile, axis=0), input_tokens)
        point, upper = self._corrected(point, upper, instructions, inputs, input_tokens)
        spread = tree_log_stats(self._tree_log_tokens(per_tree, input_tokens))[1]
        result = predict_quantiles(
            calibration,
            log_point=np.log1p(np.maximum(point, 0.0)),
            spread=spread,
            groups=list(instructions),
            log_input=np.log1p(np.asarray(input_tokens, dtype=np.float64)),
            embeddings=x[:, : self.config.user_groups],
            levels=levels,
        )
        point, upper = self._final_tokens(point, upper, instructions, inputs)
        # floor: for integer lengths y <= q iff y <= floor(q); rounding up would over-cover short tasks
        quantiles = np.clip(np.floor(result.quantiles), 1, self.config.max_tokens).astype(np.int64)
        quantiles = np.maximum.accumulate(quantiles, axis=1)
        is_upper = np.asarray(result.levels) >= 0.5
        quantiles[:, is_upper] = np.maximum(quantiles[:, is_upper], point[:, None])
        return point, upper, replace(result, quantiles=quantiles)

    @staticmethod
    def _exact_table(samples: Sequence[LengthSample]) -> dict[bytes, int]:
        # The median, so a prompt logged with different lengths (different reference outputs)
        # is answered by its typical one.
        seen: dict[bytes, list[int]] = defaultdict(list)
        for s in samples:
            seen[prompt_key(s.instruction, s.input_text)].append(s.generated_tokens)
        return {key: int(round(float(np.median(lengths)))) for key, lengths in seen.items()}

    def predict(
        self, instructions: Sequence[str], inputs: Sequence[str], input_tokens: Sequence[int]
    ) -> np.ndarray:
        return self.predict_with_upper(instructions, inputs, input_tokens, quantile=None)[0]

    def predict_with_upper(
        self,
        instructions: Sequence[str],
        inputs: Sequence[str],
        input_tokens: Sequence[int],
        quantile: float | None = 0.9,
    ) -> tuple[np.ndarray, np.ndarray]:
        """(point predictions, upper estimates), tokens. The upper one is the forest's trees'
        `quantile` where the regressor is a forest (a wide spread marks a request that may run
        long), never below the point; the point itself otherwise, and for exact-match prompts."""
        check_same_length(instructions, inputs, input_tokens)
        if self.regressor is None:
            raise ValueError(f"{self.name} is not fitted")
        if not len(inputs):
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
        x = self.features(instructions, inputs, input_tokens)
        point = self._to_tokens(self.regressor(x), input_tokens)
        has_spread = quantile is not None and isinstance(self.regressor, _ForestPredict)
        upper = self._to_tokens(self.regressor.forest.quantile(x, quantile), input_tokens) if has_spread else point.copy()
        point, upper = self._corrected(point, upper, instructions, inputs, input_tokens)
        return self._final_tokens(point, upper, instructions, inputs)

    def _final_tokens(
        self, point: np.ndarray, upper: np.ndarray, instructions: Sequence[str], inputs: Sequence[str]
    ) -> tuple[np.ndarray, np.ndarray]:
        """Exact-match prompts answered by their logged length, then whole tokens in [1, max_tokens],
        the upper never below the point."""
        if self.exact_lengths:
            for i, (instruction, user_input) in enumerate(zip(instructions, inputs, strict=True)):
                observed = self.exact_lengths.get(prompt_key(instruction, user_input))
                if observed is not None:
                    point[i] = upper[i] = observed
        point = np.clip(np.rint(point), 1, self.config.max_tokens).astype(np.int64)
        upper = np.clip(np.rint(upper), 1, self.config.max_tokens).astype(np.int64)
        return point, np.maximum(upper, point)

    def _to_tokens(self, raw: np.ndarray, input_tokens: Sequence[int]) -> np.ndarray:
        if self.config.target == "log_ratio":
            return np.expm1(raw + np.log1p(np.asarray(input_tokens, dtype=np.float64)))
        return np.asarray(raw, dtype=np.float64)


# The named configurations. Each step adds one change to the one above it, so the report shows
# what each buys; `SERVED_MODEL` is what the bootstrap trains and the trainer keeps refitting.
_TUNED = ForestConfig(target="log_ratio", use_surface_features=True, regressor="rf_leaf5")
CONFIGS: dict[str, ForestConfig] = {
    "paper_minilm": ForestConfig(encoder="sentence"),
    "paper_static": ForestConfig(),
    "static_log_ratio": ForestConfig(target="log_ratio"),
    "static_log_ratio_surface": ForestConfig(target="log_ratio", use_surface_features=True),
    "static_log_ratio_surface_leaf5": _TUNED,
    "static_log_ratio_surface_hgb": replace(_TUNED, regressor="hgb_l1"),
    "static_log_ratio_surface_leaf5_g32": replace(_TUNED, user_groups=32),
    "static_log_ratio_surface_leaf5_median": replace(_TUNED, max_depth=16, aggregate="median"),
    "magnus_static": replace(_TUNED, max_depth=16, aggregate="median", use_exact_cache=True),
    "magnus_static_lexical": replace(_TUNED, max_depth=16, aggregate="median", use_exact_cache=True,
                                     use_lexical_stage=True),
    "magnus_minilm": replace(_TUNED, encoder="sentence", max_depth=16, aggregate="median", use_exact_cache=True),
}
SERVED_MODEL = "magnus_static_lexical"


def _register(name: str, config: ForestConfig) -> None:
    @register_length_model(name)
    def factory(**overrides: Any) -> EmbeddingForestModel:
        return EmbeddingForestModel(name, config, **overrides)


for _name, _config in CONFIGS.items():
    _register(_name, _config)
