"""reports/gpu/scaling.{json,md} from a `bench/gpu_e2e.py --workers 1,2 --kill-one N` run (issue 21).

Per worker count k, of one policy: the saturated throughput (the burst phase: answered requests over
the time the last one was answered) and the mean latency at k x --rate, where --rate is a rate one
worker sustains (so two workers are measured at twice it). Then the kill-one burst's counts.

    python bench/gpu_scaling_report.py OUT/e2e_raw.json --policy magnus --rate 8 \\
        --device "2x NVIDIA H200" --out reports/gpu
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

THROUGHPUT_FLOOR, LATENCY_CEILING = 1.9, 1.1  # the acceptance: 2 workers vs 1


def phase_figures(phase: dict) -> tuple[float, float, int, int]:
    """(answered requests per second, mean latency s, answered, sent) of one phase."""
    ok = [r for r in phase["requests"] if r["status"] == "OK"]
    if not ok:
        return 0.0, float("nan"), 0, len(phase["requests"])
    return (len(ok) / max(r["done_s"] for r in ok), sum(r["latency_s"] for r in ok) / len(ok),
            len(ok), len(phase["requests"]))


def scaling(raw: dict, policy: str, rate: float, saturation_rate: float) -> dict:
    workers = {}
    for count, results in sorted(raw["workers"].items(), key=lambda item: int(item[0])):
        rates = results["policies"][policy]["rates"]
        at_rate = str(float(rate * int(count)))
        if at_rate not in rates or str(float(saturation_rate)) not in rates:
            sys.exit(f"{count} worker(s) have phases at {sorted(rates)} req/s, not at {at_rate} and the burst's "
                     f"{saturation_rate}: run bench/gpu_e2e.py with --rates R,2R and give --rate R")
        saturated, _, _, _ = phase_figures(rates[str(float(saturation_rate))])
        _, mean_s, answered, sent = phase_figures(rates[at_rate])
        workers[count] = {"saturated_requests_per_s": saturated, "mean_latency_s": mean_s,
                          "rate_per_s": rate * int(count), "answered_at_rate": answered, "sent_at_rate": sent}
    return workers


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("raw", type=Path)
    parser.add_argument("--policy", default="magnus")
    parser.add_argument("--rate", type=float, required=True, help="a rate one worker sustains, requests/s")
    parser.add_argument("--saturation-rate", type=float, default=400.0)
    parser.add_argument("--device", required=True)
    parser.add_argument("--out", type=Path, default=Path("reports/gpu"))
    args = parser.parse_args()
    raw = json.loads(args.raw.read_text())
    if "workers" not in raw or not {"1", "2"} <= set(raw["workers"]):
        sys.exit(f"{args.raw} has no one- and two-worker results: run bench/gpu_e2e.py --workers 1,2")
    workers = scaling(raw, args.policy, args.rate, args.saturation_rate)
    one, two = workers["1"], workers["2"]
    report = {
        "device": args.device,
        "date": datetime.date.today().isoformat(),
        "commands": [raw["command"], " ".join(["python", *sys.argv])],
        "policy": args.policy,
        "workers": workers,
        "throughput_ratio": two["saturated_requests_per_s"] / one["saturated_requests_per_s"],
        "latency_ratio": two["mean_latency_s"] / one["mean_latency_s"],
        "kill_one": raw.get("kill_one"),
    }
    report["is_throughput_met"] = report["throughput_ratio"] >= THROUGHPUT_FLOOR
    report["is_latency_met"] = report["latency_ratio"] <= LATENCY_CEILING
    kill = report["kill_one"]
    report["is_kill_one_met"] = bool(kill) and kill["answered"] == kill["sent"] and kill["duplicated"] == 0
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "scaling.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / "scaling.md").write_text(markdown(report))
    print(markdown(report))
    return 0


def markdown(report: dict) -> str:
    lines = [
        f"# GPU workers scaled out: {report['device']}, {report['date']}", "",
        f"Policy `{report['policy']}`. Commands:", "", *[f"    {c}" for c in report["commands"]], "",
        "| workers | saturated req/s | arrival rate req/s | mean latency s | answered at rate |",
        "|---|---|---|---|---|",
    ]
    for count, w in report["workers"].items():
        lines.append(f"| {count} | {w['saturated_requests_per_s']:.2f} | {w['rate_per_s']:.1f} | "
                     f"{w['mean_latency_s']:.2f} | {w['answered_at_rate']}/{w['sent_at_rate']} |")
    lines += [
        "",
        f"- Throughput, 2 workers / 1: {report['throughput_ratio']:.2f} (needs >= {THROUGHPUT_FLOOR}): "
        f"{'met' if report['is_throughput_met'] else 'NOT met'}",
        f"- Mean latency at twice the rate, 2 workers / 1 at its rate: {report['latency_ratio']:.2f} "
        f"(needs <= {LATENCY_CEILING}): {'met' if report['is_latency_met'] else 'NOT met'}",
    ]
    kill = report["kill_one"]
    if kill:
        lines.append(f"- One worker SIGKILLed {kill['killed_at_s']:.1f} s into a burst of {kill['sent']}: "
                     f"{kill['answered']} answered, {kill['duplicated']} duplicated, "
                     f"errors {kill['errors'] or 'none'}: {'met' if report['is_kill_one_met'] else 'NOT met'}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
