"""`python -m services.predictor.bootstrap --data ../shared/data`: fit and store a first predictor.

Reads the 8 task files, splits train/test by id, fits `--model` on the train split (default
`per_app_linear`, the fast choice the integration tests use; `make run` asks for the served model of
reports/predictor, `services.core.embedding_forest.SERVED_MODEL`), prints MAE and acc@10% per task on the test split, and
stores the model as a new predictor version (pushed: replicas load it at start-up).
`--if-missing` does nothing if a version exists.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

from services.predictor.config import PredictorSettings
from services.core.dataset import TaskRow, find_task_files, is_test_id, read_task_rows, to_samples
from services.core.length_model import LengthSample, length_model_names, make_length_model
from services.core.length_metrics import length_metrics
from services.shared.db import migrate
from services.shared.db.engine import make_engine, make_session_factory
from services.shared.db.models import ModelKind
from services.shared.model_store import ModelStore, VersionNotFound
from services.shared.tokenizer import get_token_counter

KIND = ModelKind.PREDICTOR


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    settings = PredictorSettings()
    parser = argparse.ArgumentParser(prog="python -m services.predictor.bootstrap", description=__doc__)
    parser.add_argument("--data", type=Path, required=True, help="folder with the task .jsonl files")
    parser.add_argument("--max-per-task", type=int, default=2000, help="rows read per task file")
    parser.add_argument("--test-fraction", type=float, default=0.2, help="share of ids held out")
    parser.add_argument("--model", default="per_app_linear", choices=length_model_names())
    parser.add_argument("--database-url", default=settings.database_url)
    parser.add_argument("--model-store-dir", type=Path, default=settings.model_store_dir)
    parser.add_argument("--if-missing", action="store_true", help="skip if a predictor version exists")
    args = parser.parse_args(argv)
    if args.max_per_task < 1:
        parser.error("--max-per-task must be >= 1")
    if not 0.0 < args.test_fraction < 1.0:
        parser.error("--test-fraction must be in (0, 1)")
    return args


def evaluate_per_task(model, rows: list[TaskRow], samples: list[LengthSample]) -> dict[str, dict]:
    """Length metrics per task and over all rows, on the given (test) rows."""
    predicted = model.predict(
        [s.instruction for s in samples], [s.input_text for s in samples], [s.input_tokens for s in samples]
    )
    truth = np.array([s.generated_tokens for s in samples])
    by_task: dict[str, list[int]] = defaultdict(list)
    for i, row in enumerate(rows):
        by_task[row.task].append(i)
    metrics = {task: length_metrics(predicted[idx], truth[idx]) for task, idx in by_task.items()}
    metrics["all"] = length_metrics(predicted, truth)
    return metrics


def print_report(metrics: dict[str, dict], num_train: int) -> None:
    print(f"trained on {num_train} samples; test split:")
    print(f"  {'task':20s} {'n':>6s} {'MAE tok':>9s} {'acc@10%':>8s}")
    for task, m in metrics.items():
        print(f"  {task:20s} {m['num_samples']:6d} {m['mae_tokens']:9.2f} {m['acc_at_10pct']:8.3f}")


async def already_has_version(store: ModelStore) -> bool:
    try:
        await store.find(KIND)
    except VersionNotFound:
        return False
    return True


async def run(args: argparse.Namespace) -> int:
    started_s = time.monotonic()
    await asyncio.to_thread(migrate.upgrade, args.database_url)
    engine = make_engine(args.database_url)
    try:
        store = ModelStore(args.model_store_dir, make_session_factory(engine))
        if args.if_missing and await already_has_version(store):
            print("a predictor version exists; nothing to do (--if-missing)")
            return 0
        rows = [r for path in find_task_files(args.data).values() for r in read_task_rows(path, args.max_per_task)]
        samples = to_samples(rows, get_token_counter())
        is_test = [is_test_id(r.id, args.test_fraction) for r in rows]
        train = [s for s, t in zip(samples, is_test, strict=True) if not t]
        test_rows = [r for r, t in zip(rows, is_test, strict=True) if t]
        test = [s for s, t in zip(samples, is_test, strict=True) if t]
        model = make_length_model(args.model)
        model.fit(train)
        metrics = evaluate_per_task(model, test_rows, test)
        print_report(metrics, len(train))
        info = await store.save(
            KIND,
            model,
            model_name=model.name,
            num_train_samples=len(train),
            metrics={"test": metrics, "mae_tokens": metrics["all"]["mae_tokens"]},
            is_pushed=True,
            note=f"bootstrap from {args.data} (max {args.max_per_task} per task)",
        )
        print(f"stored predictor v{info.version} at {info.artifact_uri} in {time.monotonic() - started_s:.1f} s")
        return 0
    finally:
        await engine.dispose()


def main(argv: list[str] | None = None) -> int:
    return asyncio.run(run(parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
