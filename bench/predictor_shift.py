"""`python -m bench.predictor_shift --data ../shared/data --out reports/predictor`: the served
model under distribution shift, written to `<out>/shift.json`.

* test_split: the served model (`SERVED_MODEL`, `magnus_static_lexical`) fit on the train split;
  per task on the test split, the coverage of each calibrated quantile, the mean p90 interval width (p90 - point,
  tokens), MAE and the share flagged out of distribution.
* leave_one_task_out: for each task, fit on the other 7 tasks' train rows, test on its test rows:
  p90 coverage, MAE, and `per_task_mean`'s MAE fit on the same rows (for an unseen instruction it
  answers the pooled mean). The OOD inflation is learned here: the smallest factor at which the
  left-out model's p90 covers 90 % of the left-out task's *train* rows; each task's test rows are
  then scored with the largest factor the other tasks needed (and at least PRIOR_INFLATION), as a
  new task would be; the served default (`conformal.DEFAULT_OOD_INFLATION`) is the largest of all.
* adaptation: starting from the leave-one-out model, the left-out task's train rows arrive as
  logged requests; at 50/100/200/500/1000 of them a retraining round runs as the trainer runs it
  (`services.trainer.specs.PredictorSpec.select`: bad misses of the serving model, and every row
  of an instruction the latest version holds fewer than `length_min_samples_per_instruction`
  samples of; one row in 5 held back; push unless measurably worse on the held-back rows,
  `selection.should_push`) and the serving
  model's MAE on the task's test rows is recorded, offline (no log DB, no service).
  `adaptation_ceiling`: the test split's MAE of the task (its ~2,000 train rows all in training)
  over the left-out MAE, what retraining can about reach.
* latency: `benchmark` of the test-split model with the server's default quantile levels.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from services.core.conformal import DEFAULT_OOD_INFLATION
from services.core.dataset import TASKS, Split, load_split
from services.core.embedding_forest import SERVED_MODEL
from services.core.length_model import LengthModel, LengthSample, make_length_model
from services.predictor.benchmark import benchmark
from services.predictor.config import PredictorSettings
from services.predictor.train import add_data_args, check_data_args, predict_samples
from services.shared.db.models import RequestStatus
from services.shared.tokenizer import get_token_counter
from services.trainer.config import TrainerSettings
from services.trainer.selection import LoggedRequest, keep_newest, length_holdout, should_push
from services.trainer.specs import PredictorSpec

LEVELS = tuple(PredictorSettings.model_fields["quantile_levels"].default)
CHECKPOINTS = (0, 50, 100, 200, 500, 1000)
INFLATION_GRID = tuple(float(f) for f in np.arange(1.0, 10.01, 0.25))
INFLATION_TARGET = 0.9  # p90 coverage a left-out task's train rows must reach
PRIOR_INFLATION = 1.5  # the factor chosen before any task was left out: the least a new task gets


def with_inflation(model: Any, inflation: float) -> Any:
    """A shallow copy of `model` whose calibration widens OOD requests by `inflation`."""
    copy = object.__new__(type(model))
    copy.__dict__.update(model.__dict__)
    copy.calibration = replace(model.calibration, ood_inflation=inflation)
    return copy


def needed_inflation(model: Any, samples: Sequence[LengthSample]) -> float:
    """The smallest OOD inflation on INFLATION_GRID at which `model` (fit without these samples'
    task) covers INFLATION_TARGET of them at p90; the grid's largest if none does."""
    truth = np.array([s.generated_tokens for s in samples])
    for inflation in INFLATION_GRID:
        _, _, calibrated = with_inflation(model, inflation).predict_quantiles(*columns(samples), levels=(0.9,))
        if (truth <= calibrated.quantiles[:, 0]).mean() >= INFLATION_TARGET:
            return inflation
    return INFLATION_GRID[-1]


def columns(samples: Sequence[LengthSample]) -> tuple[list[str], list[str], list[int]]:
    return [s.instruction for s in samples], [s.input_text for s in samples], [s.input_tokens for s in samples]


def interval_report(model: Any, samples: Sequence[LengthSample]) -> dict[str, Any]:
    """Coverage of each level, p90 width and MAE of `model` on `samples` (one task's)."""
    truth = np.array([s.generated_tokens for s in samples])
    point, _, calibrated = model.predict_quantiles(*columns(samples), levels=LEVELS)
    if calibrated is None:
        raise ValueError(f"{model.name} has no calibration")
    p90 = calibrated.quantiles[:, LEVELS.index(0.9)]
    return {
        "p90_coverage": round(float((truth <= p90).mean()), 4),
        "mae": round(float(np.abs(point - truth).mean()), 3),
        "coverage": {str(q): round(float((truth <= calibrated.quantiles[:, j]).mean()), 4) for j, q in enumerate(LEVELS)},
        "p90_width_mean_tokens": round(float((p90 - point).mean()), 2),
        "p90_width_median_tokens": float(np.median(p90 - point)),
        "truth_mean_tokens": round(float(truth.mean()), 2),
        "point_mean_tokens": round(float(point.mean()), 2),
        "ood_share": round(float(calibrated.is_ood.mean()), 4),
        "n": len(samples),
    }


def by_task(split: Split, *, test: bool) -> dict[str, list[LengthSample]]:
    rows, samples = (split.test_rows, split.test) if test else (split.train_rows, split.train)
    grouped: dict[str, list[LengthSample]] = {}
    for row, sample in zip(rows, samples, strict=True):
        grouped.setdefault(row.task, []).append(sample)
    return grouped


def fit(name: str, samples: list[LengthSample]) -> LengthModel:
    model = make_length_model(name)
    model.fit(samples)
    return model


def mae(model: LengthModel, samples: Sequence[LengthSample]) -> float:
    truth = np.array([s.generated_tokens for s in samples])
    return float(np.abs(predict_samples(model, samples) - truth).mean())


def adaptation_curve(
    base: LengthModel, logged: list[LengthSample], test: list[LengthSample], settings: TrainerSettings
) -> dict[str, Any]:
    """MAE on `test` of the serving model after each checkpoint's worth of `logged` requests."""
    spec = PredictorSpec(settings)
    serving = latest = base
    curve: dict[str, float] = {"0": round(mae(serving, test), 3)}
    rounds = []
    rows: list[LoggedRequest] = []
    for previous, upto in zip(CHECKPOINTS, CHECKPOINTS[1:]):
        if upto > len(logged):
            break
        arriving = logged[previous:upto]
        predicted = predict_samples(serving, arriving)
        new_rows = [
            LoggedRequest(len(rows) + i + 1, RequestStatus.COMPLETED, s.instruction, s.input_text, s.input_tokens,
                          int(p), s.generated_tokens)
            for i, (s, p) in enumerate(zip(arriving, predicted, strict=True))
        ]
        rows.extend(new_rows)
        new_samples = spec.select(new_rows, latest.samples)
        holdout = length_holdout(rows[-settings.validation_window_rows :], settings.holdout_every)
        if new_samples:
            candidate = fit(latest.name, keep_newest([*latest.samples, *new_samples], settings.max_train_samples))
            latest = candidate
            candidate_error = mae(candidate, holdout) if holdout else None
            serving_error = mae(serving, holdout) if holdout else None
            is_pushed = should_push(
                spec.row_errors(candidate, holdout) if holdout else None,
                spec.row_errors(serving, holdout) if holdout else None,
                settings.push_tolerance_rel, settings.push_noise_z,
            )
            if is_pushed:
                serving = candidate
            # the candidate's MAE on the task's test rows, pushed or not: was a blocked one better?
            rounds.append({"upto": upto, "num_added": len(new_samples), "num_holdout": len(holdout),
                           "candidate_mae": candidate_error, "serving_mae": serving_error, "is_pushed": is_pushed,
                           "candidate_test_mae": round(mae(candidate, test), 3)})
        curve[str(upto)] = round(mae(serving, test), 3)
    return {"mae": curve, "rounds": rounds}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.predictor_shift", description=__doc__)
    add_data_args(parser)
    parser.add_argument("--out", type=Path, required=True, help="report folder (shift.json)")
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS, help="tasks left out in turn")
    parser.add_argument("--adaptation-tasks", nargs="*", default=list(TASKS), choices=TASKS)
    parser.add_argument("--skip-latency", action="store_true")
    args = parser.parse_args(argv)
    check_data_args(parser, args)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started_s = time.monotonic()
    counter = get_token_counter()
    split = load_split(args.data, counter, max_per_task=args.max_per_task, test_fraction=args.test_fraction)
    test_by_task, train_by_task = by_task(split, test=True), by_task(split, test=False)
    report: dict[str, Any] = {"model": SERVED_MODEL, "quantile_levels": list(LEVELS)}

    served = fit(SERVED_MODEL, split.train)
    if not args.skip_latency:
        report["latency"] = benchmark(served, split.test_rows, counter=counter)
        print(json.dumps(report["latency"]), flush=True)

    report["leave_one_task_out"], report["adaptation"], adaptation_rounds = {}, {}, {}
    settings = TrainerSettings()
    left_out_models, inflation = {}, {}
    for task in args.tasks:
        train = [s for t, rows in train_by_task.items() if t != task for s in rows]
        left_out = left_out_models[task] = fit(SERVED_MODEL, train)
        # learned on the task's train rows; its test rows are scored below with the other tasks' factors
        inflation[task] = needed_inflation(left_out, train_by_task[task])
        baseline = fit("per_task_mean", train)
        entry = interval_report(left_out, test_by_task[task])
        entry = {"p90_coverage_at_default_inflation": entry["p90_coverage"], "mae": entry["mae"],
                 "per_task_mean_mae": round(mae(baseline, test_by_task[task]), 3),
                 "needed_inflation_on_train_rows": inflation[task]}
        report["leave_one_task_out"][task] = entry
        print(task, json.dumps(entry), flush=True)
        if task in args.adaptation_tasks:
            curve = adaptation_curve(left_out, train_by_task[task], test_by_task[task], settings)
            report["adaptation"][task] = curve["mae"]
            adaptation_rounds[task] = curve["rounds"]
            print(task, "adaptation", json.dumps(curve["mae"]), flush=True)
    # Each left-out task is scored with the largest factor the *other* left-out tasks needed: what
    # a new task would get from the tasks seen so far.
    for task, left_out in left_out_models.items():
        others = [PRIOR_INFLATION, *(f for t, f in inflation.items() if t != task)]
        scored = interval_report(with_inflation(left_out, max(others)), test_by_task[task])
        report["leave_one_task_out"][task] = {**scored, **report["leave_one_task_out"][task], "ood_inflation": max(others)}
    report["ood_inflation"] = {"per_left_out_task": inflation, "served_default": DEFAULT_OOD_INFLATION,
                               "learned_max": max(inflation.values(), default=None)}
    # the test split at the learned factor, as the served model would be with it as its default
    test_inflation = report["ood_inflation"]["learned_max"] or DEFAULT_OOD_INFLATION
    report["test_split"] = {task: interval_report(with_inflation(served, test_inflation), rows) for task, rows in sorted(test_by_task.items())}
    report["ood_inflation"]["test_split"] = test_inflation
    print(json.dumps({t: r["p90_coverage"] for t, r in report["test_split"].items()}), flush=True)
    if not report["adaptation"]:
        del report["adaptation"]
    else:
        report["adaptation_rounds"] = adaptation_rounds
        # The same model fit with all of the task's train rows (the test split's): about the best
        # retraining can reach, holding ~2,000 of the task's rows where a round at 500 holds 400.
        report["adaptation_ceiling"] = {
            task: {"in_distribution_mae": report["test_split"][task]["mae"],
                   "ratio_to_0": round(report["test_split"][task]["mae"] / curve["0"], 3)}
            for task, curve in report["adaptation"].items()
        }
    report["run"] = {
        "command": "python -m bench.predictor_shift " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:])),
        "machine": f"CPU dev machine ({os.cpu_count()} cores visible, {platform.machine()}, shared with other jobs)",
        "duration_s": round(time.monotonic() - started_s, 1),
        "num_train": len(split.train),
        "num_test": len(split.test),
        "max_per_task": args.max_per_task,
        "test_fraction": args.test_fraction,
        "tokenizer": counter.name,
        "trainer": {"length_miss_abs_tokens": settings.length_miss_abs_tokens, "length_miss_rel": settings.length_miss_rel,
                    "length_min_samples_per_instruction": settings.length_min_samples_per_instruction,
                    "holdout_every": settings.holdout_every, "push_tolerance_rel": settings.push_tolerance_rel,
                    "push_noise_z": settings.push_noise_z},
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "shift.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {args.out}/shift.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
