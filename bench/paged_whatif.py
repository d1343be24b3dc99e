"""What-if for issue 23's workloads: the paged Scheduler's policies on the Azure conversation trace,
stepped by a roofline cost model instead of a GPU, over KV pool sizes and loads, and on the 8-task mix
(its 1,000-request burst and 200 requests at 12 req/s, as bench/gpu_serving.py sends them; CPU, ~1 minute).

    python bench/paged_whatif.py --lengths var/serving/mix_lengths.jsonl \
        --trace ../shared/data/traces/azure2023_conv.csv --out reports/gpu

The real Scheduler (services/worker/paged/scheduler.py) plans every step; each step costs
    max((weights + KV of every token the step attends) / bandwidth, batched tokens x FLOPs a token / matmul rate)
    + a fixed host time,
the Llama-2-7B shape with Qwen's vocabulary (what bench/gpu_serving.py runs) and the H200's measured
ceilings (reports/gpu/paged_step: 4.12 TB/s, 753 TFLOP/s, here derated to 600 for the mixed steps'
products). It answers what admission can buy where the pool binds, not how fast the engine is: the
requests, predictions (the noisy oracle) and arrivals are those of bench/gpu_serving.py with the same
--trace-requests / --trace-burst, so its preemption counts can be checked against the H200's
(reports/gpu/serving.md says how well they agree). On the mix, `magnus_ccb_spec` also drafts by prompt
lookup (speculation.py) against the reference texts, as bench/gpu_serving.py does; a chunk with drafts is
costed as decode rows (each of its tokens reads its own prefix: what the runner does at low load).
--host-ms is the host's time a step; --serial-host-ms that of a step the engine runs unoverlapped (one
after which drafts may come: it reads the step before planning the next), default the same.
Writes paged_whatif.json and paged_whatif.md (--pools "" skips the trace: the mix alone, seconds).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.arrivals import poisson_offsets_s  # noqa: E402
from bench.gpu_serving import (  # noqa: E402
    ARRIVAL_SEED, BLOCK_TOKENS, QWEN_VOCAB, Job, error_ratios, mix_jobs, policy_config, trace_jobs,
)
from bench.percentile import nearest_rank  # noqa: E402
from services.worker.paged.kv_blocks import BlockPool  # noqa: E402
from services.worker.paged.reference_runner import Reference, first_output_positions, forced  # noqa: E402
from services.worker.paged.scheduler import Request, Scheduler, SchedulerConfig  # noqa: E402

KV_BYTES_PER_TOKEN = 2 * 32 * 4096 * 2  # Llama-2-7B: K and V, 32 layers, 4,096 wide, bf16
WEIGHT_BYTES = 14.2e9  # its matrices with Qwen's 151,936-token vocabulary, bf16
FLOPS_PER_TOKEN = 14.2e9  # 2 x matrix parameters
BANDWIDTH_B_PER_S = 4.12e12  # measured copy bandwidth, H200 (reports/gpu/paged_step run 4)
MATMUL_FLOP_PER_S = 600e12  # the measured 753 derated: mixed steps' products are not all large
HOST_S = 1e-3  # scheduling and launch per step (the default of --host-ms)
POLICY_NAMES = ("greedy", "magnus_ccb", "magnus_ccb_tail", "ccb")
MIX_POLICY_NAMES = (*POLICY_NAMES, "magnus_ccb_spec", "magnus_ccb_tail_spec")
MIX_POOL_TOKENS = 174624  # the H200's pool for the 7B shape (bench/gpu_serving.py, reports/gpu/serving.md)


def attended_tokens(chunk) -> int:
    """Cached tokens a chunk's step reads: its context once, or, for a chunk with drafts (run as decode
    rows), each token its own prefix."""
    if not chunk.num_drafts:
        return chunk.context_tokens
    n = len(chunk.token_ids)
    return n * chunk.start_position + n * (n + 1) // 2


def step_s(plan, host_s: float = HOST_S) -> float:
    attended_bytes = sum(map(attended_tokens, plan.chunks)) * KV_BYTES_PER_TOKEN
    return max((WEIGHT_BYTES + attended_bytes) / BANDWIDTH_B_PER_S,
               plan.num_batched_tokens * FLOPS_PER_TOKEN / MATMUL_FLOP_PER_S) + host_s


def simulate(policy: str, jobs: list[Job], offsets_s: list[float], pool_tokens: int, max_running: int = 256,
             host_s: float = HOST_S, serial_host_s: float = HOST_S) -> dict:
    fields, prediction = policy_config(policy)
    scheduler = Scheduler(SchedulerConfig(max_running=max_running, token_budget=2048, **fields),
                          BlockPool(pool_tokens // BLOCK_TOKENS, BLOCK_TOKENS))
    now_s, next_job, done_s = 0.0, 0, {}
    references = {i: Reference(len(job.prompt_ids), job.reference_ids)
                  for i, job in enumerate(jobs) if job.reference_ids}
    while next_job < len(jobs) or scheduler.has_unfinished:
        while next_job < len(jobs) and offsets_s[next_job] <= now_s:
            job = jobs[next_job]
            scheduler.add(Request(next_job, job.prompt_ids, job.max_new_tokens, job.prediction(prediction),
                                  replay_tokens=job.output_tokens))
            next_job += 1
        if not scheduler.has_unfinished:
            now_s = offsets_s[next_job]
            continue
        is_serial = scheduler.drafts_next_step  # PagedEngine reads the step before planning this one
        plan = scheduler.schedule()
        now_s += step_s(plan, serial_host_s if is_serial else host_s)
        sampled = {c.request_id: (1,) * (c.num_drafts + 1) if c.num_drafts else 1 for c in plan.chunks if c.is_sampled}
        sampled = forced(sampled, first_output_positions(plan, references), references)  # the references' tokens
        for request in scheduler.update(plan, sampled):
            done_s[request.request_id] = now_s
    latencies = sorted(done_s[i] - offsets_s[i] for i in done_s)
    return dict(requests_per_s=round(len(done_s) / max(done_s.values()), 2), steps=scheduler.num_steps,
                accepted_draft_tokens=scheduler.num_accepted_tokens,
                mean_latency_s=round(sum(latencies) / len(latencies), 2),
                p99_latency_s=round(nearest_rank(latencies, 0.99), 2),
                preemptions=scheduler.num_preemptions, recomputed_tokens=scheduler.num_recomputed_tokens,
                max_running_requests=scheduler.max_running_seen)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=Path, default=Path("var/serving/mix_lengths.jsonl"))
    parser.add_argument("--trace", type=Path, default=Path("../shared/data/traces/azure2023_conv.csv"))
    parser.add_argument("--out", type=Path, default=Path("reports/gpu"))
    parser.add_argument("--pools", default="174624,80000,40000,24000", help="KV pool sizes, tokens")
    parser.add_argument("--loads", default="0.8,0.95", help="arrival rates as shares of greedy's burst rate")
    parser.add_argument("--rate-requests", type=int, default=150, help="bench/gpu_serving.py's --trace-requests")
    parser.add_argument("--burst-requests", type=int, default=300, help="bench/gpu_serving.py's --trace-burst")
    parser.add_argument("--mix-rate-requests", type=int, default=200, help="bench/gpu_serving.py's --mix-rate-requests")
    parser.add_argument("--host-ms", type=float, default=HOST_S * 1e3, help="host time a step, ms")
    parser.add_argument("--serial-host-ms", type=float, default=HOST_S * 1e3,
                        help="host time of a step run unoverlapped (drafting), ms")
    args = parser.parse_args()
    host = dict(host_s=args.host_ms / 1e3, serial_host_s=args.serial_host_ms / 1e3)
    rate_n, burst_n = args.rate_requests, args.burst_requests
    jobs, stamps = trace_jobs(args.trace, error_ratios(args.lengths), QWEN_VOCAB, rate_n + burst_n)  # the same draws
    rate_jobs, burst = jobs[:rate_n], jobs[rate_n:]
    report = dict(command="python " + " ".join(sys.argv), machine="CPU (a cost model: no GPU ran)", pools={})
    for pool_tokens in (int(p) for p in args.pools.split(",") if p):
        entry = report["pools"][str(pool_tokens)] = dict(burst={}, rates={})
        for policy in POLICY_NAMES:
            entry["burst"][policy] = simulate(policy, burst, [0.0] * burst_n, pool_tokens, **host)
            print(f"pool {pool_tokens} burst {policy}: {entry['burst'][policy]}", flush=True)
        for load in (float(x) for x in args.loads.split(",")):
            rate_per_s = load * entry["burst"]["greedy"]["requests_per_s"]
            speed = stamps[rate_n - 1] / (rate_n - 1) * rate_per_s  # recorded seconds per simulated second
            offsets_s = [s / speed for s in stamps[:rate_n]]
            phase = entry["rates"][str(load)] = dict(rate_per_s=round(rate_per_s, 2))
            for policy in POLICY_NAMES:
                phase[policy] = simulate(policy, rate_jobs, offsets_s, pool_tokens, **host)
                print(f"pool {pool_tokens} load {load} {policy}: {phase[policy]}", flush=True)
    mix = mix_jobs(args.lengths, QWEN_VOCAB)  # bench/gpu_serving.py's phases: 200 at 12 req/s, then 1,000 at once
    rate_offsets_s = poisson_offsets_s(args.mix_rate_requests, 12.0, ARRIVAL_SEED)
    entry = report["mix"] = dict(burst={}, rates={"12.0": dict(rate_per_s=12.0)})
    for policy in MIX_POLICY_NAMES:
        entry["burst"][policy] = simulate(policy, mix[args.mix_rate_requests:args.mix_rate_requests + 1000],
                                          [0.0] * 1000, MIX_POOL_TOKENS, **host)
        entry["rates"]["12.0"][policy] = simulate(policy, mix[:args.mix_rate_requests], rate_offsets_s,
                                                  MIX_POOL_TOKENS, **host)
        print(f"mix {policy}: burst {entry['burst'][policy]}, 12 req/s {entry['rates']['12.0'][policy]}", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "paged_whatif.json").write_text(json.dumps(report, indent=1))
    (args.out / "paged_whatif.md").write_text(markdown(report))
    print(markdown(report))
    return 0


def markdown(report: dict) -> str:
    lines = [f"`{report['command']}` ({report['machine']})", "",
             "| pool tokens (trace; mix last) | phase | policy | req/s | mean latency s | p99 s | preemptions | recomputed tokens | "
             "max running | vs greedy: req/s, p99 |", "|---:|---|---|---:|---:|---:|---:|---:|---:|---|"]
    sections = [(f"{pool}", entry) for pool, entry in report["pools"].items()]
    if "mix" in report:
        sections.append((f"mix, {MIX_POOL_TOKENS}", report["mix"]))
    for pool, entry in sections:
        phases = [("burst", entry["burst"])] + [(f"{v['rate_per_s']} req/s" + (f" ({k} load)" if k != "12.0" else ""), v)
                                                for k, v in entry["rates"].items()]
        for name, results in phases:
            greedy = results["greedy"]
            for policy in (p for p in MIX_POLICY_NAMES if p in results):
                r = results[policy]
                ratio = (f"{r['requests_per_s'] / greedy['requests_per_s']:.2f}x, "
                         f"{r['p99_latency_s'] / greedy['p99_latency_s']:.2f}x")
                lines.append(f"| {pool} | {name} | {policy} | {r['requests_per_s']} | {r['mean_latency_s']} | "
                             f"{r['p99_latency_s']} | {r['preemptions']} | {r['recomputed_tokens']} | "
                             f"{r['max_running_requests']} | {ratio} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
