"""`per_task_mean`: the baseline that ignores the input: each instruction's mean generated length.

Instructions never seen in training get the mean over all samples.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import numpy as np

from services.core.length_model import LengthSample, check_same_length, register_length_model

DEFAULT_MAX_TOKENS = 8192


@register_length_model("per_task_mean")
class PerTaskMeanModel:
    """Mean generated tokens per instruction; `max_tokens` caps predictions (tokens)."""

    name = "per_task_mean"

    def __init__(self, max_tokens: int = DEFAULT_MAX_TOKENS) -> None:
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
        self.max_tokens = max_tokens
        self.samples: list[LengthSample] = []
        self.means: dict[str, float] = {}
        self.pooled_mean = 1.0

    def fit(self, samples: Sequence[LengthSample]) -> None:
        if not samples:
            raise ValueError("per_task_mean needs at least one sample to fit")
        by_app: dict[str, list[int]] = defaultdict(list)
        for sample in samples:
            by_app[sample.instruction].append(sample.generated_tokens)
        self.means = {app: float(np.mean(lengths)) for app, lengths in by_app.items()}
        self.pooled_mean = float(np.mean([s.generated_tokens for s in samples]))
        self.samples = list(samples)

    def predict(
        self, instructions: Sequence[str], inputs: Sequence[str], input_tokens: Sequence[int]
    ) -> np.ndarray:
        check_same_length(instructions, inputs, input_tokens)
        raw = np.array([self.means.get(i, self.pooled_mean) for i in instructions], dtype=np.float64)
        return np.clip(np.rint(raw), 1, self.max_tokens).astype(np.int64)
