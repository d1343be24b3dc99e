"""`python -m services.predictor.train --data ../shared/data --out <model dir>`: fit one named model.

Reads the task files, splits by id, fits `--model` on the train split, scores it on the test
split, and writes `<out>/model.joblib` (a Magnus artifact, the format the model store serves)
and `<out>/metrics.json`. `--all-rows` fits on train + test (for a model to ship; the metrics
are then in-sample and say so).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from services.core.dataset import TaskRow, load_split
from services.core.embedding_forest import SERVED_MODEL
from services.core.length_model import LengthModel, LengthSample, length_model_names, make_length_model
from services.core.length_metrics import report_metrics
from services.shared.db.models import ModelKind
from services.shared.model_store import write_artifact
from services.shared.tokenizer import get_token_counter

DEFAULT_MAX_PER_TASK = 2500  # the paper trains on 2,500 requests per task


def add_data_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", type=Path, required=True, help="folder with the task .jsonl files")
    parser.add_argument("--max-per-task", type=int, default=DEFAULT_MAX_PER_TASK, help="rows read per task file")
    parser.add_argument("--test-fraction", type=float, default=0.2, help="share of ids held out")


def check_data_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.max_per_task < 1:
        parser.error("--max-per-task must be >= 1")
    if not 0.0 < args.test_fraction < 1.0:
        parser.error("--test-fraction must be in (0, 1)")


def predict_samples(model: LengthModel, samples: Sequence[LengthSample]) -> np.ndarray:
    return model.predict(
        [s.instruction for s in samples], [s.input_text for s in samples], [s.input_tokens for s in samples]
    )


def score(predicted: np.ndarray, rows: Sequence[TaskRow], samples: Sequence[LengthSample]) -> dict[str, Any]:
    """{"overall": metrics, "per_task": {task: metrics}} in the report's shape."""
    truth = np.array([s.generated_tokens for s in samples])
    by_task: dict[str, list[int]] = defaultdict(list)
    for i, row in enumerate(rows):
        by_task[row.task].append(i)
    return {
        "overall": report_metrics(predicted, truth),
        "per_task": {task: report_metrics(predicted[idx], truth[idx]) for task, idx in sorted(by_task.items())},
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m services.predictor.train", description=__doc__)
    add_data_args(parser)
    parser.add_argument("--out", type=Path, required=True, help="folder for model.joblib and metrics.json")
    parser.add_argument("--model", default=SERVED_MODEL, choices=length_model_names())
    parser.add_argument("--all-rows", action="store_true", help="fit on train + test rows")
    args = parser.parse_args(argv)
    check_data_args(parser, args)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    split = load_split(args.data, get_token_counter(), max_per_task=args.max_per_task, test_fraction=args.test_fraction)
    train = split.train + split.test if args.all_rows else split.train
    model = make_length_model(args.model)
    print(f"fitting {args.model} on {len(train)} samples ...", flush=True)
    started_s = time.monotonic()
    model.fit(train)
    fit_s = time.monotonic() - started_s
    result = score(predict_samples(model, split.test), split.test_rows, split.test)
    args.out.mkdir(parents=True, exist_ok=True)
    sha256 = write_artifact(args.out / "model.joblib", ModelKind.PREDICTOR, model.name, model)
    metrics = {
        "model": model.name,
        "num_train_samples": len(train),
        "test_is_in_sample": bool(args.all_rows),
        "fit_s": round(fit_s, 2),
        "sha256": sha256,
        **result,
    }
    (args.out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    overall = result["overall"]
    print(f"{model.name}: test MAE {overall['mae']:.2f} tokens, acc@10% {overall['acc10']:.3f} (n={overall['n']})")
    print(f"wrote {args.out / 'model.joblib'} and metrics.json (fit {fit_s:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
