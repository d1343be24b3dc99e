"""Accuracy of length predictions. Pure functions over arrays of tokens."""

from __future__ import annotations

import numpy as np

ACC_ABS_TOKENS = 10
ACC_REL = 0.10


def mae_tokens(predicted: np.ndarray, truth: np.ndarray) -> float:
    """Mean absolute error, tokens; 0.0 for empty input."""
    if len(truth) == 0:
        return 0.0
    return float(np.mean(np.abs(np.asarray(predicted, float) - np.asarray(truth, float))))


def acc_within(
    predicted: np.ndarray, truth: np.ndarray, abs_tokens: float = ACC_ABS_TOKENS, rel: float = ACC_REL
) -> float:
    """Share of predictions with |error| <= max(abs_tokens, rel * truth), in [0, 1]."""
    if len(truth) == 0:
        return 0.0
    truth = np.asarray(truth, float)
    error = np.abs(np.asarray(predicted, float) - truth)
    return float(np.mean(error <= np.maximum(abs_tokens, rel * truth)))


def length_metrics(predicted: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    """{"mae_tokens", "acc_at_10pct", "num_samples"} of one evaluation set."""
    return {
        "mae_tokens": round(mae_tokens(predicted, truth), 3),
        "acc_at_10pct": round(acc_within(predicted, truth), 4),
        "num_samples": int(len(truth)),
    }


def rmse_tokens(predicted: np.ndarray, truth: np.ndarray) -> float:
    """Root mean squared error, tokens; 0.0 for empty input."""
    if len(truth) == 0:
        return 0.0
    return float(np.sqrt(np.mean((np.asarray(predicted, float) - np.asarray(truth, float)) ** 2)))


def r_squared(predicted: np.ndarray, truth: np.ndarray) -> float:
    """1 - SSE / SST (can be negative); 0.0 when the truth does not vary or is empty."""
    truth = np.asarray(truth, float)
    if len(truth) == 0:
        return 0.0
    total = float(((truth - truth.mean()) ** 2).sum())
    if total == 0.0:
        return 0.0
    return 1.0 - float(((np.asarray(predicted, float) - truth) ** 2).sum()) / total


def report_metrics(predicted: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    """The report's shape: {"mae", "rmse" (tokens), "r2", "acc10" (share), "n"}."""
    return {
        "mae": round(mae_tokens(predicted, truth), 3),
        "rmse": round(rmse_tokens(predicted, truth), 3),
        "r2": round(r_squared(predicted, truth), 4),
        "acc10": round(acc_within(predicted, truth), 4),
        "n": int(len(truth)),
    }
