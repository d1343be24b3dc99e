"""Where a mixed step's GPU time goes (issue 23): the captured step, its kernels, and the varlen attention's launches.

Run on an H200 (the device tool):  PYTHONUNBUFFERED=1 python3 bench/gpu_mixed_step.py --out $OUT
On the CPU, `--smoke` runs the same code with a tiny shape, eagerly: it checks the script, not the speed.

The shape `bench/gpu_serving.py` serves (Llama-2-7B's layers, Qwen's 151,936-token vocabulary, random
bf16 weights). Steps built as a burst of the 8-task mix makes them: decode rows with contexts drawn
from 40-300 tokens beside prefill chunks of 60-token prompts, in three sizes. For each step:
  - the step captured as a CUDA graph in its token bucket (`ModelRunner`'s mixed graph), median of
    20 replays, against its FLOP bound (tokens x 2 x matrix parameters / the measured bf16 matmul rate);
  - the same step eagerly under torch.profiler: each kernel's GPU time per step, top 12;
  - the varlen attention alone (all layers' worth: one call x layers, captured) for several launch shapes.
    Runs 1-3 timed those calls eagerly, so short kernels (Qwen2's ~50 us) were timed at their launch rate.
Writes mixed_step.json under --out and prints the tables.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
from collections import defaultdict
from datetime import UTC, datetime
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.gpu_paged_step import graphed_time_s, matmul_flops_per_s  # noqa: E402
from services.worker.paged.decode_step import (  # noqa: E402
    LLAMA2_7B, QWEN2_7B, PagedDecoder, PagedModelConfig, PagedWeights,
)
from services.worker.paged.kv_blocks import BlockPool  # noqa: E402
from services.worker.paged.mixed_step import mixed_forward  # noqa: E402
from services.worker.paged.runner import ModelRunner  # noqa: E402
from services.worker.paged.scheduler import ScheduledChunk, StepPlan  # noqa: E402
from services.worker.paged.varlen_attention import varlen_paged_attention  # noqa: E402

SHAPES = {"served": PagedModelConfig(**{**vars(LLAMA2_7B), "vocab_size": 151936}), "qwen2-7b": QWEN2_7B}
SMOKE = PagedModelConfig(vocab_size=128, hidden_size=128, intermediate_size=192, num_layers=2, num_heads=4,
                         num_kv_heads=4)
BLOCK_TOKENS = 16
# (decode rows, prefill chunks of ~60 tokens): a late joiner wave, a mid-burst step, a full 2,048-token budget
STEPS = {"128 rows + 10 chunks": (128, 10), "64 rows + 20 chunks": (64, 20), "8 rows + 28 chunks": (8, 28)}
LAUNCHES = [dict(block_m=m, block_n=n, num_warps=w) for m in (16, 32, 64, 128) for n in (32, 64, 128) for w in (4, 8)
            if not (m == 128 and n == 128)]


def event_ms(fn, repeats: int = 20) -> float:
    times = []
    for _ in range(repeats + 3):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times[3:])


def build_plan(pool: BlockPool, rows: int, chunks: int, rng: random.Random, vocab: int) -> StepPlan:
    planned, key = [], 0
    for _ in range(rows):
        context = rng.randint(40, 300)
        pool.allocate(key, context)
        planned.append(ScheduledChunk(key, (rng.randrange(vocab),), context - 1, pool.block_table(key), True))
        key += 1
    for _ in range(chunks):
        prompt = rng.randint(40, 80)
        pool.allocate(key, prompt)
        planned.append(ScheduledChunk(key, tuple(rng.randrange(vocab) for _ in range(prompt)), 0,
                                      pool.block_table(key), True))
        key += 1
    return StepPlan(tuple(planned), (), sum(len(c.token_ids) for c in planned))


def kernel_table(runner: ModelRunner, prepared, steps: int = 3) -> list[dict]:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            runner.step(prepared)
        torch.cuda.synchronize()
    totals = defaultdict(lambda: [0.0, 0])
    for event in prof.key_averages():
        if event.device_time_total > 0:
            totals[event.key][0] += event.device_time_total / 1e3 / steps
            totals[event.key][1] += event.count // steps
    ranked = sorted(totals.items(), key=lambda kv: -kv[1][0])
    return [dict(kernel=name[:90], ms_per_step=round(ms, 3), launches_per_step=count) for name, (ms, count) in ranked]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="served",
                        help="served: Llama-2-7B layers with Qwen's vocabulary (bench/gpu_serving.py's); "
                        "qwen2-7b: grouped-query attention, 4 KV heads")
    parser.add_argument("--no-profile", action="store_true", help="skip the eager kernel table")
    args = parser.parse_args()
    device = torch.device("cpu" if args.smoke else "cuda")
    config, dtype = (SMOKE, torch.float32) if args.smoke else (SHAPES[args.shape], torch.bfloat16)
    weights = PagedWeights.random(config, device, dtype)
    num_blocks = 6000
    decoder = PagedDecoder(config, weights, num_blocks, BLOCK_TOKENS)
    for cache in decoder.k_caches + decoder.v_caches:
        cache.normal_()
    runner = ModelRunner(decoder, use_cuda_graphs=not args.smoke, max_model_tokens=4096, max_graph_chunks=256,
                         rows_attended_limit=0)
    rate = matmul_flops_per_s(device)  # 1e11 on the CPU
    matrix_params = sum(layer.qkv.numel() + layer.out.numel() + layer.gate_up.numel() + layer.down.numel()
                        for layer in weights.layers)
    report = dict(device=torch.cuda.get_device_name() if not args.smoke else "cpu", torch=torch.__version__,
                  shape=args.shape,
                  date=datetime.now(UTC).isoformat(timespec="seconds"), command="python3 " + " ".join(sys.argv),
                  matmul_tflops=round(rate / 1e12, 1), steps=[])
    print(f"{report['device']}: bf16 matmul {rate / 1e12:.0f} TFLOP/s", flush=True)
    rng = random.Random(0)
    for name, (rows, chunks) in STEPS.items():
        pool = BlockPool(num_blocks, BLOCK_TOKENS)
        plan = build_plan(pool, rows, chunks, rng, config.vocab_size)
        if args.smoke:
            kept = plan.chunks[:3] + plan.chunks[-3:]
            plan = StepPlan(kept, (), sum(len(c.token_ids) for c in kept))
        tokens = plan.num_batched_tokens
        bound_ms = 2 * tokens * matrix_params / rate * 1e3
        entry = dict(step=name, tokens=tokens, chunks=len(plan.chunks), flop_bound_ms=round(bound_ms, 2))
        if not args.smoke:
            graphed = runner.prepare(plan)
            if graphed.mixed_graph is not None:  # else larger than the largest bucket: eager only
                entry["bucket_tokens"] = graphed.mixed_graph.layout.tokens
                entry["graph_ms"] = round(event_ms(lambda: runner.step(graphed)), 2)  # noqa: B023
            eager_runner = ModelRunner(decoder, max_model_tokens=4096, rows_attended_limit=0)
            eager = eager_runner.prepare(plan)
            if not args.no_profile:
                kernels = kernel_table(eager_runner, eager)
                entry["eager_gpu_kernels"] = kernels[:12]
                entry["eager_gpu_ms"] = round(sum(k["ms_per_step"] for k in kernels), 2)
            inputs = eager.mixed
            q = torch.randn(tokens, config.num_heads, config.head_dim, device=device, dtype=dtype)
            k_cache, v_cache = decoder.k_caches[0], decoder.v_caches[0]
            timings = []
            for launch in LAUNCHES:
                def attend(launch=launch):
                    varlen_paged_attention(q, k_cache, v_cache, inputs.block_tables, inputs.context_lens,
                                           inputs.query_starts, decoder.scale, **launch)
                # captured, one call a layer: the host's launch time stays out of the kernels' timing
                layer_s = graphed_time_s(attend, device, calls=config.num_layers, replays=5)
                timings.append(dict(launch, ms_all_layers=round(1e3 * layer_s * config.num_layers, 3)))
            entry["varlen_attention"] = sorted(timings, key=lambda t: t["ms_all_layers"])
        else:
            logits = mixed_forward(decoder, runner.prepare(plan).mixed)
            entry["logits_finite"] = bool(torch.isfinite(logits).all())
        report["steps"].append(entry)
        print(json.dumps({k: v for k, v in entry.items() if k not in ("eager_gpu_kernels", "varlen_attention")}),
              flush=True)
        for kernel in entry.get("eager_gpu_kernels", []):
            print(f"    {kernel['ms_per_step']:8.3f} ms  x{kernel['launches_per_step']:<5} {kernel['kernel']}")
        for timing in entry.get("varlen_attention", [])[:4] + entry.get("varlen_attention", [])[-2:]:
            print(f"    varlen {timing}")
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "mixed_step.json").write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
