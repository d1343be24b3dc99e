"""The simulated workload: real task rows, real token lengths, real predictions, arrival times.

Rows come from the 8 task files (services.core.dataset); the split is by id, the predictor
(`per_app_linear`, the default served family) is fitted on the train side and predicts the test
side, and only test rows are replayed, so every prediction is out of sample. A request's true
generation length is its reference output's token count, capped at `max_new_tokens` (trace replay:
the worker stops exactly there).
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np

from services.core.dataset import find_task_files, is_test_id, read_task_rows, to_samples
from services.core.length_model import make_length_model
from services.shared.tokenizer import get_token_counter


@dataclass(frozen=True)
class LengthTable:
    """Test-split requests: task index, prompt tokens, true and predicted generation tokens."""

    tasks: tuple[str, ...]
    task_index: np.ndarray
    input_tokens: np.ndarray
    true_gen_tokens: np.ndarray
    predicted_gen_tokens: np.ndarray
    predictor: str
    # the predictor's calibrated quantile at `plan_quantile` per row, when one was asked for
    quantile_gen_tokens: np.ndarray | None = None
    plan_quantile: float | None = None

    def mae_tokens(self) -> float:
        return float(np.mean(np.abs(self.predicted_gen_tokens - self.true_gen_tokens)))


@dataclass(frozen=True)
class Workload:
    """One run's requests, sorted by arrival. Times in seconds from the start, lengths in tokens."""

    arrival_s: np.ndarray
    input_tokens: np.ndarray
    true_gen_tokens: np.ndarray
    predicted_gen_tokens: np.ndarray
    task_index: np.ndarray
    max_new_tokens: int = 2**31 - 1  # every request's cap, tokens (the client's max_new_tokens)
    # the length each request is planned at instead of its point prediction (the batcher's
    # MAGNUS_BATCHER_PLAN_QUANTILE), tokens; None = planned at the point prediction
    quantile_gen_tokens: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.arrival_s)


def load_lengths(
    data_dir: Path,
    *,
    test_fraction: float = 0.2,
    model_name: str = "per_app_linear",
    show_progress: bool = True,
    plan_quantile: float | None = None,
    left_out_task: str | None = None,
) -> LengthTable:
    """Token lengths of every test row and its prediction by a model fitted on the train rows
    (of every task but `left_out_task`, when given: traffic the predictor has not seen), and the
    model's calibrated quantile at `plan_quantile` when given (a model with calibrated quantiles)."""
    files = find_task_files(data_dir)
    if left_out_task is not None and left_out_task not in files:
        raise ValueError(f"unknown task {left_out_task!r}; tasks: {', '.join(files)}")
    rows = [row for path in files.values() for row in read_task_rows(path)]
    samples = to_samples(rows, get_token_counter(), show_progress=show_progress)
    is_test = np.array([is_test_id(r.id, test_fraction) for r in rows])
    model = make_length_model(model_name)
    train = [s for s, r, t in zip(samples, rows, is_test, strict=True) if not t and r.task != left_out_task]
    model.fit(train)
    test = [s for s, t in zip(samples, is_test, strict=True) if t]
    tasks = tuple(files)
    query = ([s.instruction for s in test], [s.input_text for s in test], [s.input_tokens for s in test])
    quantile = None
    if plan_quantile is None:
        predicted = model.predict(*query)
    else:
        predicted, _, calibrated = model.predict_quantiles(*query, levels=(plan_quantile,))
        if calibrated is None:
            raise ValueError(f"{model_name} has no calibrated quantiles")
        quantile = np.asarray(calibrated.quantiles[:, 0], dtype=np.int64)
    without = f" without {left_out_task}" if left_out_task else ""
    return LengthTable(
        tasks=tasks,
        task_index=np.array([tasks.index(r.task) for r, t in zip(rows, is_test, strict=True) if t]),
        input_tokens=np.array([s.input_tokens for s in test], dtype=np.int64),
        true_gen_tokens=np.array([max(1, s.generated_tokens) for s in test], dtype=np.int64),
        predicted_gen_tokens=np.asarray(predicted, dtype=np.int64),
        predictor=f"{model_name} fitted on the train split{without} ({len(train)} rows)",
        quantile_gen_tokens=quantile,
        plan_quantile=plan_quantile,
    )


def poisson_arrivals_s(num_requests: int, rate_per_s: float, rng: np.random.Generator) -> np.ndarray:
    """Arrival times of a Poisson process of `rate_per_s`, seconds from 0."""
    return np.cumsum(rng.exponential(1.0 / rate_per_s, num_requests))


def read_trace_gaps_s(path: Path) -> np.ndarray:
    """Inter-arrival gaps of a real trace (Azure 2023 CSV, TIMESTAMP column), seconds."""
    with path.open(newline="") as file:
        stamps = [datetime.fromisoformat(row["TIMESTAMP"][:26]) for row in csv.DictReader(file)]
    seconds = np.array([(s - stamps[0]).total_seconds() for s in stamps])
    return np.diff(seconds)


def trace_arrivals_s(gaps_s: np.ndarray, num_requests: int, rate_per_s: float, rng: np.random.Generator) -> np.ndarray:
    """A window of the trace's gaps (random start, wrapping), scaled so the mean rate is `rate_per_s`.

    Scaling keeps the trace's burstiness (the shape of its gaps) while sweeping the load.
    """
    start = int(rng.integers(len(gaps_s)))
    window = np.take(gaps_s, np.arange(start, start + num_requests), mode="wrap")
    window = window * (num_requests / rate_per_s) / max(window.sum(), 1e-12)
    return np.cumsum(window)


def sample_workload(
    table: LengthTable, arrival_s: np.ndarray, max_new_tokens: int, rng: np.random.Generator, *,
    is_planned_at_quantile: bool = False,
) -> Workload:
    """Requests with an equal task mix (task uniform, then a test row of it, with replacement),
    planned at the table's quantile when `is_planned_at_quantile` (the same rows either way)."""
    if is_planned_at_quantile and table.quantile_gen_tokens is None:
        raise ValueError("the length table has no quantiles to plan at")
    num = len(arrival_s)
    task_choice = rng.integers(len(table.tasks), size=num)
    rows = np.empty(num, dtype=np.int64)
    for task in range(len(table.tasks)):
        candidates = np.flatnonzero(table.task_index == task)
        picked = task_choice == task
        rows[picked] = rng.choice(candidates, size=int(picked.sum()))
    return Workload(
        arrival_s=arrival_s,
        input_tokens=table.input_tokens[rows],
        true_gen_tokens=np.minimum(table.true_gen_tokens[rows], max_new_tokens),
        predicted_gen_tokens=np.clip(table.predicted_gen_tokens[rows], 1, max_new_tokens),
        task_index=task_choice,
        max_new_tokens=max_new_tokens,
        quantile_gen_tokens=(
            np.clip(table.quantile_gen_tokens[rows], 1, max_new_tokens) if is_planned_at_quantile else None
        ),
    )
