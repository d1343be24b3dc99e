"""The decode step's Triton GEMMs of this tree against another tree's, at few rows, on one GPU.

    python3 bench/gpu_gemm_ab.py --base var/old [--rows 1,4,8,16]

Each tree's `skinny_gemm.linear` with its own `default_launch` runs the Llama-2-7B shape's five
products (every layer's matrix in turn, as gpu_paged_step's tune_gemms) captured in one CUDA graph,
alternating trees, median of 20 replays; cuBLAS beside them. Prints microseconds a layer plus the LM head.
"""

from __future__ import annotations

import argparse
import importlib.util
import inspect
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.gpu_paged_step import graphed_time_s  # noqa: E402
from services.worker.paged import skinny_gemm  # noqa: E402
from services.worker.paged.decode_step import LLAMA2_7B, PagedWeights  # noqa: E402


def load_gemm(tree: Path):
    spec = importlib.util.spec_from_file_location("base_skinny_gemm", tree / "services/worker/paged/skinny_gemm.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def launch_of(module, shape, rows):
    takes_rows = "rows" in inspect.signature(module.default_launch).parameters
    return module.default_launch(shape, rows) if takes_rows else module.default_launch(shape)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", type=Path, required=True)
    parser.add_argument("--rows", default="1,4,8,16")
    args = parser.parse_args()
    device, dtype = torch.device("cuda"), torch.bfloat16
    weights = PagedWeights.random(LLAMA2_7B, device, dtype)
    trees = {"new": skinny_gemm, "base": load_gemm(args.base.resolve())}
    for rows in (int(r) for r in args.rows.split(",")):
        hidden = LLAMA2_7B.hidden_size
        x = torch.randn(rows, hidden, device=device, dtype=dtype)
        inner = torch.randn(rows, LLAMA2_7B.intermediate_size, device=device, dtype=dtype)

        def run(module, use_triton=True):
            for layer in weights.layers:
                for weight, a, residual in ((layer.qkv, x, None), (layer.out, x, x), (layer.gate_up, x, None),
                                            (layer.down, inner, x)):
                    launch = launch_of(module, tuple(weight.shape), rows) if use_triton else None
                    module.linear(a, weight, None, residual, launch=launch)
            launch = launch_of(module, tuple(weights.lm_head.shape), rows) if use_triton else None
            module.linear(x, weights.lm_head, launch=launch)

        times = {name: [] for name in (*trees, "cublas")}
        for _ in range(3):  # alternate, so drift hits both
            for name, module in trees.items():
                times[name].append(graphed_time_s(lambda module=module: run(module), device))
            times["cublas"].append(graphed_time_s(lambda: run(skinny_gemm, use_triton=False), device))
        print(f"rows {rows:3d}: " + "  ".join(f"{name} {1e3 * min(t):.3f} ms" for name, t in times.items()), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
