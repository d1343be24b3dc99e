"""Decode attention over short attention lengths as one Triton kernel (GPU only).

Measured on an H100 (reports/gpu/engine.md): for a decode step (one query token per row) over
~100 cached tokens, SDPA's kernels (cuDNN's flash kernel, FlashAttention, the memory-efficient one)
reach only 1.1-2.0 TB/s of the 3.0 TB/s the card copies at, because they tile the single query up to
64 rows and walk the keys in a pipeline that never fills at that length. Here one program per
(row, KV head) loads the whole key and value block at once and reduces it on the CUDA cores
(online softmax over blocks, float32), so all loads are in flight together. For long attention
lengths SDPA is as fast or faster; `LlamaFamilyDecoder` picks per attention length ("auto").
"""

from __future__ import annotations

import torch

try:  # CPU-only installs have no Triton: the decoder never selects this kernel there
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None


def is_available(device: torch.device) -> bool:
    return triton is not None and device.type == "cuda"


if triton is not None:

    @triton.jit
    def _decode_attention_kernel(
        q_ptr, k_ptr, v_ptr, mask_ptr, out_ptr,
        q_stride_b, q_stride_h, k_stride_b, k_stride_h, k_stride_l, v_stride_b, v_stride_h, v_stride_l,
        mask_stride_b, out_stride_b, out_stride_h,
        attend_tokens, scale,
        GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_L: tl.constexpr,
    ):
        row, kv_head = tl.program_id(0), tl.program_id(1)
        dims = tl.arange(0, HEAD_DIM)
        group = tl.arange(0, GROUP_PAD)
        heads = kv_head * GROUP + group
        is_head = group < GROUP
        q = tl.load(q_ptr + row * q_stride_b + heads[:, None] * q_stride_h + dims[None, :], mask=is_head[:, None],
                    other=0.0).to(tl.float32)
        q = q * scale
        running_max = tl.full([GROUP_PAD], float("-inf"), tl.float32)
        running_sum = tl.zeros([GROUP_PAD], tl.float32)
        acc = tl.zeros([GROUP_PAD, HEAD_DIM], tl.float32)
        k_row = k_ptr + row * k_stride_b + kv_head * k_stride_h
        v_row = v_ptr + row * v_stride_b + kv_head * v_stride_h
        for start in tl.range(0, attend_tokens, BLOCK_L):
            positions = start + tl.arange(0, BLOCK_L)
            is_token = positions < attend_tokens
            k = tl.load(k_row + positions[:, None] * k_stride_l + dims[None, :], mask=is_token[:, None], other=0.0)
            v = tl.load(v_row + positions[:, None] * v_stride_l + dims[None, :], mask=is_token[:, None], other=0.0)
            bias = tl.load(mask_ptr + row * mask_stride_b + positions, mask=is_token, other=float("-inf"))
            scores = tl.sum(q[:, None, :] * k.to(tl.float32)[None, :, :], axis=2) + bias.to(tl.float32)[None, :]
            new_max = tl.maximum(running_max, tl.max(scores, axis=1))
            # a block whose tokens are all masked leaves new_max at -inf: keep the exponent finite
            safe_max = tl.where(new_max == float("-inf"), 0.0, new_max)
            weights = tl.exp(scores - safe_max[:, None])
            rescale = tl.exp(running_max - safe_max)
            running_sum = running_sum * rescale + tl.sum(weights, axis=1)
            acc = acc * rescale[:, None] + tl.sum(weights[:, :, None] * v.to(tl.float32)[None, :, :], axis=1)
            running_max = new_max
        out = acc / running_sum[:, None]
        tl.store(out_ptr + row * out_stride_b + heads[:, None] * out_stride_h + dims[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=is_head[:, None])


def decode_attention(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, scale: float,
    *, block_tokens: int | None = None, num_warps: int = 4,
) -> torch.Tensor:
    """q [B, H, 1, D] over keys/values [B, Hkv, L, D] (last dim contiguous), additive mask [B, 1, 1, >=L]
    -> [B, H, D]. Graph-capturable: no host sync, fixed launch for fixed shapes.
    block_tokens / num_warps: the launch shape (defaults measured on an H100)."""
    batch, heads, _, head_dim = q.shape
    kv_heads, attend_tokens = keys.shape[1], keys.shape[2]
    group = heads // kv_heads
    group_pad = triton.next_power_of_2(group)
    if keys.stride(-1) != 1 or values.stride(-1) != 1 or q.stride(-1) != 1 or mask.stride(-1) != 1:
        raise ValueError("decode_attention needs the head dimension (and the mask's last) contiguous")
    if head_dim & (head_dim - 1):
        raise ValueError(f"decode_attention needs a power-of-two head_dim, got {head_dim}")
    out = torch.empty(batch, heads, head_dim, dtype=q.dtype, device=q.device)
    # [group_pad, block, head_dim] float32 products per program: 32 x 128 measured fastest (H100, MHA)
    block = block_tokens or max(16, min(32, 4096 // (group_pad * head_dim)))
    _decode_attention_kernel[(batch, kv_heads)](
        q, keys, values, mask, out,
        q.stride(0), q.stride(1), keys.stride(0), keys.stride(1), keys.stride(2),
        values.stride(0), values.stride(1), values.stride(2),
        mask.stride(0), out.stride(0), out.stride(1),
        attend_tokens, scale,
        GROUP=group, GROUP_PAD=group_pad, HEAD_DIM=head_dim, BLOCK_L=block, num_warps=num_warps,
    )
    return out
