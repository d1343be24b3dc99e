"""A first burst through the paged continuous engine (issue 23) with the Llama-2-7B shape, random weights.

Run on an H200 (the device tool):  PYTHONUNBUFFERED=1 python3 bench/gpu_paged_engine.py --out $OUT
On the CPU, `--smoke` runs the same code with a tiny shape: it checks the script, not the speed.

--workload mix: requests shaped like issue 23's 8-task mix (prompts 20-100 random tokens, mean ~60;
outputs drawn log-normally around ~38 tokens, 1-200); cases: a pool that does not bind (predicted
admission), then a pool that binds with predicted and greedy admission.
--workload azure_conv: the first --requests rows of ../shared/data/traces/azure2023_conv.csv (mean
prompt ~1,155, output ~211 tokens) that fit 4,096 tokens, random prompt tokens of those lengths; the
cache binds: predicted against greedy admission.
No stop token (each request runs to its recorded length, as trace replay); predictions = true length x
exp(N(0, --prediction-sigma)), a noisy oracle. All requests arrive at once; the engine steps until every
one finished. Cases run while the time budget lasts; paged_engine.json under --out after each case.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import random
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.percentile import nearest_rank  # noqa: E402
from services.worker.paged.decode_step import LLAMA2_7B, PagedDecoder, PagedModelConfig, PagedWeights  # noqa: E402
from services.worker.paged.engine import PagedEngine  # noqa: E402
from services.worker.paged.kv_blocks import BlockPool  # noqa: E402
from services.worker.paged.runner import ModelRunner  # noqa: E402
from services.worker.paged.scheduler import Scheduler, SchedulerConfig  # noqa: E402

SMOKE = PagedModelConfig(vocab_size=128, hidden_size=128, intermediate_size=192, num_layers=2, num_heads=4,
                         num_kv_heads=2, max_positions=4096)
BLOCK_TOKENS = 16


def workload(num: int, vocab: int, sigma: float, seed: int = 0) -> list[tuple[list[int], int, int]]:
    """Mix-shaped requests: (prompt token ids, true output tokens, predicted output tokens)."""
    rng = random.Random(seed)
    requests = []
    for _ in range(num):
        prompt = [rng.randrange(vocab) for _ in range(rng.randint(20, 100))]
        output = max(1, min(200, round(math.exp(rng.gauss(math.log(30), 0.7)))))
        requests.append((prompt, output, max(1, round(output * math.exp(rng.gauss(0, sigma))))))
    return requests


def trace_workload(path: Path, num: int, vocab: int, sigma: float, max_tokens: int, seed: int = 0):
    """The first `num` requests of an Azure LLM inference trace (ContextTokens, GeneratedTokens) that fit
    `max_tokens`: random prompt tokens of the recorded lengths (the trace has no text), predictions
    from a noisy oracle, true length x exp(N(0, sigma))."""
    rng = random.Random(seed)
    requests = []
    with path.open() as trace:
        for row in csv.DictReader(trace):
            prompt_tokens, output = int(row["ContextTokens"]), max(1, int(row["GeneratedTokens"]))
            if prompt_tokens + output > max_tokens or prompt_tokens < 1:
                continue
            prompt = [rng.randrange(vocab) for _ in range(prompt_tokens)]
            requests.append((prompt, output, max(1, round(output * math.exp(rng.gauss(0, sigma))))))
            if len(requests) == num:
                break
    return requests


def burst(runner: ModelRunner, requests, pool_blocks: int, config: SchedulerConfig) -> dict:
    scheduler = Scheduler(config, BlockPool(pool_blocks, runner.block_tokens), stop_ids=())
    engine = PagedEngine(runner, scheduler)
    if runner.device.type == "cuda":
        torch.cuda.synchronize()
    started_s = time.monotonic()
    for request_id, (prompt, output, predicted) in enumerate(requests):
        engine.add_request(request_id, prompt, output, predicted)
    results = engine.run()
    wall_s = time.monotonic() - started_s
    stats = engine.stats
    assert len(results) == len(requests) and all(len(results[i].output_ids) == requests[i][1] for i in results)
    output_tokens = sum(len(r.output_ids) for r in results.values())
    latencies = sorted(r.total_s for r in results.values())
    mixed_steps = stats.steps - stats.decode_only_steps
    return dict(
        pool_blocks=pool_blocks, admission=config.admission.value, max_running=config.max_running,
        token_budget=config.token_budget, requests=len(requests), wall_s=round(wall_s, 3),
        requests_per_s=round(len(requests) / wall_s, 1), output_tokens_per_s=round(output_tokens / wall_s, 1),
        mean_latency_s=round(sum(latencies) / len(latencies), 3),
        p99_latency_s=round(nearest_rank(latencies, 0.99), 3),
        steps=stats.steps, decode_only_steps=stats.decode_only_steps,
        decode_only_step_ms=round(1e3 * stats.decode_only_step_s / max(1, stats.decode_only_steps), 2),
        mixed_step_ms=round(1e3 * (stats.step_s - stats.decode_only_step_s) / max(1, mixed_steps), 2),
        mean_rows=round(stats.rows / stats.steps, 1), max_running_seen=scheduler.max_running_seen,
        preemptions=scheduler.num_preemptions, recomputed_tokens=scheduler.num_recomputed_tokens,
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--budget-s", type=float, default=150.0, help="stop starting cases after this, seconds")
    parser.add_argument("--workload", choices=("mix", "azure_conv"), default="mix")
    parser.add_argument("--trace", type=Path, default=Path(__file__).resolve().parents[2]
                        / "shared/data/traces/azure2023_conv.csv", help="azure_conv: the trace CSV")
    parser.add_argument("--prediction-sigma", type=float, default=0.35,
                        help="predictions = true length x exp(N(0, sigma))")
    parser.add_argument("--profile-steps", type=int, default=0,
                        help="first: profile this many steps of a 300-request burst (torch.profiler), "
                        "the kernels' table to profile.txt under --out")
    args = parser.parse_args()
    started_s = time.monotonic()
    device = torch.device("cpu" if args.smoke else "cuda")
    shape, dtype = (SMOKE, torch.float32) if args.smoke else (LLAMA2_7B, torch.bfloat16)
    num_requests = 40 if args.smoke else args.requests
    cache_blocks = 600 if args.smoke else 4000  # 4,000 x 16 tokens x 512 KiB = 32 GiB for the 7B shape
    weights = PagedWeights.random(shape, device, dtype)
    decoder = PagedDecoder(shape, weights, cache_blocks, BLOCK_TOKENS)
    max_model_tokens = 512 if args.workload == "mix" else 4096
    max_running = 32 if args.smoke else 256
    runner = ModelRunner(decoder, use_cuda_graphs=not args.smoke, max_model_tokens=max_model_tokens,
                         max_graph_chunks=max_running)
    warm_s = time.monotonic()
    captured = runner.warm_up(max_running, 2048)
    warm_s = time.monotonic() - warm_s
    print(f"device {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}; {captured} graphs in "
          f"{warm_s:.1f} s", flush=True)
    if args.workload == "mix":
        requests = workload(num_requests, shape.vocab_size, args.prediction_sigma)
    else:
        requests = trace_workload(args.trace, num_requests, shape.vocab_size, args.prediction_sigma,
                                  max_tokens=min(max_model_tokens, cache_blocks * BLOCK_TOKENS))
    need = sum(-(-(len(p) + o) // BLOCK_TOKENS) for p, o, _ in requests) / len(requests)
    if args.workload == "mix":  # a pool that binds: about a third of what max_running average requests hold
        binding_blocks = int(need * max_running * 0.35)
        cases = [(cache_blocks, "predicted"), (binding_blocks, "predicted"), (binding_blocks, "greedy")]
    else:  # the whole cache binds already (~85 blocks a request)
        cases = [(cache_blocks, "predicted"), (cache_blocks, "greedy")]
    if args.profile_steps:
        profile(runner, requests[:300], cache_blocks, max_running, args.profile_steps, args.out)
    rows = []
    for pool_blocks, admission in cases:
        if time.monotonic() - started_s > args.budget_s:
            print(f"time budget spent: skipping pool {pool_blocks} {admission}", flush=True)
            continue
        config = SchedulerConfig(max_running=max_running, token_budget=2048, admission=admission, margin=1.2)
        row = burst(runner, requests, pool_blocks, config)
        rows.append(row)
        print(json.dumps(row), flush=True)
        write_report(args, device, dtype, captured, warm_s, need, cache_blocks, rows)
    write_report(args, device, dtype, captured, warm_s, need, cache_blocks, rows)
    keys = ["pool_blocks", "admission", "requests_per_s", "output_tokens_per_s", "mean_latency_s", "p99_latency_s",
            "steps", "decode_only_steps", "decode_only_step_ms", "mixed_step_ms", "mean_rows", "max_running_seen",
            "preemptions", "recomputed_tokens"]
    print("| " + " | ".join(keys) + " |")
    for row in rows:
        print("| " + " | ".join(str(row[k]) for k in keys) + " |")


def profile(runner: ModelRunner, requests, pool_blocks: int, max_running: int, num_steps: int, out: Path) -> None:
    """Where a burst's first steps (mostly mixed: prefill chunks beside decode rows) spend GPU time."""
    from torch.profiler import ProfilerActivity, profile as torch_profile

    config = SchedulerConfig(max_running=max_running, token_budget=2048)
    engine = PagedEngine(runner, Scheduler(config, BlockPool(pool_blocks, runner.block_tokens), stop_ids=()))
    for request_id, (prompt, output, predicted) in enumerate(requests):
        engine.add_request(request_id, prompt, output, predicted)
    for _ in range(3):  # warm the kernels (Triton autotune, cuBLAS heuristics) outside the profile
        engine.step()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if runner.device.type == "cuda" else [])
    started_s = time.monotonic()
    with torch_profile(activities=activities) as prof:
        for _ in range(num_steps):
            engine.step()
        if runner.device.type == "cuda":
            torch.cuda.synchronize()
    wall_ms = 1e3 * (time.monotonic() - started_s) / num_steps
    sort = "cuda_time_total" if runner.device.type == "cuda" else "cpu_time_total"
    table = prof.key_averages().table(sort_by=sort, row_limit=30)
    summary = (f"{num_steps} steps after 3, {wall_ms:.2f} ms a step (profiled), "
               f"{engine.stats.batched_tokens / max(1, engine.stats.steps):.0f} tokens a step on average")
    out.mkdir(parents=True, exist_ok=True)
    (out / "profile.txt").write_text(summary + "\n" + table)
    print(summary + "\n" + table[:6000], flush=True)
    engine.run()


def write_report(args, device, dtype, captured, warm_s, need, cache_blocks, rows) -> None:
    report = dict(
        device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu", date=datetime.now(UTC).isoformat(),
        command=" ".join(sys.argv), shape="smoke" if args.smoke else "llama2-7b", dtype=str(dtype),
        block_tokens=BLOCK_TOKENS, cache_blocks=cache_blocks, graphs_captured=captured, warm_up_s=round(warm_s, 1),
        workload=args.workload, prediction_sigma=args.prediction_sigma, mean_blocks_per_request=round(need, 2),
        cases=rows,
    )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "paged_engine.json").write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
