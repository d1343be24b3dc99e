"""`per_app_linear`: per instruction, generated_tokens ~ a + b * input_tokens by least squares.

Most Magnus applications (translation, correction, code translation) produce output whose length
follows the input's, with a slope and offset of their own; one line per instruction captures most
of that. Instructions never seen in training use a line fitted on all samples pooled.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from services.core.length_model import LengthSample, check_same_length, register_length_model

DEFAULT_MAX_TOKENS = 8192


@dataclass(frozen=True, slots=True)
class Line:
    """generated_tokens = intercept_tokens + slope * input_tokens."""

    intercept_tokens: float
    slope: float

    def at(self, input_tokens: np.ndarray) -> np.ndarray:
        return self.intercept_tokens + self.slope * input_tokens


def fit_line(input_tokens: np.ndarray, generated_tokens: np.ndarray) -> Line:
    """Least-squares line; a flat line at the mean when the inputs do not vary (or n < 2)."""
    if len(input_tokens) == 0:
        return Line(1.0, 0.0)
    x = input_tokens.astype(np.float64)
    y = generated_tokens.astype(np.float64)
    x_mean, y_mean = x.mean(), y.mean()
    variance = float(((x - x_mean) ** 2).sum())
    if variance <= 0.0:
        return Line(float(y_mean), 0.0)
    slope = float(((x - x_mean) * (y - y_mean)).sum() / variance)
    return Line(float(y_mean - slope * x_mean), slope)


@register_length_model("per_app_linear")
class PerAppLinearModel:
    """One least-squares line per instruction plus a pooled line for unseen instructions.

    `max_tokens` caps every prediction (tokens); `min_samples_per_app` is how many samples an
    instruction needs for a line of its own, below that it uses the pooled line.
    """

    name = "per_app_linear"

    def __init__(self, max_tokens: int = DEFAULT_MAX_TOKENS, min_samples_per_app: int = 3) -> None:
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
        if min_samples_per_app < 1:
            raise ValueError(f"min_samples_per_app must be >= 1, got {min_samples_per_app}")
        self.max_tokens = max_tokens
        self.min_samples_per_app = min_samples_per_app
        self.samples: list[LengthSample] = []
        self.lines: dict[str, Line] = {}
        self.pooled = Line(1.0, 0.0)

    def fit(self, samples: Sequence[LengthSample]) -> None:
        if not samples:
            raise ValueError("per_app_linear needs at least one sample to fit")
        by_app: dict[str, list[LengthSample]] = defaultdict(list)
        for sample in samples:
            by_app[sample.instruction].append(sample)
        self.pooled = fit_line(*_arrays(samples))
        self.lines = {
            instruction: fit_line(*_arrays(app_samples))
            for instruction, app_samples in by_app.items()
            if len(app_samples) >= self.min_samples_per_app
        }
        self.samples = list(samples)

    def predict(
        self, instructions: Sequence[str], inputs: Sequence[str], input_tokens: Sequence[int]
    ) -> np.ndarray:
        check_same_length(instructions, inputs, input_tokens)
        x = np.asarray(input_tokens, dtype=np.float64)
        raw = np.empty(len(x), dtype=np.float64)
        for i, instruction in enumerate(instructions):
            raw[i] = self.lines.get(instruction, self.pooled).at(x[i])
        return np.clip(np.rint(raw), 1, self.max_tokens).astype(np.int64)


def _arrays(samples: Sequence[LengthSample]) -> tuple[np.ndarray, np.ndarray]:
    x = np.fromiter((s.input_tokens for s in samples), dtype=np.float64, count=len(samples))
    y = np.fromiter((s.generated_tokens for s in samples), dtype=np.float64, count=len(samples))
    return x, y
