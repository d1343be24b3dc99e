"""`python -m services.batcher.simulate.plan_quantile`: planning each request at its point
prediction against planning it at the predictor's calibrated p90 (the batcher's
MAGNUS_BATCHER_PLAN_QUANTILE), in the simulator, on the same workloads.

Predictions come from the served predictor family (`magnus_static`, which gives calibrated
quantiles), fitted on the train split. Scenarios: every task seen in training, and, for each
`--left-out` task (by default each of the 8 in turn), a predictor fitted without that task while
its requests stay 1/8 of the traffic (a shift: its requests are out of distribution and get the
wide OOD intervals). Each
(scenario, policy, rate) runs twice over one workload, once per plan; OOM splits, throughput and
latency come from `services.batcher.simulate.metrics`.

Writes <out>/plan_quantile.json and <out>/plan_quantile.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from services.batcher.config import BatcherSettings
from services.batcher.simulate.cost_model import (
    PROFILES,
    make_cost_model,
)
from services.batcher.simulate.engine import Hardware
from services.batcher.simulate.metrics import RunMetrics
from services.batcher.simulate.sweep import SweepSpec, run_sweep, safe_fixed_batch_size
from services.batcher.simulate.workload import LengthTable, load_lengths
from services.core.dataset import TASKS
from services.core.embedding_forest import SERVED_MODEL

DEFAULT_PHI = BatcherSettings.model_fields["phi_token_reads"].default
PLANS = ("point", "quantile")
COLUMNS = ("requests_per_s", "mean_latency_s", "p99_latency_s", "mean_batch_size", "num_batches", "num_oom")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m services.batcher.simulate.plan_quantile", description=__doc__)
    parser.add_argument("--data", type=Path, default=Path("../shared/data"), help="folder with the task .jsonl files")
    parser.add_argument("--out", type=Path, default=Path("reports/simulation"), help="folder for plan_quantile.{json,md}")
    parser.add_argument("--cost-model", default="h200-hf-generate", choices=sorted(PROFILES))
    parser.add_argument("--policies", default="magnus,magnus_pack", help="comma-separated")
    parser.add_argument("--rates", default="2,4,8,14,20,28", help="request rates, req/s, comma-separated")
    parser.add_argument("--duration-s", type=float, default=1200.0, help="arrival window of each run, s")
    parser.add_argument("--quantile", type=float, default=0.9, help="the level planned at (MAGNUS_BATCHER_PLAN_QUANTILE)")
    parser.add_argument("--left-out", nargs="*", default=list(TASKS), choices=TASKS,
                        help="tasks each left out of training in turn (default: every task)")
    parser.add_argument("--memory-fill", type=float, default=0.85, help="share of Theta filled by planned lengths")
    parser.add_argument("--max-new-tokens", type=int, default=2048)
    parser.add_argument("--gpu-memory-gib", type=float, default=80.0)
    parser.add_argument("--memory-utilization", type=float, default=0.9)
    parser.add_argument("--phi", type=float, default=DEFAULT_PHI, help="WMA threshold Phi, token reads")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def table_summary(table: LengthTable) -> dict[str, Any]:
    """How the planned lengths compare with the truth, per task and over all test rows."""
    if table.quantile_gen_tokens is None:
        raise ValueError("the length table has no quantiles")
    truth, point, quantile = table.true_gen_tokens, table.predicted_gen_tokens, table.quantile_gen_tokens

    def stats(rows: np.ndarray) -> dict[str, float]:
        return {
            "truth_mean_tokens": round(float(truth[rows].mean()), 1),
            "point_mean_tokens": round(float(point[rows].mean()), 1),
            "quantile_mean_tokens": round(float(quantile[rows].mean()), 1),
            "point_covers": round(float((truth[rows] <= point[rows]).mean()), 3),
            "quantile_covers": round(float((truth[rows] <= quantile[rows]).mean()), 3),
        }

    per_task = {task: stats(table.task_index == i) for i, task in enumerate(table.tasks)}
    return {"predictor": table.predictor, "all": stats(np.ones(len(truth), dtype=bool)), "per_task": per_task}


def compare(rows: dict[str, list[RunMetrics]]) -> list[dict[str, Any]]:
    """One entry per (policy, rate): both plans' metrics side by side."""
    entries = []
    for point, quantile in zip(rows["point"], rows["quantile"], strict=True):
        entries.append({
            "policy": point.policy, "rate_per_s": point.rate_per_s, "num_requests": point.num_requests,
            **{plan: {c: getattr(run, c) for c in COLUMNS} for plan, run in (("point", point), ("quantile", quantile))},
        })
    return entries


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per policy and plan: OOMs summed over the rates, and the best steady req/s over them."""
    summary: dict[str, Any] = {}
    for policy in dict.fromkeys(e["policy"] for e in runs):
        mine = [e for e in runs if e["policy"] == policy]
        summary[policy] = {
            plan: {"num_oom": sum(e[plan]["num_oom"] for e in mine),
                   "max_requests_per_s": round(max(e[plan]["requests_per_s"] for e in mine), 3)}
            for plan in PLANS
        }
    return summary


def markdown(report: dict[str, Any]) -> str:
    lines = [
        f"# Planning at the point prediction vs at the calibrated p{round(100 * report['quantile'])}",
        "",
        f"Command: `{report['command']}` ({report['duration_s']:.0f} s on the 2-core dev machine).",
        "",
        report["setup"],
        "",
        "## Summary: OOM splits summed over the rates, and the best steady req/s over them",
        "",
        "| scenario | policy | OOM point | OOM quantile | best req/s point | best req/s quantile |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for name, scenario in report["scenarios"].items():
        for policy, plans in scenario["summary"].items():
            p, q = plans["point"], plans["quantile"]
            lines.append(f"| {name} | {policy} | {p['num_oom']} | {q['num_oom']} | {p['max_requests_per_s']:.2f} |"
                         f" {q['max_requests_per_s']:.2f} |")
    lines.append("")
    for name, scenario in report["scenarios"].items():
        table = scenario["lengths"]
        lines += [
            f"## {name}: {table['predictor']}",
            "",
            f"Test rows: true mean {table['all']['truth_mean_tokens']} tokens; point mean {table['all']['point_mean_tokens']}"
            f" (covers {table['all']['point_covers']:.1%} of rows); quantile mean {table['all']['quantile_mean_tokens']}"
            f" (covers {table['all']['quantile_covers']:.1%})."
            + ("" if scenario["left_out"] is None else
               f" The left-out task's rows: true mean {table['per_task'][scenario['left_out']]['truth_mean_tokens']},"
               f" point mean {table['per_task'][scenario['left_out']]['point_mean_tokens']} (covers"
               f" {table['per_task'][scenario['left_out']]['point_covers']:.1%}), quantile mean"
               f" {table['per_task'][scenario['left_out']]['quantile_mean_tokens']} (covers"
               f" {table['per_task'][scenario['left_out']]['quantile_covers']:.1%})."),
            "",
            "| policy | rate | req/s point | req/s quantile | OOM point | OOM quantile | mean lat s point | mean lat s quantile |"
            " p99 lat s point | p99 lat s quantile | mean batch point | mean batch quantile |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for e in scenario["runs"]:
            p, q = e["point"], e["quantile"]
            lines.append(
                f"| {e['policy']} | {e['rate_per_s']:g} | {p['requests_per_s']:.2f} | {q['requests_per_s']:.2f} |"
                f" {p['num_oom']} | {q['num_oom']} | {p['mean_latency_s']:.1f} | {q['mean_latency_s']:.1f} |"
                f" {p['p99_latency_s']:.1f} | {q['p99_latency_s']:.1f} | {p['mean_batch_size']:.1f} | {q['mean_batch_size']:.1f} |"
            )
        lines.append("")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.getLogger("services.batcher").setLevel(logging.ERROR)  # each simulated OOM would log a warning
    started_s = time.monotonic()
    cost = make_cost_model(args.cost_model)
    hardware = Hardware.llama2_7b(args.gpu_memory_gib, args.memory_utilization, 1)
    phi = args.phi
    scenarios: dict[str, Any] = {}
    for left_out in [None, *args.left_out]:
        name = "in_distribution" if left_out is None else f"without_{left_out}"
        table = load_lengths(args.data, model_name=SERVED_MODEL, show_progress=False,
                             plan_quantile=args.quantile, left_out_task=left_out)
        spec = SweepSpec(
            tuple(p.strip() for p in args.policies.split(",")), tuple(float(r) for r in args.rates.split(",")),
            args.duration_s, phi, safe_fixed_batch_size(table, hardware, args.max_new_tokens), None,
            args.max_new_tokens, "poisson", args.seed, args.memory_fill,
        )
        rows = {plan: run_sweep(replace(spec, is_planned_at_quantile=plan == "quantile"), table, cost, hardware,
                                show_progress=False) for plan in PLANS}
        runs = compare(rows)
        scenarios[name] = {"left_out": left_out, "lengths": table_summary(table), "summary": summarize(runs),
                           "runs": runs}
        print(name, json.dumps(scenarios[name]["lengths"]["all"]), flush=True)
    command = "python -m services.batcher.simulate.plan_quantile " + shlex.join(argv if argv is not None else sys.argv[1:])
    report = {
        "command": command.strip(),
        "duration_s": round(time.monotonic() - started_s, 1),
        "quantile": args.quantile,
        "setup": (
            f"Cost model {cost.name} ({cost.description}); one worker, Theta = {hardware.free_kv_bytes / 1e9:.1f} GB"
            f" ({hardware.free_kv_bytes // hardware.kv_bytes_per_token} KV tokens, Llama-2-7B shape); Poisson arrivals over"
            f" {args.duration_s:g} s per run, 8 tasks in equal shares (test rows); generation capped at"
            f" {args.max_new_tokens}; the policies fill at most {args.memory_fill:g} of Theta with planned lengths;"
            f" Phi = {phi:g} token reads. OOM = a batch whose true KV footprint outgrew Theta: the worker reports it,"
            " the scheduler splits and requeues it. req/s counts completions from 10 % of the arrival window to its end."
        ),
        "scenarios": scenarios,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "plan_quantile.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    (args.out / "plan_quantile.md").write_text(markdown(report), encoding="utf-8")
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
