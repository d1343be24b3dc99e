"""reports/gpu/serving.json and serving.png from what the GPU runs wrote (here, no GPU needed).

    python bench/gpu_serving_report.py --engine reports/gpu/serving_run2/serving.json \
        reports/gpu/serving_run2_peer/serving.json reports/gpu/serving_trace_pool40k/serving.json \
        --steps reports/gpu/paged_step/run4_final_sweep.json \
        --e2e reports/gpu/serving_e2e/e2e_raw.json.gz reports/gpu/serving_e2e_run5/e2e_raw.json.gz \
        reports/gpu/serving_e2e_ab/run11/new_e2e_raw.json.gz --out reports/gpu

--engine: bench/gpu_serving.py's serving.json files (the engine alone, every policy and the peer); a
workload already taken from an earlier file is added as NAME_poolTOKENS when its pool differs (the same
trace, a smaller pool), else its new policies join the earlier file's (`add_policies`);
--steps: bench/gpu_paged_step.py's sweep (the decode step against its roofline);
--e2e: bench/gpu_e2e.py --backend paged's e2e_raw.json(.gz) files (the same engine behind the five
services); a policy's figures come from the last file that ran it, its streamed ones from the last
that streamed, and "runs" keeps each file's own.
serving.json keeps the engine's figures per workload and policy, adds "steps" (16, 64 and 256 rows of
both shapes) and "end_to_end" (per policy: saturated req/s, latency at each rate, streamed too).
serving.md is written by hand around these numbers.
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.gpu_serving import plot  # noqa: E402
from bench.percentile import nearest_rank  # noqa: E402


def load(path: Path) -> dict:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as file:
        return json.load(file)


def phase_figures(phase: dict) -> dict:
    ok = [r for r in phase["requests"] if r["status"] == "OK"]
    latencies = [r["latency_s"] for r in ok]
    figures = dict(requests=len(phase["requests"]), ok=len(ok),
                   requests_per_s=round(len(ok) / max(r["done_s"] for r in ok), 2),
                   mean_latency_s=round(sum(latencies) / len(latencies), 4),
                   p99_latency_s=round(nearest_rank(latencies, 0.99), 4),
                   mean_queue_wait_s=round(sum(r["queue_wait_s"] for r in ok) / len(ok), 4))
    ttft = [r["ttft_s"] for r in ok if "ttft_s" in r]
    if ttft:
        figures.update(ttft_p50_s=round(nearest_rank(ttft, 0.5), 4), ttft_p99_s=round(nearest_rank(ttft, 0.99), 4))
    for worker in phase.get("worker_counters", {}).values():
        figures.update(mean_running_requests=round(worker["mean_running_requests"], 1),
                       preemptions=int(worker["preemptions"]), recomputed_tokens=int(worker["recomputed_tokens"]))
    return figures


def end_to_end(raw: dict) -> dict:
    result = {"command": raw["command"], "policies": {}}
    for policy, entry in raw["policies"].items():
        out = result["policies"][policy] = {}
        for key, label in (("rates", "unstreamed"), ("streamed_rates", "streamed")):
            for rate, phase in entry.get(key, {}).items():
                out.setdefault(label, {})[rate] = phase_figures(phase)
        rates = sorted(out.get("unstreamed", {}), key=float)
        if rates:
            out["saturated_requests_per_s"] = out["unstreamed"][rates[-1]]["requests_per_s"]
            if len(rates) > 1:
                out["mean_latency_s"] = out["unstreamed"][rates[0]]["mean_latency_s"]
                out["p99_latency_s"] = out["unstreamed"][rates[0]]["p99_latency_s"]
        if "streamed" in out and rates:
            out["streamed_over_unstreamed_saturated"] = round(
                out["streamed"][rates[-1]]["requests_per_s"] / out["saturated_requests_per_s"], 3)
    return result


def add_policies(known: dict, workload: dict, report: dict) -> None:
    """A later run of a workload already taken (same pool): its policies the first run lacks join it
    (e.g. a peer whose phases the first run's time budget skipped); those it has are kept apart as
    `repeats`, with that run's date, so a ratio can be taken within one run."""
    for policy, figures in workload["policies"].items():
        if policy in known["policies"]:
            known.setdefault("repeats", []).append(dict(policy=policy, date=report["date"], **figures))
        else:
            known["policies"][policy] = dict(figures, date=report["date"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engine", type=Path, nargs="+", required=True)
    parser.add_argument("--steps", type=Path, required=True)
    parser.add_argument("--e2e", type=Path, nargs="+", required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    report = load(args.engine[0])
    for path in args.engine[1:]:
        more = load(path)
        for name, workload in more["workloads"].items():
            known = report["workloads"].get(name)
            if known is not None and known.get("pool_tokens") == workload.get("pool_tokens"):
                add_policies(known, workload, more)
                continue
            key = name if known is None else f"{name}_pool{workload.get('pool_tokens', 0)}"
            report["workloads"][key] = workload
        report["commands"] = report["commands"] + more["commands"]
    sweep = load(args.steps)
    report["steps"] = [dict(shape=r["shape"], rows=r["rows"], mean_context=r["mean_context"],
                            step_ms=round(r["step_ms"], 3), roofline_ms=round(r["roofline_ms"], 3),
                            ratio=round(r["step_ms"] / r["roofline_ms"], 3), bound=r["bound"])
                       for r in sweep["rows"] if r["rows"] in (16, 64, 256)]
    report["steps_source"] = dict(command=sweep["command"], date=sweep["date"], device=sweep["device"])
    runs = [end_to_end(load(path)) for path in args.e2e]
    merged: dict = {}
    for run in runs:
        for policy, figures in run["policies"].items():
            entry = merged.setdefault(policy, {})
            streamed = {k: v for k, v in figures.items() if k.startswith("streamed")}
            if "unstreamed" in figures:  # the latest unstreamed run wins; streamed figures only with their run
                entry.update({k: v for k, v in figures.items() if not k.startswith("streamed")},
                             command=run["command"])
            if streamed:
                entry.update(streamed, streamed_command=run["command"])
    report["end_to_end"] = dict(policies=merged, runs=runs)
    report["commands"] = report["commands"] + [run["command"] for run in runs] + ["python " + " ".join(sys.argv)]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "serving.json").write_text(json.dumps(report, indent=1))
    plot(report, args.out / "serving.png")
    print(json.dumps(report["end_to_end"]["policies"], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
