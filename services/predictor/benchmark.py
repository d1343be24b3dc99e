"""Latency and throughput of the predictor's serving path: count tokens + embed + compress + predict.

It times `predict.predict_lengths`, the exact function the servicer runs on its worker thread, on
held-out prompts of all tasks interleaved (mixed batches), with `input_tokens` = 0 so the
predictor counts every prompt itself. gRPC framing is not included.

`python -m services.predictor.benchmark --data ../shared/data --model-file <dir>/model.joblib`
prints the numbers; `evaluate` runs the same function for every model of the report.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from services.core.dataset import TaskRow
from services.core.encoders import sentence_memo_set_aside
from services.core.length_model import LengthModel
from services.predictor.config import PredictorSettings
from services.predictor.predict import LengthQuery, predict_lengths
from services.shared.tokenizer import TokenCounter, get_token_counter

BATCH_SIZE = 32


def mixed_queries(rows: Sequence[TaskRow], num_queries: int) -> list[LengthQuery]:
    """`num_queries` prompts taking the tasks in turn (round robin), repeating rows if needed."""
    by_task: dict[str, list[TaskRow]] = defaultdict(list)
    for row in rows:
        by_task[row.task].append(row)
    if not by_task:
        raise ValueError("no rows to build benchmark queries from")
    queues = [by_task[task] for task in sorted(by_task)]
    queries = []
    for i in range(num_queries):
        queue = queues[i % len(queues)]
        row = queue[(i // len(queues)) % len(queue)]
        queries.append(LengthQuery(row.instruction, row.input_text, 0))
    return queries


def _timed_calls_s(
    model: LengthModel, batches: Sequence[Sequence[LengthQuery]], counter: TokenCounter, levels: Sequence[float]
) -> np.ndarray:
    durations_s = np.empty(len(batches))
    for i, batch in enumerate(batches):
        started_s = time.perf_counter()
        predict_lengths(model, batch, counter, quantile_levels=levels)
        durations_s[i] = time.perf_counter() - started_s
    return durations_s


def benchmark(
    model: LengthModel,
    rows: Sequence[TaskRow],
    *,
    num_single: int = 300,
    num_batches: int = 60,
    counter: TokenCounter | None = None,
    quantile_levels: Sequence[float] = PredictorSettings.model_fields["quantile_levels"].default,
) -> dict[str, Any]:
    """Single-request p50/p99 (ms) and batch-of-32 throughput (predictions/s) and p50 (ms).

    A warm-up call of each shape runs first on prompts not timed later (lazy loads, the
    instruction cache). Timed prompts are not repeated within the run (up to the number of rows)
    and the transformer's vector memo is emptied first, so no prompt's embedding is reused: the
    exact-match table only hits what it would hit in serving (held-out rows are not in it).
    Calibrated quantiles at `quantile_levels` (the server's default) are computed as served.
    """
    counter = counter or get_token_counter()
    num_timed = num_single + num_batches * BATCH_SIZE
    queries = mixed_queries(rows, num_timed + 1 + BATCH_SIZE)
    singles = [[q] for q in queries[:num_single]]
    batches = [queries[num_single + i * BATCH_SIZE : num_single + (i + 1) * BATCH_SIZE] for i in range(num_batches)]
    with sentence_memo_set_aside():
        _timed_calls_s(model, [queries[num_timed : num_timed + 1], queries[num_timed + 1 :]], counter, quantile_levels)
        single_s = _timed_calls_s(model, singles, counter, quantile_levels)
        batch_s = _timed_calls_s(model, batches, counter, quantile_levels)
    return {
        "single_p50_ms": round(float(np.median(single_s)) * 1e3, 3),
        "single_p99_ms": round(float(np.quantile(single_s, 0.99)) * 1e3, 3),
        "batch32_p50_ms": round(float(np.median(batch_s)) * 1e3, 3),
        "batch32_predictions_per_s": round(BATCH_SIZE * num_batches / float(batch_s.sum()), 1),
        "quantile_levels": list(quantile_levels),
        "num_single": num_single,
        "num_batches": num_batches,
        "load_avg_1min_at_end": round(os.getloadavg()[0], 2),
    }


def main(argv: list[str] | None = None) -> int:
    from services.core.dataset import find_task_files, is_test_id, read_task_rows
    from services.shared.db.models import ModelKind
    from services.shared.model_store import read_artifact, sha256_file

    parser = argparse.ArgumentParser(prog="python -m services.predictor.benchmark", description=__doc__)
    parser.add_argument("--data", type=Path, required=True, help="folder with the task .jsonl files")
    parser.add_argument("--model-file", type=Path, required=True, help="model.joblib written by the train CLI")
    parser.add_argument("--num-single", type=int, default=300)
    parser.add_argument("--num-batches", type=int, default=60)
    args = parser.parse_args(argv)
    model = read_artifact(args.model_file, ModelKind.PREDICTOR, sha256_file(args.model_file))
    rows = [r for p in find_task_files(args.data).values() for r in read_task_rows(p) if is_test_id(r.id, 0.2)]
    result = benchmark(model, rows, num_single=args.num_single, num_batches=args.num_batches)
    print(json.dumps({"model": model.name, "cpu_count": os.cpu_count(), **result}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
