"""`python -m services.predictor.evaluate --data ../shared/data --out reports/predictor`: the report.

Fits every model (the baselines, the paper's model on MiniLM and on the distilled static
embedding, and each variant) on the train split, scores them per task and overall on the test
split, times each one's serving path (`benchmark`), and writes metrics.json, README.md and one
scatter PNG per task into `--out`. The MiniLM models embed every row with the transformer:
most of the ~15-20 min this takes on 2 cores.
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from services.predictor.benchmark import benchmark
from services.core.dataset import load_split
from services.core.embedding_forest import CONFIGS, SERVED_MODEL
from services.core.length_model import make_length_model
from services.predictor.report import write_report, write_scatter_plots
from services.predictor.train import add_data_args, check_data_args, predict_samples, score
from services.shared.tokenizer import get_token_counter

BASELINES = {
    "per_task_mean": "baseline: each task's mean generated length",
    "per_app_linear": "baseline: per task, least-squares line on input tokens",
}
SENTENCE_BENCH = {"num_single": 20, "num_batches": 3}  # the transformer is ~100x slower: fewer reps


def describe(name: str) -> str:
    if name in BASELINES:
        return BASELINES[name]
    c = CONFIGS[name]
    parts = [
        "MiniLM transformer" if c.encoder == "sentence" else f"static embedding distilled from MiniLM ({c.max_prefix_pieces}-piece prefix)",
        f"{c.user_groups}+{c.app_groups} groups + input tokens",
        *(["+ surface counts (chars, lines, words, non-ASCII share)"] if c.use_surface_features else []),
        "target log((gen+1)/(input+1))" if c.target == "log_ratio" else "target tokens",
        {"rf": "random forest", "rf_leaf5": "random forest (min leaf 5, 50% features)", "hgb_l1": "gradient boosting, absolute loss"}[c.regressor],
        *([f"depth <= {c.max_depth}"] if c.max_depth else []),
        *(["median of trees"] if c.aggregate == "median" else []),
        *(["exact-match table of seen prompts"] if c.use_exact_cache else []),
        *(["+ per-instruction ridge on the forest's error over word / character n-gram counts (lexical stage)"]
          if c.use_lexical_stage else []),
    ]
    return ", ".join(parts)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m services.predictor.evaluate", description=__doc__)
    add_data_args(parser)
    parser.add_argument("--out", type=Path, required=True, help="report folder")
    parser.add_argument("--models", nargs="+", default=[*BASELINES, *CONFIGS], choices=[*BASELINES, *CONFIGS])
    parser.add_argument("--num-single", type=int, default=300, help="single requests timed per model")
    parser.add_argument("--num-batches", type=int, default=60, help="batches of 32 timed per model")
    args = parser.parse_args(argv)
    check_data_args(parser, args)
    if SERVED_MODEL not in args.models:
        parser.error(f"--models must include the served model {SERVED_MODEL}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    counter = get_token_counter()
    split = load_split(args.data, counter, max_per_task=args.max_per_task, test_fraction=args.test_fraction)
    truth = np.array([s.generated_tokens for s in split.test])
    tasks = np.array([r.task for r in split.test_rows])
    models: dict[str, Any] = {}
    predictions: dict[str, np.ndarray] = {}
    for name in tqdm(args.models, desc="models", unit="model"):
        model = make_length_model(name)
        started_s = time.monotonic()
        model.fit(split.train)
        fit_s = time.monotonic() - started_s
        predictions[name] = predict_samples(model, split.test)
        is_sentence = name in CONFIGS and CONFIGS[name].encoder == "sentence"
        reps = SENTENCE_BENCH if is_sentence else {"num_single": args.num_single, "num_batches": args.num_batches}
        latency = benchmark(model, split.test_rows, counter=counter, **reps)
        models[name] = {
            "description": describe(name),
            **score(predictions[name], split.test_rows, split.test),
            "fit_s": round(fit_s, 1),
            "latency": latency,
        }
        tqdm.write(f"{name}: MAE {models[name]['overall']['mae']:.2f} acc10 {models[name]['overall']['acc10']:.3f}")
    report = {
        "models": models,
        "served_model": SERVED_MODEL,
        "latency": models[SERVED_MODEL]["latency"],
        "machine": f"2-core CPU dev machine ({os.cpu_count()} cores visible, {platform.machine()}, shared with other jobs)",
        "data": {
            "folder": str(args.data),
            "max_per_task": args.max_per_task,
            "test_fraction": args.test_fraction,
            "num_train": len(split.train),
            "num_test": len(split.test),
            "tokenizer": counter.name,
        },
    }
    args.out.mkdir(parents=True, exist_ok=True)
    plotted = [m for m in ("per_app_linear", "paper_minilm", "paper_static", SERVED_MODEL) if m in predictions]
    write_scatter_plots(args.out, tasks, truth, predictions, plotted)
    command = "python -m services.predictor.evaluate " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    write_report(args.out, report, command)
    print(f"wrote {args.out}/metrics.json, README.md and {len(set(tasks))} scatter plots")
    return 0


if __name__ == "__main__":
    sys.exit(main())
