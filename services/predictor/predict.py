"""Validating length queries and running the model on them. No I/O, no clock."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from services.predictor.config import PredictorSettings
from services.core.length_model import LengthModel
from services.shared.errors import InvalidArgument
from services.shared.tokenizer import TokenCounter, join_prompt
from services.shared.validation import check_range, check_text


@dataclass(frozen=True, slots=True)
class LengthQuery:
    """One prompt; `input_tokens` == 0 means the predictor counts the whole prompt itself."""

    instruction: str
    user_input: str
    input_tokens: int


def validate_queries(queries: Sequence[LengthQuery], settings: PredictorSettings) -> None:
    """Raise InvalidArgument naming the first bad field (e.g. `queries[3].user_input`)."""
    if not queries:
        raise InvalidArgument("queries", "must hold at least one query")
    if len(queries) > settings.max_batch:
        raise InvalidArgument("queries", f"holds {len(queries)} queries, the limit is {settings.max_batch}")
    for i, query in enumerate(queries):
        check_text(
            f"queries[{i}].instruction",
            query.instruction,
            max_bytes=settings.max_instruction_bytes,
            may_be_empty=True,
        )
        check_text(f"queries[{i}].user_input", query.user_input, max_bytes=settings.max_user_input_bytes)
        check_range(f"queries[{i}].input_tokens", query.input_tokens, low=0, high=settings.max_input_tokens)


def fill_input_tokens(queries: Sequence[LengthQuery], counter: TokenCounter) -> list[int]:
    """Each query's input length, tokens: its own, or the counted prompt when it passed 0."""
    missing = [i for i, query in enumerate(queries) if query.input_tokens == 0]
    counts = [query.input_tokens for query in queries]
    if missing:
        prompts = [join_prompt(queries[i].instruction, queries[i].user_input) for i in missing]
        for i, count in zip(missing, counter.count_many(prompts), strict=True):
            counts[i] = count
    return counts


@dataclass(frozen=True, slots=True)
class LengthPredictions:
    """What PredictLengths answers, per query in order. Tokens except where named; `quantiles`
    maps each level to its tokens and is empty for a model without a calibration, as are
    `uncertainty`, `ood_score` and `is_ood`."""

    predicted_tokens: list[int]
    upper_tokens: list[int]
    input_tokens: list[int]
    quantiles: dict[float, list[int]] = field(default_factory=dict)
    uncertainty: list[float] = field(default_factory=list)
    ood_score: list[float] = field(default_factory=list)
    is_ood: list[bool] = field(default_factory=list)


def predict_lengths(
    model: LengthModel,
    queries: Sequence[LengthQuery],
    counter: TokenCounter,
    upper_quantile: float = 0.9,
    quantile_levels: Sequence[float] = (),
) -> LengthPredictions:
    """Run the model on `queries`. CPU-bound.

    The upper estimate is the model's `upper_quantile` of its trees when it can give one
    (`predict_with_upper`), else the prediction itself. Calibrated quantiles at `quantile_levels`
    come from `predict_quantiles` where the model has one and a calibration (an artifact older
    than calibration degrades to the point and upper estimate alone).
    """
    input_tokens = fill_input_tokens(queries, counter)
    instructions = [query.instruction for query in queries]
    inputs = [query.user_input for query in queries]
    with_quantiles = getattr(model, "predict_quantiles", None)
    with_upper = getattr(model, "predict_with_upper", None)
    calibrated = None
    if quantile_levels and with_quantiles is not None:
        predicted, upper, calibrated = with_quantiles(
            instructions, inputs, input_tokens, levels=quantile_levels, tree_quantile=upper_quantile
        )
    elif with_upper is not None:
        predicted, upper = with_upper(instructions, inputs, input_tokens, quantile=upper_quantile)
    else:
        predicted = upper = model.predict(instructions, inputs, input_tokens)
    result = LengthPredictions([int(t) for t in predicted], [int(t) for t in upper], input_tokens)
    if calibrated is None:
        return result
    result.quantiles.update(
        {level: [int(t) for t in calibrated.quantiles[:, j]] for j, level in enumerate(calibrated.levels)}
    )
    result.uncertainty.extend(float(u) for u in calibrated.uncertainty)
    result.ood_score.extend(float(s) for s in calibrated.ood_score)
    result.is_ood.extend(bool(f) for f in calibrated.is_ood)
    return result
