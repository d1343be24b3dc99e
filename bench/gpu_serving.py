"""Issue 23's serving report: the paged engine under four policies and transformers' own continuous
batching, on the same requests, two workloads, one command.

Run on an H200 (the device tool), with `var/serving` (bench/serving_lengths.py made it here) and the
Azure trace copied into `.gpu_data/` carried:

    PYTHONUNBUFFERED=1 python3 bench/gpu_serving.py --lengths var/serving/mix_lengths.jsonl \
        --trace .gpu_data/azure2023_conv.csv --out $OUT

writes serving.json, serving.md and serving.png under --out (reports/gpu/ holds the committed ones).
`--smoke` runs the same code on the CPU with a tiny model: it checks the script, not the speed.

Model: Llama-2-7B's layers with Qwen's vocabulary (the shape `bench/gpu_e2e.py` serves), random
bf16 weights; one copy serves the paged engine (weights shared) and, last, transformers.
The engine is driven directly: no batcher, gRPC or tokenizer (the services' own figures come from
`bench/gpu_e2e.py --backend paged`). Every request runs to its recorded output length (trace
replay: `Request.replay_tokens`; admission does not see it).

Workloads:
- mix: the 8-task mix of bench/e2e_workload.py (held-out rows, Qwen-token lengths) with the serving
  predictor's own point and p90 predictions (bench/serving_lengths.py). 200 requests as Poisson
  arrivals at 12 req/s (latency), then 1,000 other requests at once (saturated throughput).
- azure_conv: ../shared/data/traces/azure2023_conv.csv rows that fit 4,096 tokens, random prompt
  tokens of the recorded lengths (the trace has no text); arrivals from its timestamps, sped up to
  --trace-rate; predictions from a noisy oracle: each request's truth times the (point / truth,
  p90 / truth) ratios of a random mix row, i.e. the serving predictor's measured error
  distribution. Latency phase: --trace-requests requests; burst: --trace-burst others at once.

Policies (one engine, a fresh block pool each):
- vs: static batches (the paper's baseline), FCFS, batches of pool tokens / 2,048 requests;
- ccb: FCFS, each request admitted with blocks for its prompt + max_new_tokens (no prediction);
- greedy: FCFS, admitted while the blocks hold its known tokens, preempting the youngest when they
  run out (what vLLM does);
- magnus_ccb: HRRN on predicted length, admitted while the pool is predicted to hold every running
  request at its p90 length (`Admission.PREDICTED`), preempting the most predicted work left;
- magnus_ccb_spec: magnus_ccb with 8 prompt-lookup drafts (`SchedulerConfig.draft_tokens`; `magnus_ccb_spec:K`
  for K) while at most 16 requests run. Random weights agree with no draft, so each request's reference output
  (the mix's real text, `output_ids` of bench/serving_lengths.py --data) stands in for the model's greedy output
  (`reference_runner.ReferenceRunner`): drafts are verified against real text and the steps compute them all;
  what it measures is a model whose answers are the references. The trace has no text: no drafts;
- magnus_ccb_tail (`WaitOrder.HRRN_TAIL`: requests predicted to outlast the queue's drain start first,
  longest first), and magnus_ccb_tail_spec, the same with magnus_ccb_spec's drafts;
- hf_continuous: transformers' `init_continuous_batching` (paged cache, CUDA graphs as its config
  decides), the same prompts and output lengths, same arrivals.
max_new_tokens, what ccb reserves and caps every prediction: 1,024 (mix), min(2,048, 4,096 - prompt)
(azure_conv).
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.arrivals import poisson_offsets_s  # noqa: E402
from bench.percentile import nearest_rank  # noqa: E402
from services.worker.paged.decode_step import PagedDecoder, PagedModelConfig, PagedWeights  # noqa: E402
from services.worker.paged.engine import PagedEngine  # noqa: E402
from services.worker.paged.kv_blocks import BlockPool  # noqa: E402
from services.worker.paged.reference_runner import Reference, ReferenceRunner  # noqa: E402
from services.worker.paged.runner import (  # noqa: E402
    DEFAULT_MIXED_GRAPH_TOKENS, DEFAULT_ROWS_ATTENDED_LIMIT, ModelRunner,
)
from services.worker.paged.scheduler import Scheduler, SchedulerConfig  # noqa: E402
from services.worker.paged.skinny_gemm import DEFAULT_SKINNY_ROWS  # noqa: E402

BLOCK_TOKENS = 16
MAX_MODEL_TOKENS = 4096
QWEN_VOCAB = 151_936  # Qwen2's embedding rows
LLAMA2_7B_LAYERS = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                        num_key_value_heads=32, max_position_embeddings=MAX_MODEL_TOKENS)
SMOKE_LAYERS = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, max_position_embeddings=MAX_MODEL_TOKENS)
POLICIES = {  # name -> (SchedulerConfig fields, which prediction the engine gets)
    "vs": (dict(order="fcfs", admission="predicted", margin=1.0, static_batches=True), "none"),
    "ccb": (dict(order="fcfs", admission="predicted", margin=1.0), "none"),
    "greedy": (dict(order="fcfs", admission="greedy", preempt_rule="youngest"), "none"),
    "magnus_ccb": (dict(order="hrrn", admission="predicted", margin=1.0, preempt_rule="most_work_left"), "p90"),
    # magnus_ccb with the tail guard (scheduler.WaitOrder.HRRN_TAIL): long requests start before the queue drains
    "magnus_ccb_tail": (dict(order="hrrn_tail", admission="predicted", margin=1.0, preempt_rule="most_work_left"),
                        "p90"),
    # magnus_ccb with prompt-lookup drafts at low load (speculation.py)
    "magnus_ccb_spec": (dict(order="hrrn", admission="predicted", margin=1.0, preempt_rule="most_work_left",
                             draft_tokens=8, draft_max_rows=16), "p90"),
    # both: the tail guard starts a burst's longest requests first, drafts shorten the burst's last steps
    "magnus_ccb_tail_spec": (dict(order="hrrn_tail", admission="predicted", margin=1.0,
                                  preempt_rule="most_work_left", draft_tokens=8, draft_max_rows=16), "p90"),
}
ARRIVAL_SEED = 12


@dataclass(frozen=True)
class Job:
    prompt_ids: list[int]
    output_tokens: int  # recorded: the request ends there (replay)
    max_new_tokens: int
    predicted_tokens: int  # the point prediction
    p90_tokens: int
    reference_ids: tuple[int, ...] = ()  # the reference output's tokens, where the workload has text

    def prediction(self, kind: str) -> int:
        """What a policy's admission is told: "none" (0, unknown), "point" or "p90"."""
        return {"none": 0, "point": self.predicted_tokens, "p90": self.p90_tokens}[kind]


def policy_config(policy: str) -> tuple[dict, str]:
    """POLICIES[policy]; "magnus_ccb_spec:K" is magnus_ccb_spec with K drafted tokens (variants in one run)."""
    name, _, drafts = policy.partition(":")
    fields, prediction = POLICIES[name]
    if drafts:
        if "draft_tokens" not in fields:
            raise ValueError(f"policy {name} does not draft: {policy!r}")
        fields = fields | dict(draft_tokens=int(drafts))
    return fields, prediction


def say(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


# ---- workloads -----------------------------------------------------------------------------------
def mix_jobs(path: Path, vocab: int, seed: int = 0) -> list[Job]:
    """The mix's requests: their real prompt and reference tokens where the file has them (folded into
    `vocab`, a no-op for Qwen's), else random prompt tokens of the recorded lengths."""
    rng = random.Random(seed)
    jobs = []
    for line in path.read_text().splitlines():
        row = json.loads(line)
        cap = 1024
        if row.get("prompt_ids"):
            prompt = [token % vocab for token in row["prompt_ids"]]
            reference = tuple(token % vocab for token in row["output_ids"][:cap])
        else:
            prompt, reference = [rng.randrange(vocab) for _ in range(max(1, row["input_tokens"]))], ()
        jobs.append(Job(prompt, min(cap, max(1, row["gen_tokens"])), cap, min(cap, row["predicted_tokens"]),
                        min(cap, row["p90_tokens"]), reference))
    return jobs


def error_ratios(path: Path) -> list[tuple[float, float]]:
    """(point / truth, p90 / truth) of every mix row: the serving predictor's measured errors."""
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return [(r["predicted_tokens"] / max(1, r["gen_tokens"]), r["p90_tokens"] / max(1, r["gen_tokens"])) for r in rows]


def trace_jobs(path: Path, ratios: list[tuple[float, float]], vocab: int, num: int, seed: int = 0):
    """The first `num` trace rows that fit MAX_MODEL_TOKENS: jobs and their arrival offsets, seconds."""
    rng = random.Random(seed)
    jobs, stamps = [], []
    with path.open() as trace:
        for row in csv.DictReader(trace):
            prompt_tokens, output = int(row["ContextTokens"]), max(1, int(row["GeneratedTokens"]))
            if prompt_tokens < 1 or prompt_tokens + output > MAX_MODEL_TOKENS:
                continue
            cap = min(2048, MAX_MODEL_TOKENS - prompt_tokens)
            output = min(output, cap)
            point, upper = rng.choice(ratios)
            jobs.append(Job([rng.randrange(vocab) for _ in range(prompt_tokens)], output, cap,
                            min(cap, max(1, round(output * point))), min(cap, max(1, round(output * upper)))))
            stamps.append(datetime.fromisoformat(row["TIMESTAMP"][:26]).timestamp())
            if len(jobs) == num:
                break
    return jobs, [s - stamps[0] for s in stamps]


# ---- one phase on the paged engine ---------------------------------------------------------------
def run_paged(runner: ModelRunner, pool_blocks: int, policy: str, jobs: list[Job], offsets_s: list[float],
              max_running: int, overlap: bool = False) -> dict:
    fields, prediction = policy_config(policy)
    if policy == "vs":  # the paper's fixed batch: as many requests as the pool holds at 2,048 tokens each
        max_running = max(1, min(max_running, pool_blocks * BLOCK_TOKENS // 2048))
    config = SchedulerConfig(max_running=max_running, token_budget=2048, **fields)
    scheduler = Scheduler(config, BlockPool(pool_blocks, runner.block_tokens), stop_ids=())
    # every request with a text gets its reference as the model's answer (drafts are verified against it)
    references = {i: Reference(len(job.prompt_ids), job.reference_ids)
                  for i, job in enumerate(jobs) if job.reference_ids}
    engine = PagedEngine(ReferenceRunner(runner, references) if references else runner, scheduler, overlap=overlap)
    if runner.device.type == "cuda":
        torch.cuda.synchronize()
    started_s, next_job, done_s, first_s = time.monotonic(), 0, {}, {}
    engine.on_tokens = lambda sampled: [first_s.setdefault(k, time.monotonic() - started_s) for k in sampled]
    while next_job < len(jobs) or engine.has_unfinished:
        now_s = time.monotonic() - started_s
        while next_job < len(jobs) and offsets_s[next_job] <= now_s:
            job = jobs[next_job]
            engine.add_request(next_job, job.prompt_ids, job.max_new_tokens, job.prediction(prediction),
                               replay_tokens=job.output_tokens)
            next_job += 1
        if engine.has_unfinished:
            for result in engine.step():
                done_s[result.request_id] = time.monotonic() - started_s
                assert len(result.output_ids) == jobs[result.request_id].output_tokens, result
        else:
            time.sleep(max(0.0, offsets_s[next_job] - (time.monotonic() - started_s)))
    stats = engine.stats
    return summarize(jobs, offsets_s, done_s, first_s) | dict(
        max_running=config.max_running, max_running_requests=scheduler.max_running_seen,
        preemptions=scheduler.num_preemptions, recomputed_tokens=scheduler.num_recomputed_tokens,
        draft_tokens=scheduler.num_draft_tokens, accepted_draft_tokens=scheduler.num_accepted_tokens,
        steps=stats.steps, decode_only_steps=stats.decode_only_steps,
        mean_step_ms=round(1e3 * stats.step_s / max(1, stats.steps), 2),
        decode_only_step_ms=round(1e3 * stats.decode_only_step_s / max(1, stats.decode_only_steps), 2),
        mixed_step_ms=round(1e3 * (stats.step_s - stats.decode_only_step_s)
                            / max(1, stats.steps - stats.decode_only_steps), 2),
        mean_tokens_per_step=round(stats.batched_tokens / max(1, stats.steps), 1))


def summarize(jobs: list[Job], offsets_s: list[float], done_s: dict, first_s: dict) -> dict:
    latencies = sorted(done_s[i] - offsets_s[i] for i in done_s)
    ttft = sorted(first_s[i] - offsets_s[i] for i in first_s if i in done_s)
    span_s = max(done_s.values()) - min(offsets_s)
    output_tokens = sum(jobs[i].output_tokens for i in done_s)

    def pct(values: list[float], q: float) -> float:
        return round(nearest_rank(values, q), 4)

    return dict(requests=len(jobs), finished=len(done_s), span_s=round(span_s, 3),
                requests_per_s=round(len(done_s) / span_s, 2), output_tokens_per_s=round(output_tokens / span_s, 1),
                mean_latency_s=round(sum(latencies) / len(latencies), 4), p50_latency_s=pct(latencies, 0.5),
                p99_latency_s=pct(latencies, 0.99), ttft_p50_s=pct(ttft, 0.5), ttft_p99_s=pct(ttft, 0.99))


# ---- the peer: transformers' continuous batching -------------------------------------------------
def run_hf(model, jobs: list[Job], offsets_s: list[float], timeout_s: float, pool_tokens: int = 0) -> dict:
    """pool_tokens > 0: the peer's paged cache gets as many tokens as ours (its own page size)."""
    from transformers import GenerationConfig

    config = GenerationConfig(max_new_tokens=max(j.output_tokens for j in jobs), do_sample=False, eos_token_id=-1,
                              pad_token_id=0)
    options = {}
    try:  # CUDA graphs on where this transformers lets a caller say so
        from transformers import ContinuousBatchingConfig

        cb_config = ContinuousBatchingConfig(use_cuda_graph=True)
        if pool_tokens:
            page_tokens = getattr(cb_config, "page_size", None) or getattr(cb_config, "block_size", None) or 256
            cb_config.num_blocks = -(-pool_tokens // page_tokens)
            options["cache_tokens"] = cb_config.num_blocks * page_tokens
        options["continuous_batching_config"] = cb_config
    except (ImportError, TypeError):
        pass
    manager = model.init_continuous_batching(generation_config=config,
                                             **{k: v for k, v in options.items() if k != "cache_tokens"})
    manager.start()
    try:
        started_s, next_job, done_s = time.monotonic(), 0, {}
        while len(done_s) < len(jobs):
            now_s = time.monotonic() - started_s
            if now_s > timeout_s:  # what finished by then is the result; the rest is reported unfinished
                break
            while next_job < len(jobs) and offsets_s[next_job] <= now_s:
                job = jobs[next_job]
                manager.add_request(job.prompt_ids, request_id=str(next_job), max_new_tokens=job.output_tokens)
                next_job += 1
            wait_s = 0.05 if next_job == len(jobs) else max(0.0, min(0.05, offsets_s[next_job] - now_s))
            result = manager.get_result(timeout=wait_s)
            if result is not None and result.is_finished():
                done_s[int(result.request_id)] = time.monotonic() - started_s
    finally:
        manager.stop(block=True)
    if not done_s:
        return dict(requests=len(jobs), finished=0, timed_out_after_s=timeout_s)
    return summarize(jobs, offsets_s, done_s, {}) | dict(options=sorted(options), timed_out=len(done_s) < len(jobs),
                                                         cache_tokens=options.get("cache_tokens"))


# ---- set-up, report ------------------------------------------------------------------------------
def build_model(smoke: bool, device: torch.device):
    from transformers import LlamaConfig, LlamaForCausalLM

    layers = SMOKE_LAYERS if smoke else LLAMA2_7B_LAYERS
    config = LlamaConfig(vocab_size=512 if smoke else QWEN_VOCAB, **layers)
    torch.manual_seed(0)
    dtype = torch.float32 if smoke else torch.bfloat16
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype)
    if not smoke:  # N(0, 0.02) weights: the hidden state stays finite through 32 layers
        for parameter in model.parameters():
            torch.nn.init.normal_(parameter, std=0.02)
    return model.eval()


def pool_blocks_for(model, device: torch.device, reserve_gib: float, smoke: bool) -> int:
    config = model.config
    kv_bytes_per_token = 2 * config.num_hidden_layers * config.num_key_value_heads * (
        config.hidden_size // config.num_attention_heads) * model.dtype.itemsize
    if smoke:
        return 400
    free_bytes = torch.cuda.mem_get_info(device)[0] - int(reserve_gib * 2**30)
    return free_bytes // (kv_bytes_per_token * BLOCK_TOKENS)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=Path, default=Path("var/serving/mix_lengths.jsonl"))
    parser.add_argument("--trace", type=Path, default=Path(".gpu_data/azure2023_conv.csv"))
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--policies", default="vs,ccb,greedy,magnus_ccb,hf_continuous")
    parser.add_argument("--workloads", default="mix,azure_conv")
    parser.add_argument("--mix-rate", type=float, default=12.0)
    parser.add_argument("--mix-rate-requests", type=int, default=200)
    parser.add_argument("--mix-burst", type=int, default=1000)
    parser.add_argument("--trace-rate", type=float, default=8.0,
                        help="azure_conv arrivals sped up to this mean rate (when --trace-load is 0 or greedy did not run)")
    parser.add_argument("--trace-load", type=float, default=0.8,
                        help="azure_conv: arrivals at this share of greedy admission's saturated rate (its burst), "
                        "where the KV pool binds; 0 = --trace-rate")
    parser.add_argument("--trace-requests", type=int, default=200)
    parser.add_argument("--trace-burst", type=int, default=400)
    parser.add_argument("--trace-pool-tokens", type=int, default=0,
                        help="azure_conv: KV pool capped at this many tokens, as on a card with less memory left "
                        "after the weights (e.g. 40,000 ~ a 7B multi-head model on a 40 GB card); 0 = all of it")
    parser.add_argument("--max-running", type=int, default=256)
    parser.add_argument("--overlap", choices=("on", "off"), default="on",
                        help="plan and launch step N+1 while step N runs (PagedEngine's overlap)")
    parser.add_argument("--mixed-graphs", choices=("on", "off"), default="on",
                        help="capture the steps with prefill chunks per token bucket (off: they run eagerly)")
    parser.add_argument("--skinny-gemm-rows", type=int, default=DEFAULT_SKINNY_ROWS,
                        help="decode steps of up to this many rows use the skinny Triton GEMM (0: cuBLAS only)")
    parser.add_argument("--rows-attended-limit", type=int, default=DEFAULT_ROWS_ATTENDED_LIMIT,
                        help="steps whose prefill tokens attend at most this many positions run as decode rows "
                        "(ModelRunner's rows_attended_limit; 0: every step with a prefill is a mixed step)")
    parser.add_argument("--reserve-gib", type=float, default=24.0,
                        help="GPU memory left out of the KV pool (step activations; transformers' own cache later)")
    parser.add_argument("--hf-timeout-s", type=float, default=120.0, help="the peer's limit per phase")
    parser.add_argument("--budget-s", type=float, default=540.0, help="start no phase after this, seconds")
    args = parser.parse_args()
    started_s = time.monotonic()
    device = torch.device("cpu" if args.smoke else "cuda")
    policies = [p for p in args.policies.split(",") if p]
    model = build_model(args.smoke, device)
    vocab = model.config.vocab_size
    weights = PagedWeights.from_hf(model, share=True)
    blocks = pool_blocks_for(model, device, args.reserve_gib, args.smoke)
    decoder = PagedDecoder(PagedModelConfig.from_hf(model.config), weights, blocks, BLOCK_TOKENS)
    decoder.skinny_gemm_rows = args.skinny_gemm_rows
    max_running = 16 if args.smoke else args.max_running
    runner = ModelRunner(decoder, use_cuda_graphs=not args.smoke, max_model_tokens=MAX_MODEL_TOKENS,
                         max_graph_chunks=max_running, rows_attended_limit=args.rows_attended_limit,
                         mixed_graph_tokens=DEFAULT_MIXED_GRAPH_TOKENS if args.mixed_graphs == "on" else ())
    warm_s = time.monotonic()
    captured = runner.warm_up(runner.graph_rows[-1], 2048)  # decode rows, rows-path prefills, mixed steps
    say(f"device {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}: {blocks} blocks of {BLOCK_TOKENS} "
        f"tokens ({blocks * BLOCK_TOKENS} tokens), {captured} step graphs ({runner.num_mixed_graph_captures} mixed) "
        f"in {time.monotonic() - warm_s:.1f} s")
    ratios = error_ratios(args.lengths)
    mix = mix_jobs(args.lengths, vocab)
    scale = 0.1 if args.smoke else 1.0
    rate_n, burst_n = int(args.mix_rate_requests * scale), int(args.mix_burst * scale)
    trace_rate_n, trace_burst_n = int(args.trace_requests * scale), int(args.trace_burst * scale)
    trace, stamps = trace_jobs(args.trace, ratios, vocab, trace_rate_n + trace_burst_n)
    trace_speed = (stamps[trace_rate_n - 1] / (trace_rate_n - 1)) * args.trace_rate  # recorded s per sent s
    workloads = {
        "mix": dict(rate=(mix[:rate_n], poisson_offsets_s(rate_n, args.mix_rate, ARRIVAL_SEED)),
                    burst=(mix[rate_n:rate_n + burst_n], [0.0] * burst_n), rate_per_s=args.mix_rate,
                    pool_blocks=blocks),
        "azure_conv": dict(rate=(trace[:trace_rate_n], [s / trace_speed for s in stamps[:trace_rate_n]]),
                           burst=(trace[trace_rate_n:], [0.0] * (len(trace) - trace_rate_n)),
                           rate_per_s=args.trace_rate,
                           pool_blocks=min(blocks, args.trace_pool_tokens // BLOCK_TOKENS or blocks)),
    }
    report = dict(device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                  date=datetime.now(UTC).isoformat(timespec="seconds"), commands=["python3 " + " ".join(sys.argv)],
                  torch=torch.__version__, pool_tokens=blocks * BLOCK_TOKENS, max_running=max_running,
                  token_budget=2048, block_tokens=BLOCK_TOKENS, mixed_graphs=args.mixed_graphs,
                  rows_attended_limit=args.rows_attended_limit, skinny_gemm_rows=args.skinny_gemm_rows,
                  overlap=args.overlap, workloads={})
    warm = mix[-32:]  # Triton autotune and cuBLAS heuristics before anything is timed
    run_paged(runner, blocks, "magnus_ccb", warm, [0.0] * len(warm), max_running, args.overlap == "on")
    for name in [w for w in args.workloads.split(",") if w]:
        workload = workloads[name]
        entry = report["workloads"].setdefault(name, dict(rate_per_s=workload["rate_per_s"], policies={},
                                                          pool_tokens=workload["pool_blocks"] * BLOCK_TOKENS))
        for phase in ("burst", "rate"):  # bursts first: azure_conv's rate comes from greedy's
            if phase == "rate" and name == "azure_conv" and args.trace_load:
                greedy = entry["policies"].get("greedy", {}).get("burst", {}).get("requests_per_s")
                if greedy:
                    set_trace_rate(workload, entry, args.trace_load * greedy, stamps[:trace_rate_n])
            for policy in [p for p in policies if p != "hf_continuous"]:
                if time.monotonic() - started_s > args.budget_s:
                    say(f"time budget spent: {name} {policy} {phase} not run")
                    continue
                jobs, offsets = workload[phase]
                result = run_paged(runner, workload["pool_blocks"], policy, jobs, offsets, max_running,
                                   args.overlap == "on")
                entry["policies"].setdefault(policy, {})[phase] = result
                say(f"{name} {policy} {phase}: {json.dumps(result)}")
                write(args.out, report)
    if "hf_continuous" in policies and not args.smoke:
        runner.free()
        del runner, decoder, weights
        torch.cuda.empty_cache()
        for name in [w for w in args.workloads.split(",") if w]:
            for phase in ("burst", "rate"):
                if time.monotonic() - started_s > args.budget_s:
                    say(f"time budget spent: {name} hf_continuous {phase} not run")
                    continue
                jobs, offsets = workloads[name][phase]
                try:
                    capped = name == "azure_conv" and args.trace_pool_tokens
                    result = run_hf(model, jobs, offsets, args.hf_timeout_s,
                                    workloads[name]["pool_blocks"] * BLOCK_TOKENS if capped else 0)
                except Exception as error:  # noqa: BLE001 - the peer's failure is a result too
                    result = dict(error=f"{type(error).__name__}: {error}")
                report["workloads"][name]["policies"].setdefault("hf_continuous", {})[phase] = result
                say(f"{name} hf_continuous {phase}: {json.dumps(result)}")
                write(args.out, report)
    write(args.out, report)
    print(markdown(report))
    return 0


def set_trace_rate(workload: dict, entry: dict, rate_per_s: float, stamps: list[float]) -> None:
    """The trace's recorded arrivals, sped up to a mean of `rate_per_s`."""
    speed = stamps[-1] / (len(stamps) - 1) * rate_per_s
    workload["rate"] = (workload["rate"][0], [s / speed for s in stamps])
    workload["rate_per_s"] = entry["rate_per_s"] = round(rate_per_s, 2)


def flat(report: dict) -> dict:
    """serving.json's per-policy figures (the issue's keys): latency from the rate phase, throughput from the burst."""
    for workload in report["workloads"].values():
        for phases in workload["policies"].values():
            rate, burst = phases.get("rate", {}), phases.get("burst", {})
            phases.update(saturated_requests_per_s=burst.get("requests_per_s"),
                          saturated_output_tokens_per_s=burst.get("output_tokens_per_s"),
                          mean_latency_s=rate.get("mean_latency_s"), p99_latency_s=rate.get("p99_latency_s"),
                          preemptions=(rate.get("preemptions", 0) or 0) + (burst.get("preemptions", 0) or 0),
                          max_running_requests=max(rate.get("max_running_requests", 0) or 0,
                                                   burst.get("max_running_requests", 0) or 0))
    return report


def markdown(report: dict) -> str:
    lines = [f"Device {report['device']}, {report['date']}; pool {report['pool_tokens']} tokens, "
             f"at most {report['max_running']} running, {report['token_budget']} tokens a step.", ""]
    for name, workload in report["workloads"].items():
        lines += [f"### {name} (latency at {workload['rate_per_s']} req/s; throughput: burst; "
                  f"pool {workload.get('pool_tokens', report['pool_tokens'])} tokens)", "",
                  "| policy | saturated req/s | output tok/s | mean latency s | p99 latency s | TTFT p50 s | "
                  "preemptions (burst) | recomputed tokens (burst) | max running | drafts kept / drafted (rate) |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for policy, phases in workload["policies"].items():
            rate, burst = phases.get("rate", {}), phases.get("burst", {})
            lines.append(f"| {policy} | {burst.get('requests_per_s', '-')} | {burst.get('output_tokens_per_s', '-')} | "
                         f"{rate.get('mean_latency_s', '-')} | {rate.get('p99_latency_s', '-')} | "
                         f"{rate.get('ttft_p50_s', '-')} | {burst.get('preemptions', '-')} | "
                         f"{burst.get('recomputed_tokens', '-')} | {phases.get('max_running_requests', '-')} | "
                         f"{rate.get('accepted_draft_tokens', '-')} / {rate.get('draft_tokens', '-')} |")
        lines.append("")
    return "\n".join(lines)


def write(out: Path, report: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "serving.json").write_text(json.dumps(flat(report), indent=1))
    (out / "serving.md").write_text(markdown(report))
    try:
        plot(report, out / "serving.png")
    except Exception as error:  # noqa: BLE001 - the numbers matter more than the picture
        say(f"no plot: {error}")


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(report["workloads"])
    fig, axes = plt.subplots(2, len(names), figsize=(6 * len(names), 7), squeeze=False)
    for column, name in enumerate(names):
        policies = report["workloads"][name]["policies"]
        labels = list(policies)
        throughput = [policies[p].get("burst", {}).get("requests_per_s") or 0 for p in labels]
        latency = [policies[p].get("rate", {}).get("p99_latency_s") or 0 for p in labels]
        mean = [policies[p].get("rate", {}).get("mean_latency_s") or 0 for p in labels]
        axes[0][column].bar(labels, throughput, color="tab:blue")
        axes[0][column].set_title(f"{name}: saturated throughput (burst)")
        axes[0][column].set_ylabel("requests / s")
        x = range(len(labels))
        axes[1][column].bar([i - 0.2 for i in x], mean, width=0.4, label="mean")
        axes[1][column].bar([i + 0.2 for i in x], latency, width=0.4, label="p99")
        axes[1][column].set_xticks(list(x), labels)
        axes[1][column].set_yscale("log")
        axes[1][column].set_title(f"{name}: latency at {report['workloads'][name]['rate_per_s']} req/s")
        axes[1][column].set_ylabel("seconds")
        axes[1][column].legend()
    fig.suptitle(f"Paged engine policies vs transformers' continuous batching, {report['device']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
