"""Writing the predictor report: metrics.json, per-task scatter PNGs and README.md tables."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np


def write_scatter_plots(
    out_dir: Path, tasks: np.ndarray, truth: np.ndarray, predictions: dict[str, np.ndarray], models: list[str]
) -> list[Path]:
    """One PNG per task: predicted vs true tokens (log-log), one panel per model in `models`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for task in sorted(set(tasks)):
        mask = tasks == task
        figure, axes = plt.subplots(1, len(models), figsize=(4 * len(models), 4), squeeze=False)
        top = float(max(truth[mask].max(), *(predictions[m][mask].max() for m in models))) * 1.2
        for axis, name in zip(axes[0], models, strict=True):
            axis.scatter(truth[mask], predictions[name][mask], s=4, alpha=0.35)
            axis.plot([1, top], [1, top], color="black", linewidth=0.8)
            axis.set(xscale="log", yscale="log", xlim=(1, top), ylim=(1, top), title=name)
            axis.set_xlabel("true generated tokens")
        axes[0][0].set_ylabel("predicted tokens")
        figure.suptitle(f"{task} (test split, n={int(mask.sum())})")
        figure.tight_layout()
        path = out_dir / f"scatter_{task}.png"
        figure.savefig(path, dpi=80)
        plt.close(figure)
        paths.append(path)
    return paths


def _row(cells: list[Any]) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def markdown(report: dict[str, Any], command: str) -> str:
    """The README.md of the report: overall, per-task MAE and latency tables."""
    models = report["models"]
    served = report["served_model"]
    tasks = sorted(next(iter(models.values()))["per_task"])
    lines = [
        "# Generation-length predictor: accuracy and serving speed",
        "",
        f"Written by `{command}` on the {report['machine']}.",
        f"Data: `{report['data']['folder']}`, the first {report['data']['max_per_task']} rows per task, split by `id`"
        f" ({report['data']['num_train']} train / {report['data']['num_test']} test rows). Lengths are tokens of the"
        f" serving model's tokenizer ({report['data']['tokenizer']}). acc10 = share of predictions within"
        " max(10 tokens, 10 % of the truth). Served model: **" + served + "**.",
        "",
        "## Overall (test split)",
        "",
        _row(["model", "MAE", "RMSE", "R^2", "acc10", "fit s", "single p50 ms", "batch-32 predictions/s"]),
        _row(["---"] + ["---:"] * 7),
    ]
    for name, entry in models.items():
        o, lat = entry["overall"], entry.get("latency", {})
        label = f"**{name}** (served)" if name == served else name
        lines.append(
            _row([label, f"{o['mae']:.2f}", f"{o['rmse']:.1f}", f"{o['r2']:.3f}", f"{o['acc10']:.3f}",
                  entry.get("fit_s", ""), lat.get("single_p50_ms", ""), lat.get("batch32_predictions_per_s", "")])
        )
    lines += ["", "## MAE per task, tokens", "", _row(["model", *tasks]), _row(["---"] + ["---:"] * len(tasks))]
    for name, entry in models.items():
        lines.append(_row([name, *(f"{entry['per_task'][t]['mae']:.1f}" for t in tasks)]))
    lines += ["", "## acc10 per task", "", _row(["model", *tasks]), _row(["---"] + ["---:"] * len(tasks))]
    for name, entry in models.items():
        lines.append(_row([name, *(f"{entry['per_task'][t]['acc10']:.2f}" for t in tasks)]))
    lines += ["", "## Models", ""]
    for name, entry in models.items():
        lines.append(f"* `{name}`: {entry['description']}")
    lat = report["latency"]
    lines += [
        "",
        "## Serving path of the served model",
        "",
        "`predict.predict_lengths` (count prompt tokens + embed + compress + predict), held-out prompts of all"
        f" tasks interleaved: single request p50 {lat['single_p50_ms']} ms (p99 {lat['single_p99_ms']} ms);"
        f" batches of 32: p50 {lat['batch32_p50_ms']} ms, {lat['batch32_predictions_per_s']} predictions/s."
        f" 1-minute load average when it ended: {lat['load_avg_1min_at_end']} (the dev machine is shared).",
        "",
        "Scatter plots: `scatter_<task>.png` (predicted vs true tokens, log-log).",
        "",
        "## Quantiles, out-of-distribution requests, shift",
        "",
        "The served model also returns calibrated quantiles (default p50/p90/p95), an uncertainty and an"
        " out-of-distribution flag per request. How they are calibrated and why, per-task p90 coverage,"
        " leave-one-task-out and the adaptation curve: `shift.md` and `shift.json`"
        " (`python -m bench.predictor_shift --data ../shared/data --out reports/predictor`).",
        "",
    ]
    return "\n".join(lines)


def write_report(out_dir: Path, report: dict[str, Any], command: str) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "metrics.json").write_text(json.dumps(report, indent=2) + "\n")
    (out_dir / "README.md").write_text(markdown(report, command))
