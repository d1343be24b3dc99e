"""Where a graph-replayed paged decode step's time goes, kernel by kernel, and how much is gaps.

Run on an H100/H200 (the device tool):  PYTHONUNBUFFERED=1 python3 bench/gpu_step_profile.py --out $OUT
On the CPU `--smoke` runs the tiny shape eagerly (TRITON_INTERPRET=1 for the kernels): it checks the script.

For each shape and row count the step is built as the worker serves it (`PagedDecoder` with its
default launches: Triton products where `skinny_gemm.default_launch` picks them, cuBLAS elsewhere),
captured as a CUDA graph (`GraphedDecode`), timed (median of 20 replays, CUDA events) and then
replayed under torch.profiler. From the profiler's kernel records of one replay: the kernels' summed
busy time by family (GEMM, attention, norm, rotary, SiLU, split-K sum, argmax, ...), their count,
and the step's span minus the busy time = time between kernels (launch gaps, ramp-up and drain).
The roofline is bench/gpu_paged_step.py's (max of bytes / measured copy bandwidth and FLOPs / measured
matrix rate). `--variants` times the step again with decoder attributes set (`name:attr=value,...`,
e.g. `cublas:skinny_gemm_rows=0`), so a change can be compared against the same case in one run.
Writes step_profile.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections import defaultdict
from datetime import UTC, datetime
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.gpu_paged_step import (  # noqa: E402
    Case, add_case_arguments, bench_cases, copy_bandwidth_bytes_per_s, event_time_s, matmul_flops_per_s,
)
from services.worker.paged.decode_step import GraphedDecode, PagedWeights  # noqa: E402

# kernel name fragments -> family (first match wins); cuBLAS kernels are named by their tile shape
FAMILIES = (
    ("paged_decode", "attention"), ("merge_splits", "attention merge"), ("add_rms_norm", "add + rms norm"),
    ("rms_norm", "rms norm"),
    ("rope_write", "rotary + kv write"), ("silu_mul", "silu-and-mul"), ("split_gemm", "triton gemm"),
    ("skinny_gemm", "triton gemm"), ("sum_splits", "split-k sum"), ("gemm", "cublas gemm"),
    ("sm90", "cublas gemm"), ("cutlass", "cublas gemm"), ("nvjet", "cublas gemm"), ("splitk", "cublas gemm"),
    ("argmax", "argmax"), ("embedding", "embedding"), ("index", "embedding"),
    ("elementwise", "torch elementwise (copy, add)"),
)


def family(name: str) -> str:
    lowered = name.lower()
    return next((label for fragment, label in FAMILIES if fragment in lowered), "other")


def parse_variant(text: str) -> tuple[str, dict]:
    """'name:attr=value,attr=value' -> (name, {attr: value}); values parsed as JSON where they parse."""
    name, _, assignments = text.partition(":")
    settings = {}
    for assignment in filter(None, assignments.split(",")):
        key, _, value = assignment.partition("=")
        try:
            settings[key] = json.loads(value)
        except json.JSONDecodeError:
            settings[key] = value
    return name, settings


def profile_replay(graphed: GraphedDecode) -> dict:
    """Kernel records of one replay: busy time per family, kernel count, span and gaps (us)."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        graphed.replay()
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA and e.device_time > 0]
    if not kernels:
        return {}
    busy = defaultdict(float)
    counts = defaultdict(int)
    for kernel in kernels:
        busy[family(kernel.name)] += kernel.device_time
        counts[family(kernel.name)] += 1
    starts = [k.time_range.start for k in kernels]
    ends = [k.time_range.end for k in kernels]
    span_us = max(ends) - min(starts)
    busy_us = sum(busy.values())
    return dict(kernels=len(kernels), span_us=span_us, busy_us=busy_us, gap_us=span_us - busy_us,
                families={f: dict(us=busy[f], count=counts[f]) for f in sorted(busy, key=busy.get, reverse=True)},
                top_kernels=sorted(({"name": k.name[:90], "us": k.device_time} for k in kernels),
                                   key=lambda k: -k["us"])[:12])


def step_ms(case: Case, batch: int, settings: dict) -> tuple[float, GraphedDecode | None, list[int]]:
    decoder = case.decoder
    saved = {key: getattr(decoder, key) for key in settings}
    for key, value in settings.items():
        setattr(decoder, key, value)
    try:
        if case.device.type != "cuda":
            inputs = decoder.empty_inputs(batch, case.table_width)
            case.fill(inputs, batch)
            logits = decoder.decode(inputs)
            return float("nan"), None, logits.argmax(-1)[:4].tolist()
        graphed = GraphedDecode(decoder, batch, case.table_width)
        case.fill(graphed.inputs, batch)
        for _ in range(3):
            graphed.replay()
        times_s = [event_time_s(graphed.replay) for _ in range(20)]
        return statistics.median(times_s) * 1e3, graphed, graphed.next_tokens[:4].tolist()
    finally:
        for key, value in saved.items():
            setattr(decoder, key, value)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_case_arguments(parser, shapes="qwen2-7b,llama2-7b", batches="16,64,256")
    parser.add_argument("--variants", nargs="*", default=[],
                        help="name:attr=value,... decoder attributes set for another timing (e.g. cublas:skinny_gemm_rows=0)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    cases = bench_cases(args)
    device, dtype, batches, lengths = cases.device, cases.dtype, cases.batches, cases.lengths
    result = dict(device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                  torch=torch.__version__, command=" ".join(sys.argv),
                  date=datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"), context_lens=lengths, rows=[])
    result["copy_bandwidth_bytes_per_s"] = bw = copy_bandwidth_bytes_per_s(device)
    result["matmul_flops_per_s"] = flops_rate = matmul_flops_per_s(device)
    print(f"copy bandwidth {bw / 1e12:.2f} TB/s, matrix rate {flops_rate / 1e12:.0f} TFLOP/s", flush=True)
    variants = [("served", {})] + [parse_variant(v) for v in args.variants]
    table = []
    for name, config in cases.shapes.items():
        weights = PagedWeights.random(config, device, dtype)
        case = Case(config, weights, lengths, "token_major")
        for batch in batches:
            for variant, settings in variants:
                ms, graphed, tokens = step_ms(case, batch, settings)
                profiled = profile_replay(graphed) if graphed is not None else {}
                roofline_ms = case.roofline(batch, bw, flops_rate)["roofline_ms"]
                row = dict(shape=name, rows=batch, variant=variant, settings=settings, step_ms=ms,
                           roofline_ms=roofline_ms, ratio=ms / roofline_ms, sample_tokens=tokens, **profiled)
                result["rows"].append(row)
                del graphed
                families = row.get("families", {})
                line = (f"{name:10s} rows {batch:4d} {variant:10s} step {ms:6.3f} ms roofline {roofline_ms:6.3f} "
                        f"({row['ratio']:.2f}x) tokens {tokens}"
                        + (f" | kernels {row['kernels']} busy {row['busy_us']:.0f} us gaps {row['gap_us']:.0f} us | "
                           + ", ".join(f"{f} {v['us']:.0f}/{v['count']}" for f, v in families.items())
                           if families else ""))
                print(line, flush=True)
                table.append(line)
                (args.out / "step_profile.json").write_text(json.dumps(result, indent=2))
        del case, weights
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print("\n" + "\n".join(table))
    return 0


if __name__ == "__main__":
    sys.exit(main())
