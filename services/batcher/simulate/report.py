"""Writing a sweep: results.csv, one PNG per metric and all in one, summary.md and summary.json."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

from services.batcher.simulate.metrics import RunMetrics  # noqa: E402
from services.batcher.simulate.sweep import saturated_requests_per_s  # noqa: E402

PLOTS = (
    ("requests_per_s", "request throughput (req/s)"),
    ("mean_latency_s", "mean latency (s)"),
    ("p99_latency_s", "p99 latency (s)"),
    ("valid_tokens_per_s", "valid-token throughput (tok/s)"),
    ("total_tokens_per_s", "total-token throughput (tok/s)"),
)


def write_csv(rows: list[RunMetrics], path: Path) -> None:
    with path.open("w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=list(rows[0].row()))
        writer.writeheader()
        writer.writerows(r.row() for r in rows)


def write_plots(rows: list[RunMetrics], out_dir: Path, title: str) -> list[str]:
    policies = list(dict.fromkeys(r.policy for r in rows))
    names = []
    fig_all, axes = plt.subplots(1, len(PLOTS), figsize=(5 * len(PLOTS), 4))
    for (key, label), ax_all in zip(PLOTS, axes, strict=True):
        fig, ax = plt.subplots(figsize=(5, 4))
        for target in (ax, ax_all):
            for policy in policies:
                mine = [r for r in rows if r.policy == policy]
                target.plot([r.rate_per_s for r in mine], [getattr(r, key) for r in mine], marker="o", label=policy)
            target.set_xlabel("request rate (req/s)")
            target.set_ylabel(label)
            if "latency" in key:
                target.set_yscale("log")
            target.grid(alpha=0.3)
            target.legend()
        ax.set_title(title, fontsize=8)
        fig.tight_layout()
        fig.savefig(out_dir / f"{key}.png", dpi=100)
        plt.close(fig)
        names.append(f"{key}.png")
    fig_all.suptitle(title, fontsize=9)
    fig_all.tight_layout()
    fig_all.savefig(out_dir / "all_metrics.png", dpi=80)
    plt.close(fig_all)
    return ["all_metrics.png", *names]


def summary(rows: list[RunMetrics], cost_model: str) -> dict:
    """The shape the issue asks for, plus the run counters per rate."""
    policies = list(dict.fromkeys(r.policy for r in rows))
    out = {"cost_model": cost_model, "policies": {}}
    for policy in policies:
        mine = [r for r in rows if r.policy == policy]
        out["policies"][policy] = {
            "saturated_requests_per_s": round(saturated_requests_per_s(rows, policy), 3),
            "mean_latency_s": {f"{r.rate_per_s:g}": round(r.mean_latency_s, 3) for r in mine},
            "p99_latency_s": {f"{r.rate_per_s:g}": round(r.p99_latency_s, 3) for r in mine},
        }
    return out


def ablation_checks(saturated: dict[str, float]) -> list[tuple[str, bool]]:
    """The acceptance claims, each with whether this run shows it."""
    checks = []
    order = [p for p in ("vs", "glp", "abp", "magnus") if p in saturated]
    for low, high in zip(order, order[1:]):
        checks.append((f"{low} < {high}", saturated[low] < saturated[high]))
    if "magnus" in saturated and "oracle" in saturated:
        checks.append(("magnus <= oracle", saturated["magnus"] <= saturated["oracle"]))
    if "magnus" in saturated and "vs" in saturated:
        checks.append(("magnus >= 2 x vs", saturated["magnus"] >= 2 * saturated["vs"]))
    return checks


def write_markdown(rows: list[RunMetrics], path: Path, header_lines: list[str], plots: list[str]) -> None:
    policies = list(dict.fromkeys(r.policy for r in rows))
    saturated = {p: saturated_requests_per_s(rows, p) for p in policies}
    lines = [*header_lines, "", "## Saturated request throughput", "", "| policy | req/s | vs. vs |", "|---|---:|---:|"]
    for p in policies:
        ratio = saturated[p] / saturated["vs"] if "vs" in saturated and saturated["vs"] > 0 else float("nan")
        lines.append(f"| {p} | {saturated[p]:.2f} | {ratio:.2f}x |")
    lines += ["", "Checks: " + ", ".join(f"{name}: {'holds' if ok else 'does NOT hold'}" for name, ok in ablation_checks(saturated))]
    if "magnus" in saturated and "oracle" in saturated and saturated["oracle"] > 0:
        gap = 1 - saturated["magnus"] / saturated["oracle"]
        lines.append(f"Gap magnus to oracle (perfect lengths): {100 * gap:.1f} % of oracle's saturated throughput.")
    lines += ["", "## Every run", "", "| policy | rate | req/s | mean lat s | p99 lat s | valid tok/s | total tok/s | mean batch | batches | OOM |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in sorted(rows, key=lambda r: (policies.index(r.policy), r.rate_per_s)):
        lines.append(
            f"| {r.policy} | {r.rate_per_s:g} | {r.requests_per_s:.2f} | {r.mean_latency_s:.2f} | {r.p99_latency_s:.2f} | "
            f"{r.valid_tokens_per_s:.0f} | {r.total_tokens_per_s:.0f} | {r.mean_batch_size:.1f} | {r.num_batches} | {r.num_oom} |"
        )
    lines += ["", *[f"![{p}]({p})" for p in plots[:1]], ""]
    path.write_text("\n".join(lines))


def write_report(rows: list[RunMetrics], out_dir: Path, cost_model: str, header_lines: list[str]) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    write_csv(rows, out_dir / "results.csv")
    plots = write_plots(rows, out_dir, header_lines[0].lstrip("# "))
    (out_dir / "summary.json").write_text(json.dumps(summary(rows, cost_model), indent=2) + "\n")
    write_markdown(rows, out_dir / "summary.md", header_lines, plots)
