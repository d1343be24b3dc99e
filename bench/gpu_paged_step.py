"""GPU benchmark of the paged ragged decode step (issue 23) against its roofline.

Run on an H100/H200 (the device tool):  PYTHONUNBUFFERED=1 python3 bench/gpu_paged_step.py --out $OUT
On the CPU, `--smoke` runs the same code on a tiny shape, eagerly (set TRITON_INTERPRET=1 to run
the Triton kernels in Triton's interpreter): it checks the script, not the speed.

For the Llama-2-7B and Qwen2-7B shapes with random bf16 weights:
  1. the ceilings: device-to-device copy bandwidth (bytes read + written, as bench/gpu_engine.py)
     and the bf16 matrix rate (8192^3 products on random data);
  2. the Triton paged attention against the torch reference on ragged lengths (max abs error);
     the whole Triton step against the torch step (logits);
  3. the attention kernel alone per launch shape (tokens per loop, warps, stages), graph-replayed,
     as bandwidth over the KV bytes it must read: the best shape per batch is used in the step;
  4. the decode step captured as a CUDA graph at 1, 16, 64 and 256 rows whose context lengths are
     drawn uniformly from 32..512, against roofline = max(bytes / copy bandwidth, FLOPs / matrix
     rate), bytes = weights read (only the batch's embedding rows) + KV of the tokens present;
     with the step's GEMMs alone and the attention alone timed the same way, for where time goes.
Writes paged_step.json, paged_step.md (and paged_step.png with matplotlib) under --out and prints
the table last.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from services.worker.paged import attention  # noqa: E402
from services.worker.paged.decode_step import (  # noqa: E402
    LLAMA2_7B, QWEN2_7B, GraphedDecode, PagedDecoder, PagedModelConfig, PagedWeights,
)
from services.worker.paged.kv_blocks import BlockPool  # noqa: E402
from services.worker.paged.skinny_gemm import linear  # noqa: E402

SHAPES = {"llama2-7b": LLAMA2_7B, "qwen2-7b": QWEN2_7B}
SMOKE = PagedModelConfig(vocab_size=128, hidden_size=128, intermediate_size=192, num_layers=2, num_heads=4,
                         num_kv_heads=2, has_qkv_bias=True)
BLOCK_TOKENS = 16
# Run 2 (reports/gpu/paged_step) swept chunk 16/32/64 x warps 2/4 x prefetch x tensor cores: tl.dot won
# everywhere and prefetching never did, so those are now the kernel's defaults and only the chunk size
# and warps are swept here (128-token chunks and 8 warps added for the short grouped-query grids)
LAUNCHES = [dict(block_l=bl, num_warps=w) for bl in (32, 64, 128) for w in (4, 8)]
SPLITS = (1, 2, 4, 8)


def gemm_launches(batch: int) -> list[dict]:
    """The Triton GEMM launches swept at this many rows. Up to 16 rows run 4's set (32-128 columns,
    128/256-deep K tiles, 3 or 5 stages) plus split-K; at 64 rows wide column tiles split 2-8 ways
    along K (x re-read once per column tile); beyond, 64/128-row tiles as a compute-bound GEMM."""
    if batch <= 16:
        return ([dict(block_n=n, block_k=k, num_stages=st, num_warps=4)
                 for n in (32, 64, 128) for k in (128, 256) for st in (3, 5)]
                + [dict(block_n=n, block_k=128, num_stages=4, num_warps=4, splits=sp)
                   for n, sp in ((64, 2), (128, 2), (128, 4))])
    if batch <= 64:
        return [dict(block_n=n, block_k=k, num_stages=st, num_warps=4, splits=sp)
                for n, sp in ((32, 1), (32, 2), (64, 1), (64, 2), (64, 4), (128, 1), (128, 2), (128, 4), (256, 4), (256, 8))
                for k, st in ((64, 4), (128, 3), (128, 4))]
    return [dict(block_m=m, block_n=n, block_k=64, num_stages=st, num_warps=w, splits=sp)
            for m, n, w in ((64, 128, 4), (64, 256, 8), (128, 128, 8), (128, 256, 8))
            for st in (3, 4) for sp in (1, 2)]

LOG: list[str] = []


def say(message: str) -> None:
    LOG.append(message)
    print(message, flush=True)


@dataclass
class BenchCases:
    """What every paged-step bench run measures on: the device, its dtype, the row counts, the rows'
    context lengths (uniform min..max, seed 0: the same in every bench) and the model shapes."""

    device: torch.device
    dtype: torch.dtype
    batches: list[int]
    lengths: list[int]
    shapes: dict[str, PagedModelConfig]


def add_case_arguments(parser: argparse.ArgumentParser, *, shapes: str, batches: str) -> None:
    """The arguments `bench_cases` reads, and --out: the paged GPU benches' common ones (defaults theirs)."""
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--smoke", action="store_true", help="tiny shape, eager, any device: checks the script")
    parser.add_argument("--shapes", default=shapes)
    parser.add_argument("--batches", default=batches)
    parser.add_argument("--min-context", type=int, default=32)
    parser.add_argument("--max-context", type=int, default=512)


def bench_cases(args: argparse.Namespace) -> BenchCases:
    """From the benches' common arguments (--smoke, --batches, --min-context, --max-context, --shapes);
    --smoke: the tiny shape at 2 and 4 rows of 32-40 tokens."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    batches = [2, 4] if args.smoke else [int(b) for b in args.batches.split(",")]
    max_context = 40 if args.smoke else args.max_context
    gen = torch.Generator().manual_seed(0)
    lengths = torch.randint(args.min_context, max_context + 1, (max(*batches, 8),), generator=gen).tolist()
    shapes = {"smoke": SMOKE} if args.smoke else {name: SHAPES[name] for name in args.shapes.split(",")}
    return BenchCases(device, torch.bfloat16 if device.type == "cuda" else torch.float32, batches, lengths, shapes)


def copy_bandwidth_bytes_per_s(device: torch.device) -> float:
    """As bench/gpu_engine.py: a 2 GiB device-to-device copy, bytes read + written, median of 20."""
    if device.type != "cuda":
        return 20e9
    src = torch.randn(2**29, device=device)
    dst = torch.empty_like(src)
    times_s = [event_time_s(functools.partial(dst.copy_, src)) for _ in range(25)][5:]
    del src, dst
    torch.cuda.empty_cache()
    return 2 * 2**31 / statistics.median(times_s)


def matmul_flops_per_s(device: torch.device) -> float:
    """bf16 8192^3 products on random data (never zeros: they run faster), median of 10 after 3."""
    if device.type != "cuda":
        return 1e11
    n = 8192
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    times_s = [event_time_s(functools.partial(torch.mm, a, b)) for _ in range(13)][3:]
    del a, b
    torch.cuda.empty_cache()
    return 2 * n**3 / statistics.median(times_s)


def event_time_s(fn) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3


def graphed_time_s(fn, device: torch.device, *, calls: int = 1, replays: int = 20) -> float:
    """Median seconds of one call of fn, captured `calls` times in one CUDA graph (eager on the CPU)."""
    if device.type != "cuda":
        started_s = time.perf_counter()
        fn()
        return time.perf_counter() - started_s
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    for _ in range(3):
        graph.replay()
    times_s = [event_time_s(graph.replay) for _ in range(replays)]
    del graph
    return statistics.median(times_s) / calls


class Case:
    """One model shape: weights, a decoder whose pool holds `max_rows` rows of random context
    lengths (K/V filled with random values), and the rows' bookkeeping."""

    def __init__(self, config: PagedModelConfig, weights: PagedWeights, lengths: list[int], kv_layout: str) -> None:
        self.config, self.weights = config, weights
        self.pool = BlockPool(sum(-(-n // BLOCK_TOKENS) for n in lengths) + 8, BLOCK_TOKENS)
        self.decoder = PagedDecoder(config, self.weights, self.pool.num_blocks, BLOCK_TOKENS, kv_layout=kv_layout)
        for row, length in enumerate(lengths):
            self.pool.allocate(row, length)  # the step's own token is the last of `length`
        for cache in self.decoder.k_caches + self.decoder.v_caches:
            cache.normal_()
        self.lengths = lengths
        self.table_width = -(-max(lengths) // BLOCK_TOKENS)
        self.device = weights.embed.device

    def fill(self, inputs, batch: int) -> None:
        rows = list(range(batch))
        gen = torch.Generator().manual_seed(batch)
        tokens = torch.randint(0, self.config.vocab_size, (batch,), generator=gen).tolist()
        positions = [self.lengths[r] - 1 for r in rows]
        slots = [self.pool.slot(r, p) for r, p in zip(rows, positions, strict=True)]
        self.decoder.fill(inputs, tokens, positions, slots, self.pool.table_tensor(rows, width=self.table_width))

    def roofline(self, batch: int, bw: float, flops_rate: float) -> dict:
        config = self.config
        tokens = sum(self.lengths[:batch])
        weight_bytes = self.weights.step_read_bytes(batch)
        kv_bytes = tokens * config.kv_bytes_per_token
        matrix_params = sum(layer.qkv.numel() + layer.out.numel() + layer.gate_up.numel() + layer.down.numel()
                            for layer in self.weights.layers) + self.weights.lm_head.numel()
        flops = 2 * batch * matrix_params + 4 * tokens * config.num_heads * config.head_dim * config.num_layers
        memory_s, compute_s = (weight_bytes + kv_bytes) / bw, flops / flops_rate
        return dict(weight_bytes=weight_bytes, kv_bytes=kv_bytes, flops=flops, memory_roofline_ms=memory_s * 1e3,
                    compute_roofline_ms=compute_s * 1e3, roofline_ms=max(memory_s, compute_s) * 1e3,
                    bound="memory" if memory_s >= compute_s else "compute")


def check_kernels(case: Case, dtype) -> dict:
    """Triton attention vs the reference on 8 ragged rows (auto and forced splits), then the whole
    Triton step vs the torch step on the same rows (logits, greedy tokens)."""
    config, decoder, device = case.config, case.decoder, case.device
    batch = 8
    inputs = decoder.empty_inputs(batch, case.table_width)
    case.fill(inputs, batch)
    q = torch.randn(batch, config.num_heads, config.head_dim, device=device, dtype=dtype)
    args = (q, decoder.k_caches[0], decoder.v_caches[0], inputs.block_tables, inputs.context_lens, decoder.scale)
    ref = attention.paged_decode_attention_reference(*args).float()
    result = {"context_lens": inputs.context_lens.tolist()}
    for splits in (None, 1, 4):
        out = attention.paged_decode_attention(*args, num_splits=splits).float()
        key = f"attention_splits_{splits or 'auto'}"
        result[key + "_max_abs_error"] = (out - ref).abs().max().item()
        result[key + "_rel_error"] = ((out - ref).norm() / ref.norm()).item()
    decoder.use_triton = False
    torch_logits = decoder.decode(inputs).float()
    decoder.use_triton = None
    triton_logits = decoder.decode(inputs).float()
    result["step_logits_rel_error"] = ((triton_logits - torch_logits).norm() / torch_logits.norm()).item()
    result["step_greedy_agreement"] = (triton_logits.argmax(-1) == torch_logits.argmax(-1)).float().mean().item()
    result["step_logits_finite"] = bool(torch.isfinite(triton_logits).all())
    return result


def tune_attention(case: Case, batch: int, bw: float, dtype, sweep: bool) -> list[dict]:
    """The kernel alone over layer 0's cache (10 launches per graph). sweep: every launch shape with
    the automatic split count, then the best of them at each split count; else the defaults."""
    config, decoder = case.config, case.decoder
    inputs = decoder.empty_inputs(batch, case.table_width)
    case.fill(inputs, batch)
    q = torch.randn(batch, config.num_heads, config.head_dim, device=case.device, dtype=dtype)
    kv_bytes = sum(case.lengths[:batch]) * config.kv_bytes_per_token / config.num_layers
    rows = []

    def measure(launch):
        def run():
            attention.paged_decode_attention(q, decoder.k_caches[0], decoder.v_caches[0], inputs.block_tables,
                                             inputs.context_lens, decoder.scale, **launch)
        seconds = graphed_time_s(run, case.device, calls=10)
        rows.append(dict(launch, batch=batch, kv_layout=decoder.kv_layout, us=seconds * 1e6,
                         bandwidth_fraction=kv_bytes / seconds / bw))

    if not sweep or case.device.type != "cuda":
        measure({})
        return rows
    for launch in LAUNCHES:
        measure(launch)
    best = min(rows, key=lambda r: r["us"])
    for splits in SPLITS:
        measure(dict({k: best[k] for k in LAUNCHES[0]}, num_splits=splits))
    return rows


def tune_gemms(case: Case, batch: int, dtype) -> tuple[dict, list[dict]]:
    """Each of the step's products alone, cuBLAS (as torch runs it) against the Triton GEMM
    per launch shape (`gemm_launches`); every layer's matrix in turn (32 distinct weights per graph, so the smaller
    ones are not served from L2). Returns {weight shape: best launch, where faster than cuBLAS}."""
    weights, device = case.weights, case.device
    kinds = {
        "qkv": ([(l.qkv, l.qkv_bias) for l in weights.layers], False),
        "out": ([(l.out, None) for l in weights.layers], True),
        "gate_up": ([(l.gate_up, None) for l in weights.layers], False),
        "down": ([(l.down, None) for l in weights.layers], True),
        "lm_head": ([(weights.lm_head, None)], False),
    }
    chosen, rows = {}, []
    for kind, (matrices, has_residual) in kinds.items():
        width, depth = matrices[0][0].shape
        x = torch.randn(batch, depth, device=device, dtype=dtype)
        residual = torch.randn(batch, width, device=device, dtype=dtype) if has_residual else None

        def run(launch=None, matrices=matrices, x=x, residual=residual):
            for weight, bias in matrices:
                linear(x, weight, bias, residual, launch=launch)

        cublas_s = graphed_time_s(run, device) / len(matrices)
        rows.append(dict(kind=kind, batch=batch, launch="cublas", us=cublas_s * 1e6))
        best_s, best = cublas_s, None
        smoke_launches = [dict(block_n=32, block_k=64, num_stages=2)] if attention.IS_INTERPRETED else []
        for launch in gemm_launches(batch) if device.type == "cuda" else smoke_launches:
            if depth % launch["block_k"]:
                continue
            try:
                seconds = graphed_time_s(lambda launch=launch: run(launch), device) / len(matrices)
            except Exception as error:  # e.g. a pipeline deeper than shared memory holds
                rows.append(dict(kind=kind, batch=batch, launch=launch, error=type(error).__name__))
                continue
            rows.append(dict(kind=kind, batch=batch, launch=launch, us=seconds * 1e6))
            if seconds < best_s:
                best_s, best = seconds, launch
        rows.append(dict(kind=kind, batch=batch, launch="best", chosen=best, us=best_s * 1e6,
                         cublas_us=cublas_s * 1e6, calls=len(matrices)))
        if best is not None:
            chosen[(width, depth)] = best
    return chosen, rows


def gemms_time_s(case: Case, batch: int, dtype, library: str | None = None) -> float:
    """The step's matrix products alone (every layer's four, and lm_head) at this batch, through
    torch's default BLAS library or `library` ("cublaslt", "cublas")."""
    weights, hidden = case.weights, case.config.hidden_size
    x = torch.randn(batch, hidden, device=case.device, dtype=dtype)
    inner = torch.randn(batch, case.config.intermediate_size, device=case.device, dtype=dtype)
    attended = torch.randn(batch, case.config.num_heads * case.config.head_dim, device=case.device, dtype=dtype)

    def run():
        for layer in weights.layers:
            F.linear(x, layer.qkv, layer.qkv_bias)
            torch.addmm(x, attended, layer.out.t())
            F.linear(x, layer.gate_up)
            torch.addmm(x, inner, layer.down.t())
        F.linear(x, weights.lm_head)

    if library is None or case.device.type != "cuda":
        return graphed_time_s(run, case.device)
    default = torch.backends.cuda.preferred_blas_library()
    torch.backends.cuda.preferred_blas_library(library)
    try:
        return graphed_time_s(run, case.device)
    finally:
        torch.backends.cuda.preferred_blas_library(default)


def time_step(case: Case, batch: int, launch: dict, gemm_launch: dict) -> tuple[float, list[int]]:
    decoder = case.decoder
    decoder.attention_launch, decoder.gemm_launch = launch, gemm_launch
    decoder.skinny_gemm_rows = 0  # products not in gemm_launch through cuBLAS, as this bench compares
    if case.device.type != "cuda":
        inputs = decoder.empty_inputs(batch, case.table_width)
        case.fill(inputs, batch)
        return graphed_time_s(lambda: decoder.decode(inputs), case.device), []
    # a private memory pool per graph: a pool shared with a graph already freed fails to capture
    graphed = GraphedDecode(decoder, batch, case.table_width)
    case.fill(graphed.inputs, batch)
    for _ in range(3):
        graphed.replay()
    times_s = [event_time_s(graphed.replay) for _ in range(20)]
    tokens = graphed.next_tokens[:4].tolist()
    del graphed
    return statistics.median(times_s), tokens


def run_shape(name: str, config: PagedModelConfig, batches: list[int], lengths: list[int], bw: float,
              flops_rate: float, device, dtype, result: dict, save, args) -> list[dict]:
    weights = PagedWeights.random(config, device, dtype)
    shape_result = result.setdefault("shapes", {}).setdefault(name, {})
    rows = []
    for kv_layout in args.kv_layouts.split(","):
        started_s = time.monotonic()
        case = Case(config, weights, lengths, kv_layout)
        say(f"{name} {kv_layout}: built in {time.monotonic() - started_s:.1f} s, {case.pool.num_blocks} blocks of "
            f"{BLOCK_TOKENS}, {weights.step_read_bytes(1) / 1e9:.2f} GB read per step, "
            f"{config.kv_bytes_per_token} KV B/token")
        shape_result[f"check_{kv_layout}"] = check = check_kernels(case, dtype)
        say(f"{name} {kv_layout}: check {json.dumps({k: v for k, v in check.items() if k != 'context_lens'})}")
        save()
        for batch in batches:
            tuning = tune_attention(case, batch, bw, dtype, args.sweep_attention)
            shape_result.setdefault("attention_tuning", []).extend(tuning)
            best = min(tuning, key=lambda r: r["us"])
            launch = {k: best[k] for k in (*LAUNCHES[0], "num_splits") if k in best}
            gemm_launch, gemm_rows = tune_gemms(case, batch, dtype)
            shape_result.setdefault("gemm_tuning", []).extend(gemm_rows)
            cublas_s, tokens = time_step(case, batch, launch, {})
            skinny_s, skinny_tokens = time_step(case, batch, launch, gemm_launch) if gemm_launch else (None, [])
            step_s = min(cublas_s, skinny_s or cublas_s)
            best_gemms = [r for r in gemm_rows if r["launch"] == "best"]
            roof = case.roofline(batch, bw, flops_rate)
            row = dict(shape=name, kv_layout=kv_layout, rows=batch, mean_context=statistics.mean(lengths[:batch]),
                       step_ms=step_s * 1e3, ratio=step_s * 1e3 / roof["roofline_ms"],
                       step_cublas_ms=cublas_s * 1e3, step_skinny_gemm_ms=skinny_s and skinny_s * 1e3,
                       gemms_ms=gemms_time_s(case, batch, dtype) * 1e3,
                       gemms_best_ms=sum(r["us"] * r["calls"] for r in best_gemms) / 1e3 if best_gemms else None,
                       gemm_launch={f"{n}x{k}": v for (n, k), v in gemm_launch.items()},
                       attention_ms=best["us"] * config.num_layers / 1e3, attention_launch=launch,
                       attention_bandwidth_fraction=best["bandwidth_fraction"], sample_tokens=tokens,
                       sample_tokens_skinny_gemm=skinny_tokens, **roof)
            rows.append(row)
            say(_format_row(row))
            shape_result["rows"] = rows
            save()
        del case
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def _format_row(row: dict) -> str:
    return (f"{row['shape']:10s} {row['kv_layout']:11s} rows {row['rows']:4d} mean_context {row['mean_context']:6.1f} "
            f"step {row['step_ms']:7.3f} ms roofline {row['roofline_ms']:7.3f} ms ({row['bound']}) "
            f"ratio {row['ratio']:5.2f}x | cublas step {row['step_cublas_ms']:7.3f} gemms {row['gemms_ms']:7.3f} ms "
            f"(best {row['gemms_best_ms'] or float('nan'):7.3f}) attention {row['attention_ms']:6.3f} ms "
            f"({row['attention_bandwidth_fraction']:.0%} of copy bw)")


def markdown(result: dict, rows: list[dict]) -> str:
    lines = [
        f"Device {result['device']}, torch {result['torch']}, triton {result['triton']}, {result['date']}.",
        f"Copy bandwidth {result['copy_bandwidth_bytes_per_s'] / 1e12:.2f} TB/s, "
        f"bf16 matrix rate {result['matmul_flops_per_s'] / 1e12:.0f} TFLOP/s; context lengths uniform "
        f"{result['min_context']}..{result['max_context']}, blocks of {BLOCK_TOKENS} tokens.",
        "",
        "| shape | kv layout | rows | mean_context | step_ms | roofline_ms | bound | ratio | step_ms, cuBLAS only | "
        "gemms_ms (cuBLAS) | gemms_ms (best) | attention_ms | attention bw |",
        "| --- | --- | ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    lines += [f"| {r['shape']} | {r['kv_layout']} | {r['rows']} | {r['mean_context']:.1f} | {r['step_ms']:.3f} | "
              f"{r['roofline_ms']:.3f} | {r['bound']} | {r['ratio']:.2f} | {r['step_cublas_ms']:.3f} | "
              f"{r['gemms_ms']:.3f} | {r['gemms_best_ms'] or float('nan'):.3f} | {r['attention_ms']:.3f} | "
              f"{r['attention_bandwidth_fraction']:.0%} |" for r in rows]
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    for shape in sorted({r["shape"] for r in rows}):
        by_rows = {}
        for r in rows:  # the faster KV layout at each row count
            if r["shape"] == shape and (r["rows"] not in by_rows or r["step_ms"] < by_rows[r["rows"]]["step_ms"]):
                by_rows[r["rows"]] = r
        mine = sorted(by_rows.values(), key=lambda r: r["rows"])
        line = ax.plot([r["rows"] for r in mine], [r["step_ms"] for r in mine], "o-", label=f"{shape} step")[0]
        ax.plot([r["rows"] for r in mine], [r["roofline_ms"] for r in mine], "--", color=line.get_color(),
                label=f"{shape} roofline")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("rows (context lengths uniform 32..512)")
    ax.set_ylabel("decode step (ms)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_case_arguments(parser, shapes="llama2-7b,qwen2-7b", batches="1,16,64,256")
    parser.add_argument("--kv-layouts", default="token_major", help="comma list: token_major,head_major")
    parser.add_argument("--sweep-attention", action="store_true",
                        help="time every attention launch shape and split count (run 2), else the defaults")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    cases = bench_cases(args)
    device, dtype, batches, lengths = cases.device, cases.dtype, cases.batches, cases.lengths
    max_context = 40 if args.smoke else args.max_context
    triton_version = getattr(attention.triton, "__version__", None)
    result: dict = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__, "triton": triton_version, "command": " ".join(sys.argv),
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"), "block_tokens": BLOCK_TOKENS,
        "min_context": args.min_context, "max_context": max_context, "context_lens": lengths,
    }
    result["copy_bandwidth_bytes_per_s"] = bw = copy_bandwidth_bytes_per_s(device)
    result["matmul_flops_per_s"] = flops_rate = matmul_flops_per_s(device)
    say(f"device {result['device']}, torch {torch.__version__}, triton {triton_version}; copy bandwidth "
        f"{bw / 1e12:.2f} TB/s, bf16 matmul {flops_rate / 1e12:.0f} TFLOP/s")

    def save() -> None:  # after every stage: a run cut off by its time limit keeps what it measured
        (args.out / "paged_step.json").write_text(json.dumps(result, indent=2))
        (args.out / "paged_step_log.txt").write_text("\n".join(LOG) + "\n")

    rows: list[dict] = []
    for name, config in cases.shapes.items():
        rows += run_shape(name, config, batches, lengths, bw, flops_rate, device, dtype, result, save, args)
        result["rows"] = rows
        save()
    (args.out / "paged_step.md").write_text(markdown(result, rows))
    plot(rows, args.out / "paged_step.png")
    save()
    print("\n" + markdown(result, rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
