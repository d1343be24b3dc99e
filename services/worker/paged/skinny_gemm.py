"""out = x @ weight.T (+ bias) (+ residual) for few rows (decode batches up to 64), as one Triton kernel.

At 1-64 rows a decode step's matrix products only stream the weights, and cuBLAS reached about 80 %
of the copy bandwidth on them (reports/gpu/paged_step, runs 1-2: 3.97 ms for 13.2 GB on an H200).
Here one program owns BLOCK_N output columns for all rows and walks K in BLOCK_K steps through a
`num_stages`-deep pipeline of weight tiles; the rows are padded to BLOCK_M (>= 16, for tl.dot) in
registers only. Bias and residual are added in the epilogue. Launch shapes are chosen by measurement
(bench/gpu_paged_step.py) and passed in; without one, or on the CPU, torch's own products run.

Two prologues fold the decode step's elementwise kernels into the product that reads their output
(`normed_linear`, `gated_linear`): in a graph-replayed step at <= 64 rows each of those kernels costs
a few microseconds of launch and tail, ~3 per layer (reports/gpu/paged_step: ~0.5 ms of Qwen2-7B's
5.0 ms step at 64 rows). RMSNorm: each x tile is scaled by the norm's weight before the product and
its squares summed on the way, so the row's 1 / rms (a scalar per row) multiplies the accumulator in
the epilogue; SiLU-and-mul: the A tile is silu(gate) * up, loaded from both halves of gate_up.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from services.worker.paged.attention import is_available, triton
from services.worker.paged.fused_ops import rms_norm, silu_mul

if triton is not None:
    import triton.language as tl

MAX_ROWS = 64


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           residual: torch.Tensor | None = None, launch: dict | None = None) -> torch.Tensor:
    """x [M, K] @ weight [N, K].T + bias [N] + residual [M, N]. launch: dict(block_n, block_k,
    num_stages, num_warps) runs the Triton kernel (M <= 64, K a multiple of block_k); None runs torch."""
    if launch is None or not is_available(x.device):
        if residual is not None:
            out = torch.addmm(residual, x, weight.t())
            return out if bias is None else out + bias
        return F.linear(x, weight, bias)
    return _launch(x, weight, bias, residual, launch, depth=x.shape[1])


def normed_linear(x: torch.Tensor, norm_weight: torch.Tensor, eps: float, weight: torch.Tensor,
                  bias: torch.Tensor | None = None, launch: dict | None = None,
                  use_triton: bool | None = None) -> torch.Tensor:
    """linear(rms_norm(x, norm_weight, eps), weight, bias): one kernel with a launch, else two."""
    if launch is None or not is_available(x.device):
        return linear(rms_norm(x, norm_weight, eps, use_triton=use_triton), weight, bias)
    return _launch(x, weight, bias, None, launch, depth=x.shape[1], norm=(norm_weight, eps))


def gated_linear(gate_up: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor | None = None,
                 launch: dict | None = None, use_triton: bool | None = None) -> torch.Tensor:
    """linear(silu_mul(gate_up), weight, residual=residual) for gate_up [M, 2K] (gate first):
    one kernel with a launch, else two."""
    if launch is None or not is_available(gate_up.device):
        return linear(silu_mul(gate_up, use_triton=use_triton), weight, residual=residual)
    return _launch(gate_up, weight, None, residual, launch, depth=gate_up.shape[1] // 2, gated=True)


def _launch(x, weight, bias, residual, launch: dict, *, depth: int, norm: tuple | None = None,
            gated: bool = False) -> torch.Tensor:
    rows = x.shape[0]
    width = weight.shape[0]
    block_k = launch["block_k"]
    if rows > MAX_ROWS or depth % block_k or depth != weight.shape[1] or x.stride(1) != 1 or weight.stride(1) != 1:
        raise ValueError(f"skinny linear needs <= {MAX_ROWS} rows and K % block_k == 0, got {tuple(x.shape)}, "
                         f"weight {tuple(weight.shape)}, block_k {block_k}")
    out = torch.empty(rows, width, dtype=x.dtype, device=x.device)
    block_n = launch["block_n"]
    norm_weight, eps = norm if norm is not None else (out, 0.0)
    _skinny_gemm_kernel[(triton.cdiv(width, block_n),)](
        x, weight, bias if bias is not None else out, residual if residual is not None else out, norm_weight, out,
        rows, width, depth, x.stride(0), weight.stride(0),
        residual.stride(0) if residual is not None else 0, out.stride(0), eps,
        HAS_BIAS=bias is not None, HAS_RESIDUAL=residual is not None, HAS_NORM=norm is not None, IS_GATED=gated,
        BLOCK_M=max(16, triton.next_power_of_2(rows)), BLOCK_N=block_n, BLOCK_K=block_k,
        num_stages=launch.get("num_stages", 4), num_warps=launch.get("num_warps", 4),
    )
    return out


if triton is not None:

    @triton.jit
    def _load_a(x_ptr, norm_ptr, row, is_row, ks, k0, depth, x_stride, IS_GATED: tl.constexpr, HAS_NORM: tl.constexpr):
        """The A tile of columns k0.. (gate and up halves when gated) and the norm's weights there;
        zeros past depth (the prefetch after the last step)."""
        is_k = (k0 + ks) < depth
        is_a = is_row[:, None] & is_k[None, :]
        a_ptrs = x_ptr + row[:, None] * x_stride + (k0 + ks)[None, :]
        a = tl.load(a_ptrs, mask=is_a, other=0.0)
        up = a
        scale = ks
        if IS_GATED:  # up lies depth columns after the gate
            up = tl.load(a_ptrs + depth, mask=is_a, other=0.0)
        if HAS_NORM:
            scale = tl.load(norm_ptr + k0 + ks, mask=is_k, other=0.0)
        return a, up, scale

    @triton.jit
    def _skinny_gemm_kernel(
        x_ptr, w_ptr, bias_ptr, res_ptr, norm_ptr, out_ptr, rows, width, depth, x_stride, w_stride, res_stride,
        out_stride, eps, HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, HAS_NORM: tl.constexpr,
        IS_GATED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        row = tl.arange(0, BLOCK_M)
        col = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        ks = tl.arange(0, BLOCK_K)
        is_row, is_col = row < rows, col < width
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        squares = tl.zeros([BLOCK_M], tl.float32)
        if IS_GATED or HAS_NORM:
            # the A tile passes through registers before the product, so the pipeliner leaves its loads
            # synchronous: it is loaded one step ahead by hand, or each step waits on their latency
            # (measured without: the step's products ~4x slower)
            a, up, scale = _load_a(x_ptr, norm_ptr, row, is_row, ks, 0, depth, x_stride, IS_GATED, HAS_NORM)
            for k0 in tl.range(0, depth, BLOCK_K):
                next_a, next_up, next_scale = _load_a(x_ptr, norm_ptr, row, is_row, ks, k0 + BLOCK_K, depth,
                                                      x_stride, IS_GATED, HAS_NORM)
                if IS_GATED:  # silu(gate) * up
                    gate = a.to(tl.float32)
                    a = (gate * tl.sigmoid(gate) * up.to(tl.float32)).to(x_ptr.dtype.element_ty)
                if HAS_NORM:
                    a32 = a.to(tl.float32)
                    squares += tl.sum(a32 * a32, axis=1)
                    a = (a32 * scale.to(tl.float32)[None, :]).to(x_ptr.dtype.element_ty)
                b = tl.load(w_ptr + col[:, None].to(tl.int64) * w_stride + (k0 + ks)[None, :],
                            mask=is_col[:, None], other=0.0)
                acc += tl.dot(a, tl.trans(b))
                a, up, scale = next_a, next_up, next_scale
        else:
            for k0 in tl.range(0, depth, BLOCK_K):
                a = tl.load(x_ptr + row[:, None] * x_stride + (k0 + ks)[None, :], mask=is_row[:, None], other=0.0)
                b = tl.load(w_ptr + col[:, None].to(tl.int64) * w_stride + (k0 + ks)[None, :],
                            mask=is_col[:, None], other=0.0)
                acc += tl.dot(a, tl.trans(b))
        if HAS_NORM:
            acc *= tl.rsqrt(squares / depth + eps)[:, None]
        if HAS_BIAS:
            acc += tl.load(bias_ptr + col, mask=is_col, other=0.0).to(tl.float32)[None, :]
        is_out = is_row[:, None] & is_col[None, :]
        if HAS_RESIDUAL:
            acc += tl.load(res_ptr + row[:, None] * res_stride + col[None, :], mask=is_out, other=0.0).to(tl.float32)
        tl.store(out_ptr + row[:, None] * out_stride + col[None, :], acc.to(out_ptr.dtype.element_ty), mask=is_out)
