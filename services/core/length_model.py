"""The length-model interface, the training sample type, and the registry of model families.

A model family is chosen by name (`make_length_model("per_app_linear")`): the baselines
(`per_task_mean`, `per_app_linear`) and the paper's embedding + random-forest model with its
variants (`embedding_forest.CONFIGS`) sit side by side without the server or the trainer knowing. Every model keeps its training samples (`samples`): the trainer retrains
on old + new samples, and the artifact is the only place the old ones live.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np


@dataclass(frozen=True, slots=True)
class LengthSample:
    """One prompt and the length it really generated.

    `input_tokens` counts the whole prompt (instruction + "\\n" + input), tokens;
    `generated_tokens` is the true generation length, tokens (>= 0).
    """

    instruction: str
    input_text: str
    input_tokens: int
    generated_tokens: int


@runtime_checkable
class LengthModel(Protocol):
    """Predicts generation lengths, in tokens, from (instruction, user input, input length)."""

    name: str
    samples: list[LengthSample]

    def fit(self, samples: Sequence[LengthSample]) -> None:
        """Fit on `samples` (replacing any previous fit) and keep them in `samples`."""
        ...

    def predict(
        self, instructions: Sequence[str], inputs: Sequence[str], input_tokens: Sequence[int]
    ) -> np.ndarray:
        """Predicted generation lengths, one int64 per query, tokens, each in [1, max]."""
        ...


_REGISTRY: dict[str, Callable[..., LengthModel]] = {}


def check_same_length(instructions: Sequence[str], inputs: Sequence[str], input_tokens: Sequence[int]) -> None:
    """Raise ValueError unless a predict call's three columns are equally long (one row each)."""
    if not len(instructions) == len(inputs) == len(input_tokens):
        raise ValueError("instructions, inputs and input_tokens must have the same length")


def register_length_model(name: str) -> Callable[[Callable[..., LengthModel]], Callable[..., LengthModel]]:
    """Class decorator adding a model family to the registry under `name`."""

    def decorate(factory: Callable[..., LengthModel]) -> Callable[..., LengthModel]:
        if name in _REGISTRY:
            raise ValueError(f"length model {name!r} is already registered")
        _REGISTRY[name] = factory
        return factory

    return decorate


def length_model_names() -> list[str]:
    _load_builtin_models()
    return sorted(_REGISTRY)


def make_length_model(name: str, **params: Any) -> LengthModel:
    """A new, unfitted model of family `name` with constructor `params`."""
    _load_builtin_models()
    if name not in _REGISTRY:
        raise ValueError(f"unknown length model {name!r}; known: {sorted(_REGISTRY)}")
    return _REGISTRY[name](**params)


def _load_builtin_models() -> None:
    # Imported here, not at module top, because the model modules import this one to register.
    from services.core import embedding_forest, per_app_linear, per_task_mean  # noqa: F401
