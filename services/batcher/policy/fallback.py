"""The batch-time guess HRRN uses until the estimator has answered for a batch."""

from __future__ import annotations

# A rough CPU/GPU-agnostic guess so the response ratio is defined: fixed seconds per batch, per
# prompt token of the padded batch and per generated token step.
FALLBACK_BASE_S = 0.01
FALLBACK_STEP_S = 0.02
FALLBACK_PREFILL_S_PER_TOKEN = 1e-4


def fallback_estimate_s(size, input_tokens_max, gen_tokens_max):
    """A rough batch time, seconds; works on ints and on numpy arrays alike."""
    return FALLBACK_BASE_S + size * input_tokens_max * FALLBACK_PREFILL_S_PER_TOKEN + gen_tokens_max * FALLBACK_STEP_S
