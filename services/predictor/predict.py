"""Validating length queries and running the model on them. No I/O, no clock."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

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


def predict_lengths(
    model: LengthModel, queries: Sequence[LengthQuery], counter: TokenCounter, upper_quantile: float = 0.9
) -> tuple[list[int], list[int], list[int]]:
    """(predicted generation lengths, upper estimates, input lengths), tokens, in query order.

    The upper estimate is the model's `upper_quantile` when it can give one (`predict_with_upper`),
    else the prediction itself. CPU-bound.
    """
    input_tokens = fill_input_tokens(queries, counter)
    instructions = [query.instruction for query in queries]
    inputs = [query.user_input for query in queries]
    with_upper = getattr(model, "predict_with_upper", None)
    if with_upper is not None:
        predicted, upper = with_upper(instructions, inputs, input_tokens, quantile=upper_quantile)
    else:
        predicted = upper = model.predict(instructions, inputs, input_tokens)
    return [int(tokens) for tokens in predicted], [int(tokens) for tokens in upper], input_tokens
