"""Batch run time of a static batch, fitted to measured worker timings.

A static batch of n requests with longest prompt L runs one prefill over n x L padded tokens, then
G decode steps, where G is the longest *true* generation in the batch (every row is stepped until
the last one stops). Step t reads the weights once and the KV of n (L + t) tokens, so

    prefill_s(n, L) = p0 + p1 n L
    step_s(n, L, t) = a + b n + c n (L + t)
    batch_s         = prefill_s + G (a + b n + c n L) + c n G (G + 1) / 2

Profiles are least-squares fits of (p0, p1) and (a, b, c) to the timings in
`../shared/reference/gpu_baseline.md` (H200, Llama-2-7B shape, fp16, KV 512 KiB/token). The points
are copied below with their source so a fit can be checked against the table.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

LLAMA2_7B_KV_BYTES_PER_TOKEN = 2 * 32 * 4096 * 2  # K and V, 32 layers, hidden 4096, fp16 = 512 KiB
LLAMA2_7B_WEIGHT_BYTES = 13_480_000_000  # gpu_baseline.md: random fp16 weights, 13.48 GB

# gpu_baseline.md, "static KV cache, one decode step captured in a CUDA graph": (n, L, step s).
# The cache held prompt + 40 tokens; the step reads on average about L + 20 tokens per row.
H200_GRAPH_STEPS = ((1, 512, 7.0e-3), (32, 512, 10.2e-3), (128, 512, 16.9e-3), (64, 1024, 15.8e-3))
# gpu_baseline.md, plain HF generate, L = 512, G = 128 (mean step over 128 steps: t ~ 64).
H200_HF_GENERATE_STEPS = (
    (1, 512, 70.7e-3), (8, 512, 70.8e-3), (32, 512, 65.3e-3), (64, 512, 81.6e-3), (128, 512, 93.5e-3),
)
# gpu_baseline.md, prefill (plain HF forward): (n, L, seconds).
H200_PREFILL = ((32, 512, 0.52), (128, 512, 1.98))
GRAPH_MEAN_STEP_OFFSET_TOKENS = 20
HF_MEAN_STEP_OFFSET_TOKENS = 64


@dataclass(frozen=True)
class CostModel:
    """Seconds for a static batch; see the module docstring for the formula. All fields >= 0."""

    name: str
    description: str
    prefill_base_s: float  # p0
    prefill_s_per_token: float  # p1, per padded prompt token
    step_base_s: float  # a
    step_s_per_row: float  # b
    step_s_per_kv_token: float  # c, per KV token read

    def prefill_s(self, size: int, input_tokens_max: int) -> float:
        return self.prefill_base_s + self.prefill_s_per_token * size * input_tokens_max

    def decode_s(self, size: int, input_tokens_max: int, steps: int) -> float:
        """Seconds for `steps` decode steps of a batch of `size` rows with prompt length L."""
        per_step_s = self.step_base_s + self.step_s_per_row * size + self.step_s_per_kv_token * size * input_tokens_max
        return steps * per_step_s + self.step_s_per_kv_token * size * steps * (steps + 1) / 2

    def batch_s(self, size: int, input_tokens_max: int, gen_tokens_max: int) -> float:
        """Prefill plus `gen_tokens_max` decode steps, seconds."""
        return self.prefill_s(size, input_tokens_max) + self.decode_s(size, input_tokens_max, gen_tokens_max)


def _fit_nonnegative(features: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Least squares; a negative coefficient is dropped (set to 0) and the rest refitted."""
    active = np.ones(features.shape[1], dtype=bool)
    while True:
        coef = np.zeros(features.shape[1])
        coef[active] = np.linalg.lstsq(features[:, active], target, rcond=None)[0]
        if (coef >= 0).all():
            return coef
        active &= coef > 0


def fit_cost_model(name: str, description: str, steps, offset_tokens: int, prefill=H200_PREFILL) -> CostModel:
    """Fit (a, b, c) to (n, L, step s) points and (p0, p1) to (n, L, prefill s) points."""
    step_points = np.array(steps, dtype=np.float64)
    n, length = step_points[:, 0], step_points[:, 1]
    step_features = np.column_stack([np.ones_like(n), n, n * (length + offset_tokens)])
    a, b, c = _fit_nonnegative(step_features, step_points[:, 2])
    prefill_points = np.array(prefill, dtype=np.float64)
    prefill_features = np.column_stack([np.ones(len(prefill_points)), prefill_points[:, 0] * prefill_points[:, 1]])
    p0, p1 = _fit_nonnegative(prefill_features, prefill_points[:, 2])
    return CostModel(name, description, float(p0), float(p1), float(a), float(b), float(c))


def fit_residuals(model: CostModel, steps, offset_tokens: int) -> list[tuple[int, int, float, float]]:
    """(n, L, measured step s, fitted step s) for each point: how well the profile fits."""
    out = []
    for n, length, measured_s in steps:
        fitted_s = model.step_base_s + model.step_s_per_row * n + model.step_s_per_kv_token * n * (length + offset_tokens)
        out.append((int(n), int(length), float(measured_s), float(fitted_s)))
    return out


# bench/gpu_engine.py on an H200, 2026-11-22 (reports/gpu/engine.md)
MEASURED_ENGINE_JSON = str(Path(__file__).resolve().parents[3] / "reports" / "gpu" / "engine.json")


def measured_engine_points(path: str = MEASURED_ENGINE_JSON, engine: str = "static_graph_sdpa_compiled"):
    """(n, L, decode step s) and (n, L, prefill s) rows of one engine from the GPU engine benchmark.

    Its decode steps are means over 64 new tokens, so a step reads about L + 32 tokens per row.
    """
    import json

    rows = [r for r in json.loads(Path(path).read_text())["rows"] if r["engine"] == engine]
    steps = tuple((r["batch"], r["prompt_tokens"], r["decode_step_ms"] / 1e3) for r in rows)
    prefill = tuple((r["batch"], r["prompt_tokens"], r["prefill_ms"] / 1e3) for r in rows)
    return steps, prefill


PROFILES = {
    "h200-static-engine": lambda: fit_cost_model(
        "h200-static-engine",
        "H200, Llama-2-7B shape bf16: this project's static engine (KV pool, CUDA-graph decode, compiled "
        "layers), decode and prefill measured by bench/gpu_engine.py (reports/gpu/engine.json, 2026-11-22)",
        *_measured(),
    ),
    "h200-graph": lambda: fit_cost_model(
        "h200-graph",
        "H200, Llama-2-7B shape fp16: decode step of a static KV cache replayed as a CUDA graph, "
        "prefill of plain HF forward (reference/gpu_baseline.md, 2026-11-21)",
        H200_GRAPH_STEPS,
        GRAPH_MEAN_STEP_OFFSET_TOKENS,
    ),
    "h200-hf-generate": lambda: fit_cost_model(
        "h200-hf-generate",
        "H200, Llama-2-7B shape fp16: plain HF generate (eager, dynamic cache), prefill of plain HF forward "
        "(reference/gpu_baseline.md, 2026-11-21)",
        H200_HF_GENERATE_STEPS,
        HF_MEAN_STEP_OFFSET_TOKENS,
    ),
}
PROFILE_POINTS = {
    "h200-graph": (H200_GRAPH_STEPS, GRAPH_MEAN_STEP_OFFSET_TOKENS),
    "h200-hf-generate": (H200_HF_GENERATE_STEPS, HF_MEAN_STEP_OFFSET_TOKENS),
}


def _measured():
    steps, prefill = measured_engine_points()
    return steps, 32, prefill


def make_cost_model(name: str) -> CostModel:
    if name not in PROFILES:
        raise ValueError(f"unknown cost model {name!r}; choose one of {', '.join(PROFILES)}")
    return PROFILES[name]()
