"""The decode step's elementwise work as single kernels: RMSNorm (alone or after a residual add),
rotary + KV-slot write, SiLU-and-mul.

In a graph-replayed decode step at small batch every kernel costs a few microseconds whatever its
size, and unfused, rotary alone is ~8 kernels a layer (slices, cat, mul, add, two scatters). Each
function here is one Triton launch on a CUDA device (or under TRITON_INTERPRET=1) and plain torch
otherwise; `use_triton=False` forces the torch version (the reference the kernels are tested against).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from services.worker.paged.attention import is_available, triton

if triton is not None:
    import triton.language as tl

# heads of q, k and v one rotary program handles: one per (row, head) made ~100 programs of 128 elements
# a token, and a 721-token mixed step spent 1.4 ms of its 24 on them (reports/gpu/mixed_step, run 1)
ROPE_HEADS_PER_PROGRAM = 8


def _use_triton(x: torch.Tensor, use_triton: bool | None) -> bool:
    return is_available(x.device) if use_triton is None else use_triton


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, *, use_triton: bool | None = None) -> torch.Tensor:
    """RMSNorm over the last dim of x [B, hidden], computed in float32, returned in x's dtype."""
    if not _use_triton(x, use_triton):
        normed = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)
        return (normed * weight.float()).to(x.dtype)
    out = torch.empty_like(x)
    _rms_norm_kernel[(x.shape[0],)](x, x, weight, out, out, x.stride(0), 0, 0, out.stride(0), x.shape[1], eps,
                                    HAS_RESIDUAL=False, BLOCK=triton.next_power_of_2(x.shape[1]), num_warps=8)
    return out


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float, *,
                 use_triton: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(hidden, normed): hidden = x + residual in x's dtype (the residual stream), normed = its RMSNorm
    as `rms_norm` computes it, in one kernel. A product followed by a norm runs without its residual
    and this adds it: cuBLAS's addmm with a residual first copies the residual into its output (a
    kernel of its own, ~1.6 us a layer at 64 rows on an H200, bench/gpu_step_profile.py)."""
    if not _use_triton(x, use_triton):
        hidden = (x.float() + residual.float()).to(x.dtype)
        return hidden, rms_norm(hidden, weight, eps, use_triton=False)
    hidden, normed = torch.empty_like(x), torch.empty_like(x)
    _rms_norm_kernel[(x.shape[0],)](x, residual, weight, hidden, normed, x.stride(0), residual.stride(0),
                                    hidden.stride(0), normed.stride(0), x.shape[1], eps,
                                    HAS_RESIDUAL=True, BLOCK=triton.next_power_of_2(x.shape[1]), num_warps=8)
    return hidden, normed


def silu_mul(gate_up: torch.Tensor, *, use_triton: bool | None = None) -> torch.Tensor:
    """SwiGLU's silu(gate) * up for gate_up [B, 2I] (gate first) -> [B, I]."""
    if not _use_triton(gate_up, use_triton):
        gate, up = gate_up.chunk(2, dim=-1)
        return (F.silu(gate.float()) * up.float()).to(gate_up.dtype)
    batch, width = gate_up.shape[0], gate_up.shape[1] // 2
    out = torch.empty(batch, width, dtype=gate_up.dtype, device=gate_up.device)
    block = 1024
    _silu_mul_kernel[(batch, triton.cdiv(width, block))](gate_up, out, gate_up.stride(0), out.stride(0), width,
                                                         BLOCK=block)
    return out


def rope_and_write_kv(
    qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor, slot_mapping: torch.Tensor,
    k_cache: torch.Tensor, v_cache: torch.Tensor, num_heads: int, *, use_triton: bool | None = None,
) -> torch.Tensor:
    """Split the fused projection qkv [B, (H + 2 Hkv) D] into q, k, v; rotate q and k at each row's
    own position (HF's rotate-half rope; cos/sin [max_positions, D] float32); write k and v into
    cache slot slot_mapping[b] (block slot // block_tokens, offset slot % block_tokens) of k_cache /
    v_cache, indexed [num_blocks, block_tokens, Hkv, D] whatever their memory layout.
    Returns the rotated q [B, H, D] in qkv's dtype."""
    block_tokens, num_kv_heads, head_dim = k_cache.shape[1:]
    batch = qkv.shape[0]
    if not _use_triton(qkv, use_triton):
        q, k, v = qkv.float().split([num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim], -1)
        c, s = cos[positions][:, None], sin[positions][:, None]
        half = head_dim // 2

        def rotate(x):
            x = x.reshape(batch, -1, head_dim)
            return x * c + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * s

        blocks, offsets = slot_mapping // block_tokens, slot_mapping % block_tokens
        k_cache[blocks, offsets] = rotate(k).to(k_cache.dtype)  # in place, whatever the cache's strides
        v_cache[blocks, offsets] = v.reshape(batch, -1, head_dim).to(v_cache.dtype)
        return rotate(q).to(qkv.dtype)
    if k_cache.stride() != v_cache.stride() or k_cache.stride(-1) != 1:
        raise ValueError("rope_and_write_kv needs K and V caches of one layout, head_dim contiguous")
    q = torch.empty(batch, num_heads, head_dim, dtype=qkv.dtype, device=qkv.device)
    total_heads = num_heads + 2 * num_kv_heads
    _rope_write_kernel[(batch, triton.cdiv(total_heads, ROPE_HEADS_PER_PROGRAM))](
        qkv, cos, sin, positions, slot_mapping, q, k_cache, v_cache, qkv.stride(0), q.stride(0),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), num_heads, num_kv_heads,
        HEAD_DIM=head_dim, BLOCK_TOKENS=block_tokens, HEADS=ROPE_HEADS_PER_PROGRAM, num_warps=4,
    )
    return q


if triton is not None:

    @triton.jit
    def _rms_norm_kernel(x_ptr, res_ptr, w_ptr, hidden_ptr, out_ptr, x_stride, res_stride, hidden_stride, out_stride,
                         width, eps, HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr):
        """One row: out = RMSNorm(x) * w; with HAS_RESIDUAL first x += residual, stored (in x's dtype) as
        hidden, and that sum is what is normalised."""
        row = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        is_col = cols < width
        x = tl.load(x_ptr + row * x_stride + cols, mask=is_col, other=0.0)
        if HAS_RESIDUAL:
            residual = tl.load(res_ptr + row * res_stride + cols, mask=is_col, other=0.0).to(tl.float32)
            x = (x.to(tl.float32) + residual).to(hidden_ptr.dtype.element_ty)
            tl.store(hidden_ptr + row * hidden_stride + cols, x, mask=is_col)
        x = x.to(tl.float32)
        inv_rms = tl.rsqrt(tl.sum(x * x, axis=0) / width + eps)
        w = tl.load(w_ptr + cols, mask=is_col, other=0.0).to(tl.float32)
        tl.store(out_ptr + row * out_stride + cols, (x * inv_rms * w).to(out_ptr.dtype.element_ty), mask=is_col)

    @triton.jit
    def _silu_mul_kernel(gate_up_ptr, out_ptr, in_stride, out_stride, width, BLOCK: tl.constexpr):
        row, block = tl.program_id(0), tl.program_id(1)
        cols = block * BLOCK + tl.arange(0, BLOCK)
        is_col = cols < width
        gate = tl.load(gate_up_ptr + row * in_stride + cols, mask=is_col, other=0.0).to(tl.float32)
        up = tl.load(gate_up_ptr + row * in_stride + width + cols, mask=is_col, other=0.0).to(tl.float32)
        out = gate * tl.sigmoid(gate) * up
        tl.store(out_ptr + row * out_stride + cols, out.to(out_ptr.dtype.element_ty), mask=is_col)

    @triton.jit
    def _rope_write_kernel(
        qkv_ptr, cos_ptr, sin_ptr, pos_ptr, slot_ptr, q_ptr, k_cache_ptr, v_cache_ptr, qkv_stride, q_stride,
        cache_stride_block, cache_stride_tok, cache_stride_h, num_heads, num_kv_heads,
        HEAD_DIM: tl.constexpr, BLOCK_TOKENS: tl.constexpr, HEADS: tl.constexpr,
    ):
        # one program per (row, HEADS consecutive heads of q, k and v): [HEADS, HEAD_DIM] elements
        row = tl.program_id(0)
        heads = tl.program_id(1) * HEADS + tl.arange(0, HEADS)
        dims = tl.arange(0, HEAD_DIM)
        is_q = heads < num_heads
        is_k = (heads >= num_heads) & (heads < num_heads + num_kv_heads)
        is_v = (heads >= num_heads + num_kv_heads) & (heads < num_heads + 2 * num_kv_heads)
        is_head = (is_q | is_k | is_v)[:, None]
        base = qkv_ptr + row * qkv_stride + heads[:, None] * HEAD_DIM
        x = tl.load(base + dims[None, :], mask=is_head, other=0.0).to(tl.float32)
        partner = tl.load(base + ((dims + HEAD_DIM // 2) % HEAD_DIM)[None, :], mask=is_head, other=0.0).to(tl.float32)
        position = tl.load(pos_ptr + row).to(tl.int64)
        c = tl.load(cos_ptr + position * HEAD_DIM + dims)[None, :]
        s = tl.load(sin_ptr + position * HEAD_DIM + dims)[None, :]
        rotated = x * c + tl.where(dims[None, :] < HEAD_DIM // 2, -partner, partner) * s
        tl.store(q_ptr + row * q_stride + heads[:, None] * HEAD_DIM + dims[None, :],
                 rotated.to(q_ptr.dtype.element_ty), mask=is_q[:, None])
        slot = tl.load(slot_ptr + row).to(tl.int64)
        kv_row = (slot // BLOCK_TOKENS) * cache_stride_block + (slot % BLOCK_TOKENS) * cache_stride_tok
        k_head = tl.where(is_k, heads - num_heads, 0)
        tl.store(k_cache_ptr + kv_row + k_head[:, None] * cache_stride_h + dims[None, :],
                 rotated.to(k_cache_ptr.dtype.element_ty), mask=is_k[:, None])
        v_head = tl.where(is_v, heads - num_heads - num_kv_heads, 0)
        tl.store(v_cache_ptr + kv_row + v_head[:, None] * cache_stride_h + dims[None, :],
                 x.to(v_cache_ptr.dtype.element_ty), mask=is_v[:, None])
