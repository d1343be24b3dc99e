"""Launch-shape sweep of the paged decode attention kernel alone, per model shape and row count.

Run on an H100/H200 (the device tool):  PYTHONUNBUFFERED=1 python3 bench/gpu_attention_sweep.py --out $OUT
`--smoke` on the CPU (TRITON_INTERPRET=1) runs two launches on the tiny shape: it checks the script.

bench/gpu_paged_step.py's sweep (reports/gpu/paged_step, runs 2 and 4) tried tokens per loop, warps and the
split count one after the other at num_stages 2. This one crosses them with num_stages (1-3: each stage holds
a K and a V tile in shared memory, which bounds how many programs an SM keeps resident), on layer 0's cache of
the same cases (context lengths uniform 32..512, seed 0): each launch as 10 calls in one CUDA graph, median
of 20 replays, as bandwidth over the KV bytes read. Writes attention_sweep.json; prints the default launch and
the five best per case.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from datetime import UTC, datetime
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.gpu_paged_step import (  # noqa: E402
    Case, add_case_arguments, bench_cases, copy_bandwidth_bytes_per_s, graphed_time_s,
)
from services.worker.paged import attention  # noqa: E402
from services.worker.paged.decode_step import PagedWeights  # noqa: E402


def launches(smoke: bool) -> list[dict]:
    if smoke:
        return [{}, {"block_l": 16, "num_splits": 2, "num_stages": 1}]
    grid = itertools.product((32, 64), (2, 4), (1, 2, 3), (1, 2, 4, 8))
    return [{}] + [dict(block_l=bl, num_warps=w, num_stages=st, num_splits=sp) for bl, w, st, sp in grid]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_case_arguments(parser, shapes="qwen2-7b,llama2-7b", batches="16,64,256")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    cases = bench_cases(args)
    device, dtype, batches, lengths = cases.device, cases.dtype, cases.batches, cases.lengths
    bw = copy_bandwidth_bytes_per_s(device)
    result = dict(device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                  date=datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"), command=" ".join(sys.argv),
                  copy_bandwidth_bytes_per_s=bw, context_lens=lengths, rows=[])
    print(f"copy bandwidth {bw / 1e12:.2f} TB/s", flush=True)
    summary = []
    for name, config in cases.shapes.items():
        # the attention reads only the caches: one layer's weights would do, but Case builds a whole model
        case = Case(config, PagedWeights.random(config, device, dtype), lengths, "token_major")
        decoder = case.decoder
        for batch in batches:
            inputs = decoder.empty_inputs(batch, case.table_width)
            case.fill(inputs, batch)
            q = torch.randn(batch, config.num_heads, config.head_dim, device=device, dtype=dtype)
            kv_bytes = sum(lengths[:batch]) * config.kv_bytes_per_token / config.num_layers
            reference = attention.paged_decode_attention(q, decoder.k_caches[0], decoder.v_caches[0],
                                                         inputs.block_tables, inputs.context_lens, decoder.scale)
            rows = []
            for launch in launches(args.smoke):
                def run(launch=launch, decoder=decoder, inputs=inputs, q=q):
                    return attention.paged_decode_attention(q, decoder.k_caches[0], decoder.v_caches[0],
                                                            inputs.block_tables, inputs.context_lens, decoder.scale,
                                                            **launch)
                try:
                    error = (run().float() - reference.float()).abs().max().item()
                    seconds = graphed_time_s(run, device, calls=10)
                except Exception as failure:  # e.g. more shared memory than an SM has
                    rows.append(dict(shape=name, rows=batch, launch=launch, error=type(failure).__name__))
                    continue
                rows.append(dict(shape=name, rows=batch, launch=launch, us=seconds * 1e6, max_abs_diff=error,
                                 bandwidth_fraction=kv_bytes / seconds / bw))
            result["rows"] += rows
            (args.out / "attention_sweep.json").write_text(json.dumps(result, indent=2))
            timed = sorted((r for r in rows if "us" in r), key=lambda r: r["us"])
            default = next(r for r in rows if r["launch"] == {})
            lines = [f"{name} rows {batch}: default {default['us']:.1f} us ({default['bandwidth_fraction']:.0%})"]
            lines += [f"    {r['us']:6.1f} us {r['bandwidth_fraction']:4.0%} diff {r['max_abs_diff']:.1e} {r['launch']}"
                      for r in timed[:5]]
            print("\n".join(lines), flush=True)
            summary += lines
        del case, decoder
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print("\n" + "\n".join(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
