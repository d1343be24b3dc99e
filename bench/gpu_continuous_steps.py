"""Where a continuous batch's time goes on the GPU, per slot count: bare decode steps, joiner
prefills, and the batcher serving the e2e workload at a low rate and in a burst (no services).

For each --slots value it builds a ContinuousBatcher on one 7B-shape engine (the worker's settings:
trace replay, 128-token attention buckets), warms it like the worker does, then times
  - the graph-replayed step at (rows, attended tokens) with the host sync a step pays,
  - a joiner prefill of 1 and of 8 rows, and one row at prompt lengths new and again,
  - graph-replayed joiner prefills against the same prefills run eagerly (tokens and K/V must match),
  - the batcher's step loop under Poisson arrivals at --rate, and under a burst of --burst requests
    (with --eager-prefill-too once more with joiner prefills eager at exact shapes, as before),
and writes OUT/continuous_steps.json. The batcher's own 10-second stats lines go to the log.

    python bench/gpu_continuous_steps.py --workload var/e2e/workload.jsonl --slots 29,116 --out $OUT
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from services.worker import continuous, continuous_plan  # noqa: E402
from services.worker.continuous import ContinuousBatcher  # noqa: E402
from services.worker.engine import EngineItem, StaticBatchEngine  # noqa: E402
from services.shared.tokenizer import join_prompt  # noqa: E402
from services.worker.model_builder import write_random_shape_folder  # noqa: E402


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed_ms(fn, repeats: int) -> float:
    fn()
    sync()
    started_s = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync()
    return 1e3 * (time.perf_counter() - started_s) / repeats


@torch.inference_mode()
def bare_steps(batcher: ContinuousBatcher) -> list[dict]:
    """The step alone (graph replay + the per-step host sync), every step size at a few lengths."""
    static, rows_out = batcher.engine.static, []
    for rows, state in batcher._step_states.items():
        for attend_tokens in (128, 512, 1024):
            def step(state=state, rows=rows, attend_tokens=attend_tokens):
                static.decode_step(state, rows, attend_tokens)
                state.tokens.tolist()
                state.positions.zero_()  # stay in range however often it runs
                state.write_index.zero_()
            rows_out.append(dict(rows=rows, attend_tokens=attend_tokens, ms=timed_ms(step, 30)))
    return rows_out


def prefill_shapes(batcher: ContinuousBatcher) -> list[dict]:
    """A joiner prefill (one row) at prompt lengths it has not met yet, then again: what a new shape
    costs, as served (padded to a bucket; a captured graph on the GPU)."""
    out = []
    for prompt_tokens in (37, 53, 71, 97, 131, 173, 211, 257, 389, 601):
        for attempt in ("new", "again"):
            with torch.inference_mode():
                sync()
                started_s = time.perf_counter()
                batcher.prefill([0], [[7] * prompt_tokens], [1])
                sync()
            out.append(dict(prompt_tokens=prompt_tokens, attempt=attempt, ms=1e3 * (time.perf_counter() - started_s)))
    return out


@torch.inference_mode()
def prefill_graph_check(batcher: ContinuousBatcher) -> list[dict]:
    """Graph-replayed joiner prefills against the same prefill run eagerly: next tokens and the K/V
    written must match (same kernels, same shapes)."""
    static, state, rng, out = batcher.engine.static, batcher._state, random.Random(1), []
    device, vocab = static.decoder.device, static.decoder.embed.shape[0]
    for joiners, prompt_tokens in ((1, 32), (1, 96), (2, 64), (4, 128), (8, 256)):
        if joiners > batcher.slots or prompt_tokens >= batcher.row_capacity_tokens:
            continue
        tokens = torch.tensor([[rng.randrange(vocab) for _ in range(prompt_tokens)] for _ in range(joiners)],
                              device=device)
        pad_tokens = torch.tensor([rng.randrange(prompt_tokens // 2) for _ in range(joiners)], device=device)
        rows = torch.arange(joiners, device=device)
        eager = static.decoder.prefill(tokens, pad_tokens, state.k_views, state.v_views, rows=rows).clone()
        k_eager = state.k_views[-1][rows, :, :prompt_tokens].clone()
        state.k_views[-1][rows] = 0
        graphed = static.prefill_rows(state, tokens, pad_tokens, rows, use_graph=True).clone()
        k_graphed = state.k_views[-1][rows, :, :prompt_tokens]
        out.append(dict(joiners=joiners, prompt_tokens=prompt_tokens,
                        same_tokens=bool(torch.equal(eager, graphed)),
                        k_max_abs_diff=float((k_eager.float() - k_graphed.float()).abs().max())))
    return out


def serve(batcher: ContinuousBatcher, items: list[EngineItem], arrivals_s: list[float]) -> dict:
    started_s = time.monotonic()
    futures = []
    for item, at_s in zip(items, arrivals_s, strict=True):
        delay_s = started_s + at_s - time.monotonic()
        if delay_s > 0:
            time.sleep(delay_s)
        futures.append(batcher.submit(item))
    results = [future.result(600) for future in futures]
    wall_s = time.monotonic() - started_s
    tokens = sum(r.output.generated_tokens for r in results)
    run_per_token_ms = [1e3 * (r.run_s - r.queued_s) / r.output.generated_tokens for r in results]
    return dict(requests=len(results), wall_s=wall_s, requests_per_s=len(results) / wall_s,
                mean_latency_s=statistics.mean(r.run_s for r in results),
                mean_queued_s=statistics.mean(r.queued_s for r in results),
                median_ms_per_token_in_row=statistics.median(run_per_token_ms), tokens=tokens)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", type=Path, default=Path("var/e2e/workload.jsonl"))
    parser.add_argument("--slots", default="29,116")
    parser.add_argument("--rate", type=float, default=8.0)
    parser.add_argument("--rate-requests", type=int, default=80)
    parser.add_argument("--burst", type=int, default=600)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--model", default="", help="a model folder; default: the 7B shape, random weights")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--prefill-only", action="store_true", help="time prefill shapes, then stop")
    parser.add_argument("--eager-prefill-too", action="store_true",
                        help="serve again with joiner prefills eager at exact shapes (the earlier way)")
    parser.add_argument("--kv-budget-bytes", type=int, default=2**30, help="CPU only: the KV pool")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stdout)
    continuous.STATS_LOG_EVERY_S = 5.0
    graph_max_tokens = continuous_plan.PREFILL_GRAPH_MAX_TOKENS

    rows = [json.loads(line) for line in args.workload.read_text().splitlines() if line.strip()]
    model_dir = args.model or write_random_shape_folder(Path("/tmp/magnus-steps/llama2-7b-shape"))
    engine = StaticBatchEngine(model_dir, device=args.device, dtype="bfloat16" if args.device == "cuda" else "float32",
                               backend="static", trace_replay=True, cuda_reserve_bytes=6 * 2**30,
                               cpu_kv_budget_bytes=args.kv_budget_bytes, graph_length_bucket_tokens=128)
    print(f"engine: {engine.device_name}, pool {engine.static.capacity_tokens} tokens", flush=True)

    def items(offset: int, count: int, tag: str) -> list[EngineItem]:
        return [EngineItem(f"{tag}-{i}", join_prompt(r["instruction"], r["user_input"]), r["gen_tokens"])
                for i, r in enumerate(rows[offset:offset + count])]

    rng = random.Random(0)
    gaps = [rng.expovariate(args.rate) for _ in range(args.rate_requests)]
    arrivals_s = [sum(gaps[:i + 1]) for i in range(len(gaps))]
    report = {"device": engine.device_name, "slots": {}}
    for slots in [int(s) for s in args.slots.split(",")]:
        batcher = ContinuousBatcher(engine, slots)
        started_s = time.monotonic()
        batcher.warm_up(1024)
        result = dict(row_capacity_tokens=batcher.row_capacity_tokens, warm_up_s=time.monotonic() - started_s)
        result["bare_steps"] = bare_steps(batcher)
        with torch.inference_mode():
            for joiners in (1, min(8, slots)):
                prompts = [[7] * 64] * joiners
                result[f"prefill_{joiners}_rows_ms"] = timed_ms(
                    lambda p=prompts: batcher.prefill(list(range(len(p))), p, [1] * len(p)), 10)
        result["prefill_graph_check"] = prefill_graph_check(batcher)
        print(f"  prefill graph vs eager: {result['prefill_graph_check']}", flush=True)
        result["prefill_shapes"] = prefill_shapes(batcher)
        for row in result["prefill_shapes"]:
            print(f"  prefill {row['prompt_tokens']:4d} tokens {row['attempt']:5s}: {row['ms']:.1f} ms", flush=True)
        if args.prefill_only:
            report["slots"][str(slots)] = result
            continue
        batcher._is_active.zero_()
        batcher.start()
        result["rate"] = serve(batcher, items(0, args.rate_requests, "rate"), arrivals_s)
        result["burst"] = serve(batcher, items(args.rate_requests, args.burst, "burst"), [0.0] * args.burst)
        if args.eager_prefill_too:  # the same again with joiner prefills at exact shapes, eagerly (as before)
            continuous_plan.PREFILL_GRAPH_MAX_TOKENS = 0
            result["rate_eager_prefill"] = serve(batcher, items(0, args.rate_requests, "rate-eager"), arrivals_s)
            result["burst_eager_prefill"] = serve(batcher, items(args.rate_requests, args.burst, "burst-eager"),
                                                  [0.0] * args.burst)
            continuous_plan.PREFILL_GRAPH_MAX_TOKENS = graph_max_tokens
        batcher.stop(timeout_s=60)
        report["slots"][str(slots)] = result
        summary = {k: v for k, v in result.items() if k != "bare_steps"}
        print(f"slots {slots}: {json.dumps(summary)}", flush=True)
        for step in result["bare_steps"]:
            print(f"  step rows {step['rows']:4d} attend {step['attend_tokens']:5d}: {step['ms']:.2f} ms", flush=True)
        engine.static.drop_graphs()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "continuous_steps.json").write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
