"""GPU engine benchmark: decode step against the memory-bandwidth roofline, memory model, OOM.

Run on an H100/H200 (the device tool):  python bench/gpu_engine.py --out $OUT
On the CPU, `--tiny` runs the same code on a small model as a smoke test (no graphs, no timing claims).

Builds a Llama-2-7B shape with random bf16 weights in place (no download), then measures:
  1. copy bandwidth (device-to-device, bytes read + written), the roofline's denominator;
  2. plain HF `generate` (reference rows) and the static-KV-pool engine with decode steps replayed
     as CUDA graphs (two attention variants), decode step time vs the roofline
     (weight bytes + KV bytes of the tokens present, no padding) / copy bandwidth;
  3. the memory model: MEM(B) = B (L + G) Delta against torch's measured peak for plain generate;
  4. transformers' continuous batching (`generate_batch`) throughput on a mixed-length batch;
  5. a forced OOM (a batch larger than Theta, the batcher's cap bypassed) recovered by the real
     scheduler's split-and-requeue, every request completing.
Writes engine.json and engine_log.txt under --out and prints a table last.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.gpu_oom_recovery import run_oom_recovery  # noqa: E402
from services.worker.engine import StaticBatchEngine, kv_bytes_per_token  # noqa: E402
from services.worker.model_builder import build_random_model  # noqa: E402

LLAMA2_7B = dict(
    vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
    num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
)
TINY = dict(
    vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=4096,
)
MEMORY_GRID = [(8, 512, 64), (32, 512, 64), (32, 1024, 64), (64, 512, 64), (16, 2048, 64)]  # (B, L, G)
LOG: list[str] = []


def say(message: str) -> None:
    LOG.append(message)
    print(message, flush=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def copy_bandwidth_bytes_per_s(device: torch.device) -> float:
    """Device-to-device copy of 2 GiB, counting bytes read plus written; median of 20."""
    if device.type != "cuda":
        return 20e9
    src = torch.randn(2**29, device=device)  # 2 GiB of float32
    dst = torch.empty_like(src)
    times_s = []
    for i in range(25):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        if i >= 5:
            times_s.append(start.elapsed_time(end) / 1e3)
    del src, dst
    torch.cuda.empty_cache()
    return 2 * 2**31 / sorted(times_s)[len(times_s) // 2]


def build_model(shape: dict, device: torch.device, dtype: torch.dtype):
    from transformers import LlamaConfig

    return build_random_model(LlamaConfig(**shape), device, dtype)


def random_rows(batch: int, prompt_tokens: int, vocab: int, rng: random.Random) -> list[list[int]]:
    return [[rng.randrange(3, vocab) for _ in range(prompt_tokens)] for _ in range(batch)]


def timed(fn, device: torch.device) -> float:
    sync(device)
    started_s = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - started_s


def decode_step_s(run_with_steps, new_tokens: int, device: torch.device) -> tuple[float, float]:
    """(decode step seconds, prefill seconds): T(G) and T(1) after a warm-up of each."""
    run_with_steps(new_tokens)
    run_with_steps(1)
    total_s = min(timed(lambda: run_with_steps(new_tokens), device) for _ in range(2))
    prefill_s = min(timed(lambda: run_with_steps(1), device) for _ in range(2))
    return (total_s - prefill_s) / (new_tokens - 1), prefill_s


def roofline_step_s(weight_bytes: int, delta: int, batch: int, prompt_tokens: int, new_tokens: int, bw: float) -> float:
    """Weights once plus the KV of the tokens present, averaged over the decode steps."""
    mean_present_tokens = prompt_tokens + new_tokens / 2
    return (weight_bytes + delta * batch * mean_present_tokens) / bw


def hf_generate_rows(model, grid, new_tokens, weight_bytes, delta, bw, device, rng) -> list[dict]:
    rows = []
    for batch, prompt_tokens in grid:
        ids = torch.tensor(random_rows(batch, prompt_tokens, model.config.vocab_size, rng), device=device)

        def run(steps: int, ids=ids) -> None:
            with torch.inference_mode():
                model.generate(
                    input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=steps, min_new_tokens=steps,
                    do_sample=False, pad_token_id=0, eos_token_id=None,
                )

        step_s, prefill_s = decode_step_s(run, new_tokens, device)
        roof_s = roofline_step_s(weight_bytes, delta, batch, prompt_tokens, new_tokens, bw)
        rows.append(_row("hf_generate", batch, prompt_tokens, new_tokens, step_s, roof_s, prefill_s))
        say(_format_row(rows[-1]))
    return rows


def memory_model_rows(model, grid, delta, weight_bytes, device, rng) -> list[dict]:
    """Peak bytes allocated above the weights during plain generate, against MEM(B)."""
    rows = []
    if device.type != "cuda":
        return rows
    for batch, prompt_tokens, new_tokens in grid:
        ids = torch.tensor(random_rows(batch, prompt_tokens, model.config.vocab_size, rng), device=device)
        torch.cuda.empty_cache()
        base_bytes = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        with torch.inference_mode():
            model.generate(
                input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                min_new_tokens=new_tokens, do_sample=False, pad_token_id=0, eos_token_id=None,
            )
        peak_bytes = torch.cuda.max_memory_allocated(device) - base_bytes
        predicted_bytes = batch * (prompt_tokens + new_tokens) * delta
        rows.append(
            dict(batch=batch, prompt_tokens=prompt_tokens, new_tokens=new_tokens, predicted_bytes=predicted_bytes,
                 measured_peak_bytes=peak_bytes, ratio=peak_bytes / predicted_bytes)
        )
        say(f"memory model B={batch} L={prompt_tokens} G={new_tokens}: MEM(B)={predicted_bytes/2**30:.2f} GiB, "
            f"peak above weights {peak_bytes/2**30:.2f} GiB, ratio {peak_bytes/predicted_bytes:.3f}")
    return rows


def static_memory_rows(engine, grid, delta, device, rng) -> list[dict]:
    """The static engine's memory for a batch: the KV slots it occupies in the pool, B (L + G) Delta by
    construction, plus everything torch allocates beyond the pool while it runs (prefill activations,
    logits, graphs captured for it), against MEM(B)."""
    rows = []
    if device.type != "cuda":
        return rows
    backend = engine.static

    def beyond_pool_bytes(batch: int, prompt_tokens: int, new_tokens: int) -> int:
        prompts = random_rows(batch, prompt_tokens, engine.model.config.vocab_size, rng)
        torch.cuda.synchronize(device)
        base_bytes = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        backend.generate(prompts, 0, [new_tokens] * batch, set())
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base_bytes

    # the prefill workspace, W(tokens in one prefill chunk) = a + b x tokens, from two probes off the grid
    probes = [(1, 1000), (6, 1000)]
    (t0, w0), (t1, w1) = [(b * p, beyond_pool_bytes(b, p, 1)) for b, p in probes]
    slope, intercept = (w1 - w0) / (t1 - t0), w0 - (w1 - w0) / (t1 - t0) * t0
    say(f"prefill workspace probes {probes}: {intercept / 2**20:.0f} MiB + {slope / 2**10:.1f} KiB per chunk token")
    for batch, prompt_tokens, new_tokens in grid:
        if batch * (prompt_tokens + new_tokens) > backend.capacity_tokens:
            continue
        kv_bytes = batch * (prompt_tokens + new_tokens) * delta  # MEM(B): the batch's slots in the pool
        chunk_tokens = backend.prefill_chunk_rows(prompt_tokens, batch) * prompt_tokens
        predicted_bytes = kv_bytes + intercept + slope * chunk_tokens
        measured_bytes = kv_bytes + beyond_pool_bytes(batch, prompt_tokens, new_tokens)
        rows.append(dict(batch=batch, prompt_tokens=prompt_tokens, new_tokens=new_tokens, kv_bytes=kv_bytes,
                         predicted_bytes=predicted_bytes, measured_peak_bytes=measured_bytes,
                         kv_only_ratio=measured_bytes / kv_bytes, ratio=measured_bytes / predicted_bytes))
        say(f"static memory B={batch} L={prompt_tokens} G={new_tokens}: KV {kv_bytes/2**30:.2f} GiB + workspace "
            f"of a {chunk_tokens}-token chunk = {predicted_bytes/2**30:.2f} GiB predicted, measured "
            f"{measured_bytes/2**30:.2f} GiB (pool slots + peak beyond the pool): ratio {measured_bytes/predicted_bytes:.3f}")
    return rows


def continuous_batching_row(model, num_requests, new_tokens, device, rng) -> dict:
    """transformers' own continuous batching on prompts of mixed lengths (64..1024 tokens)."""
    from transformers import GenerationConfig

    inputs = [random_rows(1, rng.randint(64, 1024), model.config.vocab_size, rng)[0] for _ in range(num_requests)]
    config = GenerationConfig(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                              eos_token_id=None, pad_token_id=0)
    try:
        model.generate_batch(inputs=inputs[:4], generation_config=config)  # warm-up
        elapsed_s = timed(lambda: model.generate_batch(inputs=inputs, generation_config=config), device)
    except Exception as error:  # noqa: BLE001 - record why the mode could not run, keep benchmarking
        say(f"continuous batching failed: {type(error).__name__}: {error}")
        return dict(engine="hf_continuous", error=f"{type(error).__name__}: {error}")
    tokens_per_s = num_requests * new_tokens / elapsed_s
    say(f"continuous batching: {num_requests} requests x {new_tokens} new tokens in {elapsed_s:.2f} s "
        f"= {tokens_per_s:.0f} tokens/s")
    return dict(engine="hf_continuous", num_requests=num_requests, new_tokens=new_tokens, run_s=elapsed_s,
                tokens_per_s=tokens_per_s)


def static_rows(engine, grid, new_tokens, weight_bytes, delta, bw, device, rng, variant) -> list[dict]:
    """variant: decode attention ("sdpa", "bmm", "triton", "auto" = triton for short lengths, SDPA beyond),
    "+compile" to fuse the layer pieces with torch.compile."""
    backend = engine.static
    attention, _, option = variant.partition("+")
    backend.attention = attention
    if option == "compile":  # per shape with batch buckets (the engine's default), else shape-generic
        backend.decoder.compile_layer_pieces(dynamic=backend.batch_bucket_rows == 1)
    elif option == "autotune":
        backend.decoder.compile_layer_pieces(mode="max-autotune-no-cudagraphs")
    backend.drop_graphs()
    rows = []
    for batch, prompt_tokens in grid:
        if batch * (prompt_tokens + new_tokens) > backend.capacity_tokens:
            say(f"skip static B={batch} L={prompt_tokens}: {batch * (prompt_tokens + new_tokens)} tokens > pool")
            continue
        prompts = random_rows(batch, prompt_tokens, engine.model.config.vocab_size, rng)

        def run(steps: int, prompts=prompts, batch=batch) -> None:
            backend.generate(prompts, 0, [steps] * batch, set())

        step_s, prefill_s = decode_step_s(run, new_tokens, device)
        roof_s = roofline_step_s(weight_bytes, delta, batch, prompt_tokens, new_tokens, bw)
        name = f"static_graph_{attention}" + {"compile": "_compiled", "autotune": "_autotuned"}.get(option, "")
        rows.append(_row(name, batch, prompt_tokens, new_tokens, step_s, roof_s, prefill_s))
        say(_format_row(rows[-1]))
    return rows


def numerics_check(engine, device, rng) -> dict:
    """Static prefill logits vs the HF forward on the same left-padded prompts (bf16)."""
    model, backend = engine.model, engine.static
    prompts = [random_rows(1, n, model.config.vocab_size, rng)[0] for n in (64, 40, 17, 64)]
    prompt_tokens = 64
    tokens = torch.zeros((4, prompt_tokens), dtype=torch.long, device=device)
    mask = torch.zeros_like(tokens)
    for i, row in enumerate(prompts):
        tokens[i, prompt_tokens - len(row):] = torch.tensor(row, device=device)
        mask[i, prompt_tokens - len(row):] = 1
    pads = (mask == 0).sum(dim=1)
    with torch.inference_mode():
        reference = model(input_ids=tokens, attention_mask=mask).logits[:, -1].float()
        state = backend.state_for(4)
        ours = backend.decoder.prefill(tokens, pads, state.k_views, state.v_views, return_logits=True).float()
    relative = ((ours - reference).norm() / reference.norm()).item()
    agree = (ours.argmax(-1) == reference.argmax(-1)).float().mean().item()
    say(f"numerics: static prefill logits vs HF forward: relative error {relative:.2e}, argmax agreement {agree:.2f}")
    return dict(relative_logit_error=relative, argmax_agreement=agree)


def _row(engine, batch, prompt_tokens, new_tokens, step_s, roof_s, prefill_s) -> dict:
    return dict(engine=engine, batch=batch, prompt_tokens=prompt_tokens, new_tokens=new_tokens,
                decode_step_ms=step_s * 1e3, roofline_step_ms=roof_s * 1e3, ratio=step_s / roof_s,
                prefill_ms=prefill_s * 1e3, decode_tokens_per_s=batch / step_s)


def _format_row(row: dict) -> str:
    return (f"{row['engine']:20s} B={row['batch']:4d} L={row['prompt_tokens']:5d} step {row['decode_step_ms']:8.2f} ms "
            f"roofline {row['roofline_step_ms']:7.2f} ms ratio {row['ratio']:5.2f}x prefill {row['prefill_ms']:8.1f} ms")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--tiny", action="store_true", help="small model on any device: a smoke test")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--reserve-gib", type=float, default=6.0, help="GPU memory kept out of the KV pool")
    parser.add_argument("--skip", default="", help="comma list of parts to skip: hf,memory,continuous,static,oom")
    parser.add_argument("--variants", default="sdpa+compile,auto+compile",
                        help="static-engine variants in order (compiled ones last: compiling is not undone)")
    parser.add_argument("--warmup-rows", type=int, default=0, help="time the worker's warm-up to this many rows")
    parser.add_argument("--batches", default="1,8,32,64,128")
    parser.add_argument("--prompts", default="64,512,2048")
    args = parser.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    args.out.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    rng = random.Random(0)
    result: dict = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                    "torch": torch.__version__, "command": " ".join(sys.argv)}
    import transformers

    result["transformers"] = transformers.__version__
    bw = copy_bandwidth_bytes_per_s(device)
    say(f"device {result['device']}, torch {torch.__version__}, transformers {transformers.__version__}; "
        f"copy bandwidth {bw / 1e12:.2f} TB/s")
    started_s = time.monotonic()
    model = build_model(TINY if args.tiny else LLAMA2_7B, device, dtype)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    delta = kv_bytes_per_token(model.config, dtype)
    say(f"model built in {time.monotonic() - started_s:.1f} s: {weight_bytes / 1e9:.2f} GB of weights, "
        f"Delta {delta} B/token")
    result.update(copy_bandwidth_bytes_per_s=bw, weight_bytes=weight_bytes, kv_bytes_per_token=delta)
    new_tokens = 8 if args.tiny else args.new_tokens

    rows: list[dict] = []
    result["rows"] = rows

    def save() -> None:  # after every stage: a run cut off by its time limit keeps what it measured
        (args.out / "engine.json").write_text(json.dumps(result, indent=2))
        (args.out / "engine_log.txt").write_text("\n".join(LOG) + "\n")

    if "static" not in skip or "oom" not in skip:
        tokenizer = SimpleNamespace(pad_token_id=0, eos_token_id=2)  # ids in, ids out: no text needed
        engine = StaticBatchEngine(
            "llama2-7b-shape-random", device=device.type, dtype="bfloat16" if device.type == "cuda" else "float32",
            backend="static", loaded=(model, tokenizer), cuda_reserve_bytes=int(args.reserve_gib * 2**30),
            cpu_kv_budget_bytes=64 * 2**20,
        )
        result["theta_bytes"] = engine.free_kv_bytes
        result["pool_tokens"] = engine.static.capacity_tokens
        say(f"static engine: Theta {engine.free_kv_bytes / 2**30:.1f} GiB = {engine.static.capacity_tokens} tokens")
        result["numerics"] = numerics_check(engine, device, rng)
        save()
        if args.warmup_rows:  # the worker's start-up warm-up (MAGNUS_WORKER_WARMUP_BATCH_ROWS), timed per bucket
            warm: list[dict] = []
            started_s = time.monotonic()
            engine.static.warm_up(args.warmup_rows, on_bucket=lambda rows, s: (
                warm.append(dict(rows=rows, seconds=s)), say(f"warm-up bucket {rows:4d} rows: {s:6.2f} s")))
            say(f"warm-up: {len(warm)} buckets in {time.monotonic() - started_s:.1f} s")
            result["warm_up"] = warm
            save()
        if "static" not in skip:
            batches = [int(b) for b in args.batches.split(",")] if not args.tiny else (2, 4)
            prompts = [int(p) for p in args.prompts.split(",")] if not args.tiny else (16, 32)
            for variant in args.variants.split(","):
                rows += static_rows(engine, [(b, p) for b in batches for p in prompts], new_tokens, weight_bytes,
                                    delta, bw, device, rng, variant)
                save()
        if "memory" not in skip:
            result["static_memory_model"] = static_memory_rows(engine, MEMORY_GRID, delta, device, rng)
            save()
        if "oom" not in skip:
            result["oom_recovery"] = run_oom_recovery(engine, say, tiny=args.tiny)
            save()
        engine.static = None  # give the KV pool back for the plain-generate stages
        del engine
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if "hf" not in skip:
        rows += hf_generate_rows(model, [(1, 512), (32, 512), (128, 512)] if not args.tiny else [(2, 16)],
                                 new_tokens, weight_bytes, delta, bw, device, rng)
        save()
    if "memory" not in skip:
        result["memory_model"] = memory_model_rows(model, MEMORY_GRID, delta, weight_bytes, device, rng)
        save()
    if "continuous" not in skip:
        result["continuous_batching"] = continuous_batching_row(model, 8 if args.tiny else 64, new_tokens, device, rng)
        save()
    save()
    print("\n" + "\n".join(_format_row(r) for r in rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
