"""`python -m services.batcher.simulate`: the paper's ablation (vs, glp, abp, magnus, oracle) over
request rates, with the real policy code, real task lengths and predictions, and a GPU cost model.

Writes results.csv, PNG plots, summary.md and summary.json to --out.
"""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
import time
from pathlib import Path

from services.batcher.config import BatcherSettings
from services.batcher.policy.config import POLICY_NAMES
from services.batcher.simulate.cost_model import (
    LLAMA2_7B_WEIGHT_BYTES,
    PROFILES,
    make_cost_model,
)
from services.batcher.simulate.engine import Hardware
from services.batcher.simulate.report import write_report
from services.batcher.simulate.sweep import SweepSpec, run_sweep, safe_fixed_batch_size
from services.batcher.simulate.workload import load_lengths

DEFAULT_PHI = BatcherSettings.model_fields["phi_token_reads"].default
TRACES = {"conv": "traces/azure2023_conv.csv", "code": "traces/azure2023_code.csv"}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m services.batcher.simulate", description=__doc__)
    parser.add_argument("--data", type=Path, default=Path("../shared/data"), help="folder with the task .jsonl files")
    parser.add_argument("--out", type=Path, default=Path("reports/simulation/ablation"))
    parser.add_argument("--cost-model", default="h200-hf-generate", choices=sorted(PROFILES))
    parser.add_argument("--policies", default=",".join(POLICY_NAMES))
    parser.add_argument("--rates", default="1,2,4,6,8,10,14,20,28", help="request rates, req/s, comma-separated")
    parser.add_argument("--duration-s", type=float, default=1200.0, help="arrival window of each run, s")
    parser.add_argument("--arrivals", default="poisson", choices=["poisson", *TRACES], help="Poisson or a real trace")
    parser.add_argument("--phi", type=float, default=DEFAULT_PHI, help="WMA threshold Phi, token reads")
    parser.add_argument("--fixed-batch-size", type=int, default=0, help="vs/glp batch size; 0 = largest OOM-safe")
    parser.add_argument("--max-batch-size", type=int, default=0, help="ceiling for abp/magnus/oracle; 0 = none")
    parser.add_argument("--memory-fill", type=float, default=0.85, help="abp/magnus: share of Theta filled by predictions")
    parser.add_argument("--max-new-tokens", type=int, default=2048, help="cap on every request's generation")
    parser.add_argument("--gpu-memory-gib", type=float, default=80.0)
    parser.add_argument("--memory-utilization", type=float, default=0.9, help="share of GPU memory for weights + KV")
    parser.add_argument("--num-workers", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    args.policy_list = tuple(p.strip() for p in args.policies.split(","))
    args.rate_list = tuple(float(r) for r in args.rates.split(","))
    if unknown := set(args.policy_list) - set(POLICY_NAMES):
        parser.error(f"unknown policies {sorted(unknown)}")
    if min(args.rate_list) <= 0 or args.duration_s <= 0:
        parser.error("rates and --duration-s must be > 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.getLogger("services.batcher").setLevel(logging.ERROR)  # each simulated OOM would log a warning
    started_s = time.monotonic()
    cost = make_cost_model(args.cost_model)
    hardware = Hardware.llama2_7b(args.gpu_memory_gib, args.memory_utilization, args.num_workers)
    table = load_lengths(args.data, show_progress=not args.quiet)
    fixed = args.fixed_batch_size or safe_fixed_batch_size(table, hardware, args.max_new_tokens)
    arrivals = "poisson" if args.arrivals == "poisson" else str(args.data / TRACES[args.arrivals])
    spec = SweepSpec(
        args.policy_list, args.rate_list, args.duration_s, args.phi, fixed,
        args.max_batch_size or None, args.max_new_tokens, arrivals, args.seed, args.memory_fill,
    )
    rows = run_sweep(spec, table, cost, hardware, show_progress=not args.quiet)
    command = "python -m services.batcher.simulate " + shlex.join(argv if argv is not None else sys.argv[1:])
    header = [
        f"# Ablation: {', '.join(spec.policies)}; cost model {cost.name}",
        "",
        f"Command: `{command}` ({time.monotonic() - started_s:.0f} s on this machine).",
        f"Cost model: {cost.description}. Fitted: prefill {cost.prefill_base_s:.3f} s + {1e6 * cost.prefill_s_per_token:.1f} us"
        f" per padded prompt token; decode step {1e3 * cost.step_base_s:.2f} ms + {1e6 * cost.step_s_per_row:.1f} us per row"
        f" + {1e9 * cost.step_s_per_kv_token:.0f} ns per KV token read.",
        f"Memory: Delta = {hardware.kv_bytes_per_token} B/token (Llama-2-7B shape), Theta = {args.memory_utilization:g} x"
        f" {args.gpu_memory_gib:g} GiB - {LLAMA2_7B_WEIGHT_BYTES / 1e9:.2f} GB weights = {hardware.free_kv_bytes / 1e9:.1f} GB"
        f" ({hardware.free_kv_bytes // hardware.kv_bytes_per_token} KV tokens); {hardware.num_workers} worker(s).",
        f"Workload: {', '.join(table.tasks)} in equal shares, test-split rows only ({len(table.input_tokens)} rows, drawn"
        f" with replacement), lengths in Qwen tokens; generation capped at {spec.max_new_tokens}; arrivals {args.arrivals}"
        f" over {spec.duration_s:g} s per run (requests = rate x duration).",
        f"Predictions: {table.predictor}; MAE on these rows {table.mae_tokens():.1f} tokens. oracle uses the true lengths.",
        f"Policies: Phi = {spec.phi_token_reads:g} token reads; vs/glp fixed batch size {spec.fixed_batch_size}"
        " (largest that cannot run out of KV memory with the longest prompt + max_new_tokens per row, unless given);"
        f" abp/magnus/oracle batch ceiling {spec.max_batch_size or 'none (memory cap only)'};"
        f" abp/magnus fill at most {spec.memory_fill_fraction:g} of Theta by predicted lengths.",
        "Throughput (req/s) counts completions from 10 % of the arrival window to its end; token throughputs are over"
        " the whole run. valid tokens = tokens generated for requests; total = rows x decode steps of every batch run"
        " (padding rows after a request ended and OOM'd runs included).",
    ]
    write_report(rows, args.out, f"{cost.name}: {cost.description}", header)
    print((args.out / "summary.md").read_text().split("## Every run")[0])
    return 0


if __name__ == "__main__":
    sys.exit(main())
