"""Render reports/gpu/engine.md and engine.png from the JSON bench/gpu_engine.py wrote.

python bench/gpu_engine_report.py reports/gpu/engine.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

TARGET_BATCH1, TARGET_BATCH32 = 2.0, 1.5


def verdict(row: dict) -> str:
    if row["batch"] == 1:
        return "ok" if row["ratio"] <= TARGET_BATCH1 else "over 2x"
    if row["batch"] >= 32:
        return "ok" if row["ratio"] <= TARGET_BATCH32 else "over 1.5x"
    return ""


def table(rows: list[dict]) -> str:
    lines = [
        "| engine | batch | prompt tokens | decode step ms | roofline ms | ratio | target | prefill ms | tokens/s |",
        "|---|---:|---:|---:|---:|---:|---|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['engine']} | {r['batch']} | {r['prompt_tokens']} | {r['decode_step_ms']:.2f} | "
            f"{r['roofline_step_ms']:.2f} | {r['ratio']:.2f}x | {verdict(r)} | {r['prefill_ms']:.1f} | "
            f"{r['decode_tokens_per_s']:.0f} |"
        )
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    figure, axis = plt.subplots(figsize=(8, 4.5))
    for engine in sorted({r["engine"] for r in rows}):
        for prompt in sorted({r["prompt_tokens"] for r in rows if r["engine"] == engine}):
            points = sorted((r["batch"], r["ratio"]) for r in rows if r["engine"] == engine and r["prompt_tokens"] == prompt)
            axis.plot(*zip(*points), marker="o", label=f"{engine}, L={prompt}")
    axis.axhline(TARGET_BATCH32, color="gray", linestyle="--", linewidth=1)
    axis.axhline(TARGET_BATCH1, color="gray", linestyle=":", linewidth=1)
    axis.set_xscale("log", base=2)
    axis.set_xlabel("batch size")
    axis.set_ylabel("decode step / roofline")
    axis.set_title("Decode step against the memory-bandwidth roofline (Llama-2-7B shape)")
    axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main() -> None:
    source = Path(sys.argv[1])
    data = json.loads(source.read_text())
    plot(data["rows"], source.with_suffix(".png"))
    print(table(data["rows"]))


if __name__ == "__main__":
    main()
