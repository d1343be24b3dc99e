"""The linear batch-time model dispatch-time packing scores its candidate windows with."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LinearBatchCost:
    """T(B) = prefill per padded prompt token + G(B) x (base + per row + per KV token read) step, seconds.

    Defaults: the static engine on an H200 with a Llama-2-7B shape (simulate.cost_model's
    `h200-static-engine` fit of reports/gpu/engine.json). Only ratios matter much for the choice.
    """

    prefill_s_per_token: float = 27.9e-6
    step_base_s: float = 4.61e-3
    step_s_per_row: float = 19.2e-6
    step_s_per_kv_token: float = 111e-9

    def batch_s(self, size, input_tokens_max, gen_tokens_max):
        """Works on numbers and numpy arrays alike; mean KV read per step over the G steps."""
        kv_tokens_per_step = size * (input_tokens_max + gen_tokens_max / 2)
        step_s = self.step_base_s + self.step_s_per_row * size + self.step_s_per_kv_token * kv_tokens_per_step
        return self.prefill_s_per_token * size * input_tokens_max + gen_tokens_max * step_s
