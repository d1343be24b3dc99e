"""Where one decode step's time goes (GEMMs, attention, the rest), and engine variants that attack each.

Run on an H100/H200 (the device tool):  python bench/gpu_decode_profile.py --out $OUT
Same 7B shape and roofline as bench/gpu_engine.py. Parts, each timed as CUDA-graph replays (median):
  gemm       the step's 32 x 4 weight GEMMs plus the LM head alone, per batch size and BLAS library;
  attention  the step's 32 decode attentions alone on the engine's KV views, per attention kernel;
  profile    one eagerly run (compiled-pieces) step under torch.profiler: GPU time by kernel family;
  step       whole decode steps through the engine (bench/gpu_engine.py's measurement) per variant.
Writes decode_profile.json under --out and prints a short table last.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.gpu_engine import (  # noqa: E402
    LLAMA2_7B, TINY, build_model, copy_bandwidth_bytes_per_s, say, static_rows,
)
from services.worker.engine import StaticBatchEngine, kv_bytes_per_token  # noqa: E402
from services.worker import triton_attention  # noqa: E402
from services.worker.fast_decoder import rope_cat, rope_roll  # noqa: E402

BLAS_LIBRARIES = ("cublas", "cublaslt")


def graph_replay_ms(fn, device: torch.device, replays: int = 20) -> float:
    """Median ms of one replay of `fn` captured as a CUDA graph (eager timing on the CPU)."""
    if device.type != "cuda":
        started_s = time.perf_counter()
        fn()
        return (time.perf_counter() - started_s) * 1e3
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()  # warm-up: lazy library init and compilation must not happen during capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    times_ms = []
    for _ in range(replays + 3):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times_ms.append(start.elapsed_time(end))
    del graph
    return statistics.median(times_ms[3:])


def gemm_rows(decoder, batches, device) -> list[dict]:
    """The step's weight GEMMs alone (every layer's own weights: no L2 reuse), per BLAS library."""
    rows = []
    hidden, inter = decoder.layers[0].out.shape[0], decoder.layers[0].down.shape[1]
    weight_bytes = sum(t.numel() * t.element_size() for l in decoder.layers for t in (l.qkv, l.out, l.gate_up, l.down))
    weight_bytes += decoder.lm_head.numel() * decoder.lm_head.element_size()
    for library in BLAS_LIBRARIES:
        try:
            torch.backends.cuda.preferred_blas_library(library)
        except Exception as error:  # noqa: BLE001 - an older torch: record and go on
            say(f"blas {library}: {error}")
            continue
        for batch in batches:
            x = torch.randn(batch, hidden, dtype=decoder.dtype, device=device)
            xi = torch.randn(batch, inter, dtype=decoder.dtype, device=device)

            def gemms(x=x, xi=xi) -> None:
                for layer in decoder.layers:
                    F.linear(x, layer.qkv)
                    F.linear(x, layer.out)
                    F.linear(x, layer.gate_up)
                    F.linear(xi, layer.down)
                F.linear(x, decoder.lm_head)

            ms = graph_replay_ms(gemms, device)
            rows.append(dict(part="gemm", blas=library, batch=batch, ms=ms, weight_bytes=weight_bytes,
                             achieved_tb_per_s=weight_bytes / ms / 1e9))
            say(f"gemm {library:9s} B={batch:4d}: {ms:6.3f} ms = {weight_bytes / ms / 1e9:5.2f} TB/s of weights")
    torch.backends.cuda.preferred_blas_library("cublas")
    return rows


def attention_rows(engine, batches, attend_lengths, kernels, device) -> list[dict]:
    """The step's 32 decode attentions alone, over the engine's own KV views, per kernel."""
    backend, decoder = engine.static, engine.static.decoder
    rows = []
    for batch in batches:
        state = backend.state_for(batch)
        for attend in attend_lengths:
            state.mask.fill_(0.0)
            state.mask[: batch // 2, ..., :7] = float("-inf")  # half the rows left-padded by 7
            for t in state.k_views + state.v_views:
                t[:, :, :attend].normal_()
            q = torch.randn(batch, decoder.num_heads, 1, decoder.head_dim, dtype=decoder.dtype, device=device)
            kv_bytes = 2 * len(state.k_views) * batch * decoder.num_kv_heads * attend * decoder.head_dim * 2
            reference = None
            for kernel in kernels:
                mask = state.mask[..., :attend]

                def attend_all(kernel=kernel, mask=mask, attend=attend) -> torch.Tensor:
                    out = None
                    for k_cache, v_cache in zip(state.k_views, state.v_views, strict=True):
                        keys, values = k_cache[:, :, :attend], v_cache[:, :, :attend]
                        if kernel.startswith("triton_"):  # triton_<block tokens>_<warps>: a launch shape
                            block, warps = (int(x) for x in kernel.split("_")[1:])
                            out = triton_attention.decode_attention(q, keys, values, mask, decoder.scale,
                                                                    block_tokens=block, num_warps=warps)
                        elif kernel == "flash_nomask":  # FlashAttention ignoring the padding: a floor only
                            from torch.nn.attention import SDPBackend, sdpa_kernel

                            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                                out = F.scaled_dot_product_attention(q, keys, values, scale=decoder.scale)
                        else:
                            out = decoder.decode_attention(q, keys, values, mask, kernel)
                    return out

                try:
                    out = attend_all()
                    if kernel != "flash_nomask":
                        reference = out if reference is None else reference
                        error = ((out.float() - reference.float()).norm() / reference.float().norm()).item()
                    else:
                        error = float("nan")  # ignores the padding: a floor, not a candidate
                    ms = graph_replay_ms(attend_all, device)
                except Exception as failure:  # noqa: BLE001 - a kernel that cannot run here is a finding
                    say(f"attention {kernel} B={batch} L={attend}: {type(failure).__name__}: {failure}")
                    rows.append(dict(part="attention", kernel=kernel, batch=batch, attend_tokens=attend,
                                     error=f"{type(failure).__name__}: {failure}"))
                    continue
                rows.append(dict(part="attention", kernel=kernel, batch=batch, attend_tokens=attend, ms=ms,
                                 kv_bytes=kv_bytes, achieved_tb_per_s=kv_bytes / ms / 1e9, rel_error_vs_first=error))
                say(f"attention {kernel:12s} B={batch:4d} L={attend:5d}: {ms:6.3f} ms = "
                    f"{kv_bytes / ms / 1e9:5.2f} TB/s of KV, rel. error vs first {error:.1e}")
    return rows


def kernel_family(name: str) -> str:
    lowered = name.lower()
    if any(s in lowered for s in ("gemm", "gemv", "nvjet", "cutlass", "xmma", "sm90_", "cublas")):
        return "gemm"
    if any(s in lowered for s in ("fmha", "attention", "flash", "flex", "cudnn", "attn")):
        return "attention"
    if "triton" in lowered:
        return "triton(fused pieces)"
    return "other"


@torch.inference_mode()
def profile_rows(engine, batch, prompt_tokens, attention, device) -> dict:
    """One eager decode step (compiled pieces) under torch.profiler: GPU time by kernel family."""
    backend = engine.static
    state = backend.state_for(batch)
    state.mask.fill_(0.0)
    state.write_index.fill_(prompt_tokens)
    attend = prompt_tokens + 32
    for _ in range(2):
        backend.decoder.decode_step(state, attend, attention)
        state.write_index.fill_(prompt_tokens)
    torch.cuda.synchronize()
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        backend.decoder.decode_step(state, attend, attention)
        torch.cuda.synchronize()
    by_family: dict[str, float] = defaultdict(float)
    by_kernel: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for event in prof.events():
        if event.device_type != torch.autograd.DeviceType.CUDA:
            continue
        us = event.device_time if hasattr(event, "device_time") else event.cuda_time
        by_family[kernel_family(event.name)] += us / 1e3
        by_kernel[event.name][0] += us / 1e3
        by_kernel[event.name][1] += 1
    top = sorted(by_kernel.items(), key=lambda kv: -kv[1][0])[:15]
    say(f"profile B={batch} L={attend} ({attention}): GPU ms by family "
        + ", ".join(f"{k} {v:.3f}" for k, v in sorted(by_family.items(), key=lambda kv: -kv[1])))
    for name, (ms, count) in top:
        say(f"   {ms:7.3f} ms  x{count:4d}  {name[:110]}")
    return dict(part="profile", batch=batch, attend_tokens=attend, attention=attention, family_ms=dict(by_family),
                top_kernels=[dict(name=n, ms=v[0], count=v[1]) for n, v in top],
                kernels_per_step=sum(v[1] for v in by_kernel.values()))


def pre_attention_rows(decoder, batches, device) -> list[dict]:
    """The 32 layers' norm + qkv GEMM + rope alone, per rope form and compile mode, and the GEMM alone."""
    rows = []
    forms = [("compiled_dynamic_roll", rope_roll, True), ("compiled_static_roll", rope_roll, False),
             ("compiled_dynamic_cat", rope_cat, True), ("compiled_static_cat", rope_cat, False),
             ("eager_roll", rope_roll, None)]
    hidden_size = decoder.layers[0].out.shape[0]
    for batch in batches:
        hidden = torch.randn(batch, 1, hidden_size, dtype=decoder.dtype, device=device)
        positions = torch.randint(0, 512, (batch,), device=device)
        cos, sin = decoder.cos_table[positions][:, None], decoder.sin_table[positions][:, None]

        def gemm_only(hidden=hidden) -> None:
            for layer in decoder.layers:
                F.linear(hidden, layer.qkv, layer.qkv_bias)

        gemm_ms = graph_replay_ms(gemm_only, device)
        for name, rope, dynamic in forms:
            torch._dynamo.reset()
            decoder.rope = rope
            pre = decoder._pre_attention if dynamic is None else torch.compile(decoder._pre_attention, dynamic=dynamic)

            def run(pre=pre, hidden=hidden, cos=cos, sin=sin) -> None:
                for layer in decoder.layers:
                    pre(hidden, layer.input_norm, layer.qkv, layer.qkv_bias, cos, sin)

            ms = graph_replay_ms(run, device)
            rows.append(dict(part="pre_attention", form=name, batch=batch, ms=ms, qkv_gemm_ms=gemm_ms))
            say(f"pre-attention {name:22s} B={batch:4d}: {ms:6.3f} ms (qkv GEMMs alone {gemm_ms:6.3f} ms: "
                f"rest {ms - gemm_ms:6.3f} ms)")
    decoder.rope = rope_roll
    torch._dynamo.reset()
    return rows


def step_variant_rows(engine, variant, batches, prompts, new_tokens, weight_bytes, delta, bw, device, rng) -> list[dict]:
    """Whole decode steps per variant: "<attention>[+compile][+static][+cat][+lt][+bucketN]".

    attention: sdpa, cudnn, flex, bmm, triton, or autoN (triton up to N attended tokens, sdpa beyond);
    static: compile per shape (dynamic=False); cat: rope's half rotation as a cat instead of a roll.
    """
    backend, decoder = engine.static, engine.static.decoder
    parts = variant.split("+")
    library = "cublaslt" if "lt" in parts else "cublas"
    buckets = [int(p[len("bucket"):]) for p in parts if p.startswith("bucket")]
    backend.length_bucket_tokens = buckets[0] if buckets else 32
    attention = parts[0]
    if attention.startswith("auto"):
        decoder.short_attention_max_tokens, attention = int(attention[len("auto"):]), "auto"
    decoder.rope = rope_cat if "cat" in parts else rope_roll
    torch._dynamo.reset()
    if "compile" in parts and device.type == "cuda":
        decoder.compile_layer_pieces(dynamic=False if "static" in parts else None)
    torch.backends.cuda.preferred_blas_library(library)
    try:
        rows = static_rows(engine, [(b, p) for b in batches for p in prompts], new_tokens, weight_bytes, delta, bw,
                           device, rng, attention)
    except Exception as failure:  # noqa: BLE001 - record why a variant could not run, keep going
        say(f"variant {variant}: {type(failure).__name__}: {failure}")
        return [dict(part="step", variant=variant, error=f"{type(failure).__name__}: {failure}")]
    finally:
        torch.backends.cuda.preferred_blas_library("cublas")
        backend.length_bucket_tokens = 32
    for row in rows:
        row.update(part="step", variant=variant)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--tiny", action="store_true", help="small model on any device: a smoke test")
    parser.add_argument("--parts", default="gemm,attention,pre,profile,step")
    parser.add_argument("--batches", default="1,32,64,128")
    parser.add_argument("--prompts", default="64")
    parser.add_argument("--attention-kernels", default="sdpa,triton_32_4,triton_64_4,triton_64_8,triton_128_8")
    parser.add_argument("--variants", default="sdpa+compile+cat,auto256+compile+cat,auto128+compile+cat,"
                                              "auto256+compile+static+cat")
    parser.add_argument("--new-tokens", type=int, default=64)
    args = parser.parse_args()
    parts = set(args.parts.split(","))
    args.out.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch._dynamo.config.cache_size_limit = 64  # one compiled flex kernel per attention length
    rng = random.Random(0)
    bw = copy_bandwidth_bytes_per_s(device)
    model = build_model(TINY if args.tiny else LLAMA2_7B, device, dtype)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    delta = kv_bytes_per_token(model.config, dtype)
    engine = StaticBatchEngine(
        "llama2-7b-shape-random", device=device.type, dtype="bfloat16" if device.type == "cuda" else "float32",
        backend="static", loaded=(model, SimpleNamespace(pad_token_id=0, eos_token_id=2)),
        cuda_reserve_bytes=6 * 2**30, cpu_kv_budget_bytes=64 * 2**20,
    )
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    result: dict = dict(device=name, torch=torch.__version__, command=" ".join(sys.argv), copy_bandwidth_bytes_per_s=bw,
                        weight_bytes=weight_bytes, kv_bytes_per_token=delta, rows=[])
    say(f"device {name}, torch {torch.__version__}, copy bandwidth {bw / 1e12:.2f} TB/s, weights "
        f"{weight_bytes / 1e9:.2f} GB -> weight-only roofline {weight_bytes / bw * 1e3:.2f} ms")
    batches = [int(b) for b in args.batches.split(",")] if not args.tiny else [2, 4]
    prompts = [int(p) for p in args.prompts.split(",")] if not args.tiny else [16]
    new_tokens = args.new_tokens if not args.tiny else 8

    def save() -> None:
        (args.out / "decode_profile.json").write_text(json.dumps(result, indent=2))

    if device.type == "cuda":
        engine.static.decoder.compile_layer_pieces()
    if "gemm" in parts:
        result["rows"] += gemm_rows(engine.static.decoder, batches, device)
        save()
    if "attention" in parts:
        lengths = sorted({p + d for p in prompts for d in (32, 64)} | {256})
        result["rows"] += attention_rows(engine, [b for b in batches if b >= 32] or batches, lengths,
                                         args.attention_kernels.split(","), device)
        save()
    if "pre" in parts:
        result["rows"] += pre_attention_rows(engine.static.decoder, [b for b in batches if b >= 32] or batches, device)
        save()
    if "profile" in parts and device.type == "cuda":
        for attention in ("sdpa", "triton"):
            result["rows"].append(profile_rows(engine, max(batches), prompts[0], attention, device))
        save()
    if "step" in parts:
        for variant in args.variants.split(","):
            result["rows"] += step_variant_rows(engine, variant, batches, prompts, new_tokens, weight_bytes, delta, bw,
                                                device, rng)
            save()
    print("\nvariant                      B    L   step ms  roofline  ratio")
    for row in result["rows"]:
        if row.get("part") == "step" and "decode_step_ms" in row:
            print(f"{row['variant']:26s} {row['batch']:4d} {row['prompt_tokens']:4d} {row['decode_step_ms']:8.2f} "
                  f"{row['roofline_step_ms']:8.2f} {row['ratio']:6.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
