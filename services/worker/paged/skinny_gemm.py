"""out = x @ weight.T (+ bias) (+ residual) for few rows (decode batches up to 64), as one Triton kernel.

At 1-64 rows a decode step's matrix products only stream the weights, and cuBLAS reached about 80 %
of the copy bandwidth on them (reports/gpu/paged_step, runs 1-2: 3.97 ms for 13.2 GB on an H200).
Here one program owns BLOCK_N output columns for all rows and walks K in BLOCK_K steps through a
`num_stages`-deep pipeline of weight tiles; the rows are padded to BLOCK_M (>= 16, for tl.dot) in
registers only. Bias and residual are added in the epilogue. Launch shapes are chosen by measurement
(bench/gpu_paged_step.py) and passed in; without one, or on the CPU, torch's own products run.
`default_launch` is the rule those sweeps' winners follow, for decode steps whose shapes were not swept.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from services.worker.paged.attention import is_available, triton

if triton is not None:
    import triton.language as tl

MAX_ROWS = 64
# Up to this many rows the skinny kernel with `default_launch` replaces cuBLAS in the served decode
# step: reports/gpu/paged_step run 4, at 1 and 16 rows, 3.93 vs 4.38 ms (Llama-2-7B) and 4.03 vs 4.44
# (Qwen2-7B) a step with swept launches; at 64 rows it won for only some matrices.
DEFAULT_SKINNY_ROWS = 16


def default_launch(weight_shape: tuple[int, int]) -> dict | None:
    """The launch run 4's sweep picked at 1-16 rows, as a rule of the weight's shape (N, K): wide
    matrices (the MLP's gate/up, the LM head) 64 columns a program over 128-deep K tiles in 3 stages,
    the others 32 columns over 256-deep tiles in 5 (13 of its 18 winners; the rest within a few %).
    None when K is not a multiple of 128."""
    width, depth = weight_shape
    if width >= 16384 and depth % 128 == 0:
        return dict(block_n=64, block_k=128, num_stages=3, num_warps=4)
    if depth % 256 == 0:
        return dict(block_n=32, block_k=256, num_stages=5, num_warps=4)
    return dict(block_n=32, block_k=128, num_stages=5, num_warps=4) if depth % 128 == 0 else None


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           residual: torch.Tensor | None = None, launch: dict | None = None) -> torch.Tensor:
    """x [M, K] @ weight [N, K].T + bias [N] + residual [M, N]. launch: dict(block_n, block_k,
    num_stages, num_warps) runs the Triton kernel (M <= 64, K a multiple of block_k); None runs torch."""
    if launch is None or not is_available(x.device):
        if residual is not None:
            out = torch.addmm(residual, x, weight.t())
            return out if bias is None else out + bias
        return F.linear(x, weight, bias)
    rows, depth = x.shape
    width = weight.shape[0]
    block_k = launch["block_k"]
    if rows > MAX_ROWS or depth % block_k or x.stride(1) != 1 or weight.stride(1) != 1:
        raise ValueError(f"skinny linear needs <= {MAX_ROWS} rows and K % block_k == 0, got {tuple(x.shape)}, "
                         f"block_k {block_k}")
    out = torch.empty(rows, width, dtype=x.dtype, device=x.device)
    block_n = launch["block_n"]
    _skinny_gemm_kernel[(triton.cdiv(width, block_n),)](
        x, weight, bias if bias is not None else out, residual if residual is not None else out, out,
        rows, width, depth, x.stride(0), weight.stride(0),
        residual.stride(0) if residual is not None else 0, out.stride(0),
        HAS_BIAS=bias is not None, HAS_RESIDUAL=residual is not None,
        BLOCK_M=max(16, triton.next_power_of_2(rows)), BLOCK_N=block_n, BLOCK_K=block_k,
        num_stages=launch.get("num_stages", 4), num_warps=launch.get("num_warps", 4),
    )
    return out


if triton is not None:

    @triton.jit
    def _skinny_gemm_kernel(
        x_ptr, w_ptr, bias_ptr, res_ptr, out_ptr, rows, width, depth, x_stride, w_stride, res_stride, out_stride,
        HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        row = tl.arange(0, BLOCK_M)
        col = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        ks = tl.arange(0, BLOCK_K)
        is_row, is_col = row < rows, col < width
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for k0 in tl.range(0, depth, BLOCK_K):
            a = tl.load(x_ptr + row[:, None] * x_stride + (k0 + ks)[None, :], mask=is_row[:, None], other=0.0)
            b = tl.load(w_ptr + col[:, None].to(tl.int64) * w_stride + (k0 + ks)[None, :], mask=is_col[:, None],
                        other=0.0)
            acc += tl.dot(a, tl.trans(b))
        if HAS_BIAS:
            acc += tl.load(bias_ptr + col, mask=is_col, other=0.0).to(tl.float32)[None, :]
        is_out = is_row[:, None] & is_col[None, :]
        if HAS_RESIDUAL:
            acc += tl.load(res_ptr + row[:, None] * res_stride + col[None, :], mask=is_out, other=0.0).to(tl.float32)
        tl.store(out_ptr + row[:, None] * out_stride + col[None, :], acc.to(out_ptr.dtype.element_ty), mask=is_out)
