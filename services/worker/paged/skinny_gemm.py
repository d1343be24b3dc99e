"""out = x @ weight.T (+ bias) (+ residual) for a decode step's rows, as Triton kernels.

At 1-64 rows a decode step's matrix products only stream the weights, and cuBLAS reached about 80 %
of the copy bandwidth on them (reports/gpu/paged_step, runs 1-2: 3.97 ms for 13.2 GB on an H200).
Here a program owns BLOCK_M rows x BLOCK_N output columns and walks its share of K in BLOCK_K steps
through a `num_stages`-deep pipeline of weight tiles; rows are padded to BLOCK_M (>= 16, for tl.dot)
in registers only. Bias and residual are added in the epilogue.

`splits` > 1 divides K among that many programs per output tile (split-K), each writing an fp32
partial that a second kernel sums (with bias and residual) in a fixed order, so results do not
depend on timing; `block_m` tiles the rows (any row count). Why split: at 64 rows a narrow matrix
(N = 3,584) in 32-column tiles is 112 programs on 132 SMs, each re-reading all of x from L2 (twice
the bytes of its weight tile); wide tiles split along K keep the SMs busy and read x once per tile.
Launches with neither run `_skinny_gemm_kernel`: one program per column tile holding every row (<= 64).

Launch shapes are chosen by measurement (bench/gpu_paged_step.py) and passed in; without one, or on
the CPU, torch's own products run. `default_launch` is the rule those sweeps' winners follow, for
decode steps whose shapes were not swept.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from services.worker.paged.attention import is_available, triton
from services.worker.paged.fused_ops import add_rms_norm, rms_norm

if triton is not None:
    import triton.language as tl

MAX_BLOCK_M = 64  # rows a program holds without a launch's block_m (more rows: more row tiles)
# Up to this many rows `default_launch` may replace cuBLAS in the served decode step: at 1-16 rows
# for every matrix (reports/gpu/paged_step run 4: 3.93 vs 4.38 ms a step for Llama-2-7B, 4.03 vs 4.44
# for Qwen2-7B), at 17-64 rows only for the deep, narrow `down` projection (run 8).
DEFAULT_SKINNY_ROWS = 64


def default_launch(weight_shape: tuple[int, int], rows: int = 1) -> dict | None:
    """The launch the sweeps picked, as a rule of the weight's shape (N, K) and the step's rows; None:
    cuBLAS. At 1-16 rows (run 4): wide matrices (the MLP's gate/up, the LM head) 64 columns a program
    over 128-deep K tiles in 3 stages, the others 32 columns over 256-deep tiles in 5 (13 of its 18
    winners; the rest within a few %). At 17-64 rows (run 8) cuBLAS won or tied every product but a
    deep one (K >= 2N, the MLP's down): split along K 4 ways in 64-column tiles it took 28.0 / 40.1 us
    against cuBLAS's 29.4 / 43.9 at 32 rows (Llama-2-7B / Qwen2-7B), 29.0 / 40.8 against 31.7 / 44.4
    at 64. None when K is not a multiple of 128."""
    width, depth = weight_shape
    if depth % 128 or rows > 64:
        return None
    if rows > 16:
        return dict(block_n=64, block_k=128, num_stages=3, num_warps=4, splits=4) if depth >= 2 * width else None
    if width >= 16384:
        return dict(block_n=64, block_k=128, num_stages=3, num_warps=4)
    if depth % 256 == 0:
        return dict(block_n=32, block_k=256, num_stages=5, num_warps=4)
    return dict(block_n=32, block_k=128, num_stages=5, num_warps=4)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           residual: torch.Tensor | None = None, launch: dict | None = None) -> torch.Tensor:
    """x [M, K] @ weight [N, K].T + bias [N] + residual [M, N]. launch: dict(block_n, block_k,
    num_stages, num_warps, and optionally block_m, splits) runs the Triton kernels (K a multiple of
    block_k); None runs torch."""
    if launch is None or not is_available(x.device):
        if residual is not None:
            out = torch.addmm(residual, x, weight.t())
            return out if bias is None else out + bias
        return F.linear(x, weight, bias)
    rows, depth = x.shape
    width = weight.shape[0]
    block_k, block_n = launch["block_k"], launch["block_n"]
    if depth % block_k or x.stride(1) != 1 or weight.stride(1) != 1:
        raise ValueError(f"Triton linear needs K % block_k == 0 and contiguous rows, got x {tuple(x.shape)}, "
                         f"block_k {block_k}")
    out = torch.empty(rows, width, dtype=x.dtype, device=x.device)
    stages = dict(num_stages=launch.get("num_stages", 4), num_warps=launch.get("num_warps", 4))
    epilogue = (bias if bias is not None else out, residual if residual is not None else out,
                residual.stride(0) if residual is not None else 0)
    flags = dict(HAS_BIAS=bias is not None, HAS_RESIDUAL=residual is not None)
    if not runs_split(launch, rows):
        _skinny_gemm_kernel[(triton.cdiv(width, block_n),)](
            x, weight, *epilogue, out, rows, width, depth, x.stride(0), weight.stride(0), out.stride(0), **flags,
            BLOCK_M=max(16, triton.next_power_of_2(rows)), BLOCK_N=block_n, BLOCK_K=block_k, **stages)
        return out
    block_m = launch.get("block_m") or min(MAX_BLOCK_M, max(16, triton.next_power_of_2(rows)))
    k_tiles = depth // block_k
    splits = min(launch.get("splits", 1), k_tiles)
    k_per_split = -(-k_tiles // splits) * block_k
    splits = -(-depth // k_per_split)  # no empty split
    partial = torch.empty(splits, rows, width, dtype=torch.float32, device=x.device)
    _split_gemm_kernel[(triton.cdiv(rows, block_m), triton.cdiv(width, block_n), splits)](
        x, weight, partial, rows, width, depth, k_per_split, x.stride(0), weight.stride(0),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, **stages)
    block = 1024
    _sum_splits_kernel[(triton.cdiv(rows * width, block),)](
        partial, *epilogue, out, rows * width, width, out.stride(0), splits, **flags, BLOCK=block)
    return out


def runs_split(launch: dict | None, rows: int) -> bool:
    """Whether `linear` runs `launch` at this many rows as the split-K kernels (whose second kernel
    sees whole rows) rather than torch's product or the one-kernel skinny GEMM."""
    return launch is not None and not (launch.get("splits", 1) == 1 and launch.get("block_m") is None
                                       and rows <= MAX_BLOCK_M)


def linear_and_norm(x: torch.Tensor, weight: torch.Tensor, norm_weight: torch.Tensor, eps: float, *,
                    residual: torch.Tensor, launch: dict | None = None,
                    use_triton: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(hidden, normed) for hidden = x @ weight.T + residual and normed = rms_norm(hidden) * norm_weight:
    a product followed by the next RMSNorm, as every decoder layer has twice. A split-K launch adds the
    residual in its summing kernel and the norm runs after; any other product runs without the
    residual and `add_rms_norm` adds it, which spares cuBLAS's copy of the residual into its output.
    (Normalising inside the summing kernel, one program per row, measured no faster: its 64 programs
    cost what the norm kernel did, bench/gpu_step_profile.py run of 2026-12-04.)"""
    if runs_split(launch, x.shape[0]):
        hidden = linear(x, weight, residual=residual, launch=launch)
        return hidden, rms_norm(hidden, norm_weight, eps, use_triton=use_triton)
    return add_rms_norm(linear(x, weight, launch=launch), residual, norm_weight, eps, use_triton=use_triton)


if triton is not None:

    @triton.jit
    def _skinny_gemm_kernel(
        x_ptr, w_ptr, bias_ptr, res_ptr, res_stride, out_ptr, rows, width, depth, x_stride, w_stride, out_stride,
        HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        """One program per BLOCK_N columns: every row, all of K, the epilogue fused. Kept apart from
        _split_gemm_kernel: one kernel for both (a program id for rows, K bounds per split) made the
        Llama-2-7B step's products at 1-16 rows 2-4 % slower on an H200 (bench/gpu_gemm_ab.py,
        reports/gpu/serving.md, 2026-12-04)."""
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

    @triton.jit
    def _split_gemm_kernel(
        x_ptr, w_ptr, partial_ptr, rows, width, depth, k_per_split, x_stride, w_stride,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        """partial[split] = x[the tile's rows] @ weight[the tile's columns, the split's K].T in fp32. Row
        tiles vary fastest across programs: those of one weight tile run together and share it in L2."""
        row = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        col = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        k_start = tl.program_id(2) * k_per_split
        k_end = tl.minimum(depth, k_start + k_per_split)
        ks = tl.arange(0, BLOCK_K)
        is_row, is_col = row < rows, col < width
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for k0 in tl.range(k_start, k_end, BLOCK_K):
            a = tl.load(x_ptr + row[:, None] * x_stride + (k0 + ks)[None, :], mask=is_row[:, None], other=0.0)
            b = tl.load(w_ptr + col[:, None].to(tl.int64) * w_stride + (k0 + ks)[None, :], mask=is_col[:, None],
                        other=0.0)
            acc += tl.dot(a, tl.trans(b))
        at = tl.program_id(2).to(tl.int64) * rows * width + row[:, None] * width + col[None, :]
        tl.store(partial_ptr + at, acc, mask=is_row[:, None] & is_col[None, :])

    @triton.jit
    def _sum_splits_kernel(
        partial_ptr, bias_ptr, res_ptr, res_stride, out_ptr, numel, width, out_stride, splits,
        HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr,
    ):
        """out = sum over splits of partial [splits, M, N] (in split order) + bias + residual."""
        at = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        is_in = at < numel
        row, col = at // width, at % width
        acc = tl.zeros([BLOCK], tl.float32)
        for split in range(splits):
            acc += tl.load(partial_ptr + split * numel + at, mask=is_in, other=0.0)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + col, mask=is_in, other=0.0).to(tl.float32)
        if HAS_RESIDUAL:
            acc += tl.load(res_ptr + row * res_stride + col, mask=is_in, other=0.0).to(tl.float32)
        tl.store(out_ptr + row * out_stride + col, acc.to(out_ptr.dtype.element_ty), mask=is_in)
