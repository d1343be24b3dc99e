"""Table, plots and reports/gpu/e2e.json from the raw files bench/gpu_e2e.py wrote.

    python bench/gpu_e2e_report.py RAW.json[.gz] [RAW2.json ...] --device "NVIDIA H200" --out reports/gpu

Per policy and rate: request throughput = answered / (last answer - first arrival), mean and p99
latency (client side), valid-token throughput (tokens some request asked for) and total-token
throughput (slots the engine computed, padding and finished rows included), batches, OOM splits,
and the predictor's and estimator's errors on the replayed traffic. A rate counts as sustained when
the throughput is at least `SUSTAINED_SHARE` of it; a policy's saturation throughput is its highest
measured throughput.
"""

from __future__ import annotations

import argparse
import gzip
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.percentile import nearest_rank  # noqa: E402
from services.batcher.policy.config import CONTINUOUS_POLICY_NAMES  # noqa: E402

SUSTAINED_SHARE = 0.9
ORDER = ("vs", "ccb", "magnus_ccb", "greedy", "glp", "abp", "magnus", "magnus_sw", "magnus_pack", "oracle",
         "oracle_pack")


def summarize_rate(rate: float, measured: dict) -> dict:
    records, batches = measured["requests"], measured["batches"]
    ok = [r for r in records if r["status"] == "OK"]
    makespan_s = max((r["done_s"] for r in ok), default=float("nan"))
    latencies = [r["latency_s"] for r in ok]
    done_batches = [b for b in batches if b["outcome"] == "ok"]
    timed = [b for b in done_batches if b["estimated_s"] and b["actual_s"] is not None]
    return {
        "offered_rate_per_s": rate,
        "requests": len(records),
        "answered_ok": len(ok),
        "errors": len(records) - len(ok),
        "requests_per_s": len(ok) / makespan_s,
        "mean_latency_s": statistics.fmean(latencies) if latencies else float("nan"),
        "p50_latency_s": nearest_rank(latencies, 0.5),
        "p99_latency_s": nearest_rank(latencies, 0.99),
        "mean_queue_wait_s": statistics.fmean(r["queue_wait_s"] for r in ok) if ok else float("nan"),
        "valid_tokens_per_s": sum(r["generated_tokens"] for r in ok) / makespan_s,
        "total_tokens_per_s": sum(b["total_tokens"] or 0 for b in done_batches) / makespan_s,
        "batches": len(done_batches),
        "mean_batch_size": statistics.fmean(b["size"] for b in done_batches) if done_batches else float("nan"),
        "oom_batches": sum(b["outcome"] == "oom" for b in batches),
        "estimator_mae_s": statistics.fmean(abs(b["estimated_s"] - b["actual_s"]) for b in timed) if timed else None,
        "mean_batch_s": statistics.fmean(b["actual_s"] for b in done_batches if b["actual_s"]) if done_batches else None,
        "predictor_mae_tokens": statistics.fmean(abs(r["predicted_tokens"] - r["true_gen_tokens"]) for r in ok)
        if ok else float("nan"),
        "generated_equals_true": all(r["generated_tokens"] == r["true_gen_tokens"] for r in ok),
        "mean_latency_by_arrival_quarter_s": latency_by_arrival_quarter(ok),
    }


def latency_by_arrival_quarter(ok: list[dict]) -> list[float]:
    """Mean latency of the first, second, third and last quarter of a phase's answered requests in
    arrival order: a queue that keeps growing shows as a rising last quarter, one that has settled
    as a plateau (whether a policy sustains a rate, beyond its answered share)."""
    ordered = [r["latency_s"] for r in sorted(ok, key=lambda r: r["sent_s"])]
    quarter = len(ordered) // 4
    if quarter == 0:
        return []
    bounds = [0, quarter, 2 * quarter, 3 * quarter, len(ordered)]
    return [statistics.fmean(ordered[start:end]) for start, end in zip(bounds, bounds[1:])]


def merge_raw(paths: list[Path]) -> tuple[dict, list[str], dict]:
    """Policies from several runs (a later file's policy replaces an earlier one's)."""
    policies, commands, setup = {}, [], {}
    for path in paths:
        text = gzip.decompress(path.read_bytes()).decode() if path.suffix == ".gz" else path.read_text()
        raw = json.loads(text)
        commands.append(raw["command"])
        setup.setdefault("runs", []).append(raw.get("setup", {}))
        for name, result in raw["policies"].items():
            if result["rates"]:
                policies[name] = result
    return policies, commands, setup


def summarize(policies: dict) -> dict:
    summary = {}
    for name in sorted(policies, key=lambda n: ORDER.index(n) if n in ORDER else len(ORDER)):
        rates = {float(r): summarize_rate(float(r), m) for r, m in policies[name]["rates"].items()}
        sustained = [r for r, s in rates.items() if s["requests_per_s"] >= SUSTAINED_SHARE * r and not s["errors"]]
        summary[name] = {
            "fixed_batch_size": policies[name].get("fixed_batch_size"),
            "saturated_requests_per_s": max(s["requests_per_s"] for s in rates.values()),
            "highest_sustained_rate_per_s": max(sustained, default=None),
            "mean_latency_s": {_key(r): s["mean_latency_s"] for r, s in sorted(rates.items())},
            "p99_latency_s": {_key(r): s["p99_latency_s"] for r, s in sorted(rates.items())},
            "rates": {_key(r): s for r, s in sorted(rates.items())},
        }
        counters = {_key(float(r)): m["worker_counters"] for r, m in policies[name]["rates"].items()
                    if "worker_counters" in m}
        if counters:  # continuous workers: per phase and worker (bench/e2e_paged.py)
            summary[name]["worker_counters"] = counters
    return summary


def _key(rate: float) -> str:
    return f"{rate:g}"


def diagnose(policies: dict) -> dict:
    """Where each policy's time went in its highest-rate phase, against the engine's own model.

    engine_model_s: the linear batch-time model fitted to bench/gpu_engine.py's isolated timings
    (LinearBatchCost defaults) at each batch's actual shape; overhead_s: measured minus that (graph
    captures of new shapes, tokenizing, host work per batch); lost_to_underprediction_s: the model's
    time at the actual G(B) minus at the predicted G(B), over batches that ran longer than planned.
    """
    from services.batcher.policy.pack_cost import LinearBatchCost

    cost, out = LinearBatchCost(), {}
    for name, result in policies.items():
        if name in CONTINUOUS_POLICY_NAMES or result.get("is_continuous"):  # one lease per request: no batch sums
            continue
        rate = max(result["rates"], key=float)
        batches = [b for b in result["rates"][rate]["batches"] if b["outcome"] == "ok"]
        model = [cost.batch_s(b["size"], b["input_tokens_max"], b["actual_gen_tokens_max"]) for b in batches]
        planned = [cost.batch_s(b["size"], b["input_tokens_max"], b["predicted_gen_tokens_max"]) for b in batches]
        out[name] = {
            "rate_per_s": float(rate),
            "batches": len(batches),
            "distinct_batch_sizes": len({b["size"] for b in batches}),
            "measured_s": sum(b["actual_s"] for b in batches),
            "engine_model_s": sum(model),
            "overhead_s": sum(b["actual_s"] for b in batches) - sum(model),
            "lost_to_underprediction_s": sum(max(0.0, m - p) for m, p in zip(model, planned, strict=True)),
            "padding_share_of_token_slots": 1 - sum(b["valid_tokens"] or 0 for b in batches)
            / max(1, sum(b["total_tokens"] or 0 for b in batches)),
            "mean_batch_size": statistics.fmean(b["size"] for b in batches) if batches else 0.0,
            "largest_batch": max((b["size"] for b in batches), default=0),
            # the batch's longest request as planned and as it ran: under-prediction lets the KV cap admit more
            "mean_predicted_gen_max": statistics.fmean(b["predicted_gen_tokens_max"] for b in batches) if batches else 0.0,
            "mean_actual_gen_max": statistics.fmean(b["actual_gen_tokens_max"] for b in batches) if batches else 0.0,
        }
    return out


def diagnosis_table(diagnosis: dict) -> str:
    lines = [
        "| policy | batches | sizes | mean / largest batch | longest request predicted / actual | measured s "
        "| engine model s | overhead s | lost to under-prediction s | padding share |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, d in diagnosis.items():
        lines.append(
            f"| {name} | {d['batches']} | {d['distinct_batch_sizes']} | {d['mean_batch_size']:.1f} / {d['largest_batch']} "
            f"| {d['mean_predicted_gen_max']:.0f} / {d['mean_actual_gen_max']:.0f} | {d['measured_s']:.1f} "
            f"| {d['engine_model_s']:.1f} | {d['overhead_s']:.1f} | {d['lost_to_underprediction_s']:.1f} "
            f"| {d['padding_share_of_token_slots']:.2f} |"
        )
    return "\n".join(lines)


def headline(summary: dict) -> dict:
    """Each policy against vs: the issue's two targets (throughput at saturation; mean latency at the
    highest rate vs sustains), plus magnus against ccb and the oracles."""
    if "vs" not in summary:
        return {}
    vs = summary["vs"]
    rate = vs["highest_sustained_rate_per_s"]
    out: dict = {"vs_saturated_requests_per_s": vs["saturated_requests_per_s"], "latency_rate_per_s": rate}
    for name, result in summary.items():
        if name == "vs":
            continue
        entry = {"throughput_x_vs": result["saturated_requests_per_s"] / vs["saturated_requests_per_s"]}
        if rate is not None and _key(rate) in result["mean_latency_s"]:
            entry["mean_latency_x_vs"] = result["mean_latency_s"][_key(rate)] / vs["mean_latency_s"][_key(rate)]
        out[name] = entry
    for name in ("magnus", "magnus_pack", "magnus_ccb"):
        for other in ("ccb", "oracle", "oracle_pack"):
            if name in summary and other in summary:
                out[f"throughput_{name}_x_{other}"] = (
                    summary[name]["saturated_requests_per_s"] / summary[other]["saturated_requests_per_s"]
                )
    return out


def latency_floor(policies: dict, step_ms: float, prefill_s: float) -> dict:
    """Per rate, the mean latency no scheduler could beat on this engine: each request decoding alone
    (`step_ms` per token: a one-row step), one prefill (`prefill_s`) and the RPC path as measured
    (latency - queue wait - run, mean over the policies' requests); against vs's measured mean."""
    if "vs" not in policies:
        return {}
    floors = {}
    for rate, measured in policies["vs"]["rates"].items():
        ok = [r for r in measured["requests"] if r["status"] == "OK"]
        rpc = [r["latency_s"] - r["queue_wait_s"] - r["run_s"] for p in policies.values()
               for r in p["rates"].get(rate, {}).get("requests", []) if r["status"] == "OK"]
        if not ok or not rpc:
            continue
        rpc_s = statistics.fmean(rpc)
        floor_s = statistics.fmean(r["true_gen_tokens"] * step_ms / 1e3 + prefill_s + rpc_s for r in ok)
        vs_s = statistics.fmean(r["latency_s"] for r in ok)
        floors[_key(float(rate))] = {"floor_s": floor_s, "vs_mean_latency_s": vs_s, "floor_x_vs": floor_s / vs_s,
                                     "rpc_s": rpc_s}
    return {"step_ms": step_ms, "prefill_s": prefill_s, "rates": floors}


def table(summary: dict) -> str:
    lines = [
        "| policy | rate /s | req/s | mean s | by arrival quarter s | p99 s | valid tok/s | total tok/s | batches "
        "| mean size | OOM | pred MAE | est MAE s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, result in summary.items():
        for rate, s in result["rates"].items():
            est = f"{s['estimator_mae_s']:.2f}" if s["estimator_mae_s"] is not None else "-"
            lines.append(
                f"| {name} | {rate} | {s['requests_per_s']:.1f} | {s['mean_latency_s']:.2f} "
                f"| {' / '.join(f'{q:.2f}' for q in s['mean_latency_by_arrival_quarter_s'])} | {s['p99_latency_s']:.2f} "
                f"| {s['valid_tokens_per_s']:.0f} | {s['total_tokens_per_s']:.0f} | {s['batches']} "
                f"| {s['mean_batch_size']:.1f} | {s['oom_batches']} | {s['predictor_mae_tokens']:.1f} | {est} |"
            )
    return "\n".join(lines)


def plot(summary: dict, diagnosis: dict, out: Path) -> None:
    """Bars: throughput at the highest rate, mean latency per rate, and where saturation time went."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    names = list(summary)
    figure, axes = plt.subplots(1, 3, figsize=(17, 4.8))
    saturated = [summary[n]["saturated_requests_per_s"] for n in names]
    axes[0].bar(names, saturated, color=["tab:grey" if n == "vs" else "tab:blue" for n in names])
    if "vs" in summary:
        axes[0].axhline(2.5 * summary["vs"]["saturated_requests_per_s"], color="tab:red", linestyle="--",
                        label="2.5 x vs (target)")
        axes[0].legend()
    axes[0].set_title("requests/s at the highest offered rate")
    rates = sorted({r for n in names for r in summary[n]["rates"]}, key=float)[:-1] or sorted(
        {r for n in names for r in summary[n]["rates"]}, key=float)
    width = 0.8 / len(rates)
    for i, rate in enumerate(rates):
        values = [summary[n]["mean_latency_s"].get(rate, np.nan) for n in names]
        axes[1].bar(np.arange(len(names)) + i * width, values, width, label=f"{rate} req/s")
    axes[1].set_xticks(np.arange(len(names)) + width * (len(rates) - 1) / 2, names)
    axes[1].set_title("mean latency, s (Poisson arrivals)")
    axes[1].legend()
    shown = [n for n in names if n in diagnosis]
    model = [diagnosis[n]["engine_model_s"] for n in shown]
    overhead = [max(0.0, diagnosis[n]["overhead_s"]) for n in shown]
    axes[2].bar(shown, model, label="engine model at the batches' actual shapes")
    axes[2].bar(shown, overhead, bottom=model, label="measured beyond it (captures, host work)")
    axes[2].set_title("worker seconds in the highest-rate phase")
    axes[2].legend()
    for axis in axes:
        axis.tick_params(axis="x", rotation=30)
        axis.grid(alpha=0.3, axis="y")
    figure.tight_layout()
    figure.savefig(out, dpi=110)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("raw", type=Path, nargs="+")
    parser.add_argument("--device", required=True, help="the GPU the raw files were measured on")
    parser.add_argument("--out", type=Path, default=Path("reports/gpu"))
    parser.add_argument("--floor-step-ms", type=float, default=0.0,
                        help="a one-row decode step on this device (bench/gpu_continuous_steps.py): adds the "
                        "latency floor per rate; 0 = none")
    parser.add_argument("--floor-prefill-ms", type=float, default=10.0, help="one prompt's prefill, for the floor")
    args = parser.parse_args()
    policies, commands, setup = merge_raw(args.raw)
    summary = summarize(policies)
    diagnosis = diagnose(policies)
    result = {"device": args.device, "commands": commands, "setup": setup, "headline": headline(summary),
              "saturation_diagnosis": diagnosis, "policies": summary}
    if args.floor_step_ms:
        result["latency_floor"] = floor = latency_floor(policies, args.floor_step_ms, args.floor_prefill_ms / 1e3)
        for rate, f in floor["rates"].items():
            print(f"latency floor at {rate} req/s: {f['floor_s']:.3f} s = {f['floor_x_vs']:.3f}x vs's {f['vs_mean_latency_s']:.3f} s")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "e2e.json").write_text(json.dumps(result, indent=2))
    (args.out / "e2e_table.md").write_text(table(summary) + "\n\n" + diagnosis_table(diagnosis) + "\n")
    plot(summary, diagnosis, args.out / "e2e.png")
    print(table(summary))
    print(diagnosis_table(diagnosis))
    print(json.dumps(result["headline"], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
