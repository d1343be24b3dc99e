"""`python -m services.batcher.simulate.phi_sweep`: how the WMA threshold Phi moves magnus's
throughput and latency, to choose the default (services/batcher/config.py).

Scale note: by the paper's formula a batch of identical requests has WMA = L + G (the waiting sum
always counts the last step), so Phi must exceed the L + G of the longest requests for them to be
batched at all, and a given Phi tolerates a G spread of roughly Phi / (L + G) tokens: wide for
short requests, narrow for long ones. Phi is therefore tied to the workload's length scale; the
sweep below is for the 8 paper tasks (L, G mostly under 300 Qwen tokens, tails to 2,000).
"""

from __future__ import annotations

import argparse
import logging
import json
import sys
import time
from pathlib import Path

from services.batcher.simulate.cost_model import LLAMA2_7B_KV_BYTES_PER_TOKEN, LLAMA2_7B_WEIGHT_BYTES, make_cost_model
from services.batcher.simulate.engine import Hardware
from services.batcher.simulate.sweep import SweepSpec, run_sweep, safe_fixed_batch_size
from services.batcher.simulate.workload import load_lengths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m services.batcher.simulate.phi_sweep", description=__doc__)
    parser.add_argument("--data", type=Path, default=Path("../shared/data"))
    parser.add_argument("--out", type=Path, default=Path("reports/simulation/phi_sweep"))
    parser.add_argument("--cost-model", default="h200-hf-generate")
    parser.add_argument("--phis", default="2000,5000,10000,20000,50000,100000,200000,1000000")
    parser.add_argument("--rates", default="6,14", help="a loaded and an overloaded rate, req/s")
    parser.add_argument("--duration-s", type=float, default=1200.0)
    parser.add_argument("--memory-fill", type=float, default=0.85)
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    logging.getLogger("services.batcher").setLevel(logging.ERROR)  # each simulated OOM would log a warning
    started_s = time.monotonic()
    cost = make_cost_model(args.cost_model)
    free_kv_bytes = int(0.9 * 80 * 2**30) - LLAMA2_7B_WEIGHT_BYTES
    hardware = Hardware(LLAMA2_7B_KV_BYTES_PER_TOKEN, free_kv_bytes)
    table = load_lengths(args.data, show_progress=not args.quiet)
    rates = tuple(float(r) for r in args.rates.split(","))
    rows = []
    for phi in (float(p) for p in args.phis.split(",")):
        spec = SweepSpec(
            ("magnus",), rates, args.duration_s, phi, safe_fixed_batch_size(table, hardware, 2048), None, 2048,
            "poisson", 0, args.memory_fill,
        )
        for m in run_sweep(spec, table, cost, hardware, show_progress=not args.quiet):
            rows.append({"phi_token_reads": phi, **m.row()})
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "phi_sweep.json").write_text(json.dumps(rows, indent=1) + "\n")
    command = "python -m services.batcher.simulate.phi_sweep " + " ".join(argv if argv is not None else sys.argv[1:])
    lines = [
        f"# Phi sweep: magnus, cost model {cost.name}",
        "",
        f"Command: `{command}` ({time.monotonic() - started_s:.0f} s on the 2-core dev machine). Same workload, memory and"
        f" cost model as the ablation report (Poisson arrivals, {args.duration_s:g} s per run, memory fill {args.memory_fill:g}).",
        "",
        "| Phi (token reads) | rate | req/s | mean lat s | p99 lat s | mean batch | OOM |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['phi_token_reads']:g} | {r['rate_per_s']:g} | {r['requests_per_s']:.2f} | {r['mean_latency_s']:.1f} |"
            f" {r['p99_latency_s']:.1f} | {r['mean_batch_size']:.1f} | {r['num_oom']} |"
        )
    (args.out / "phi_sweep.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
