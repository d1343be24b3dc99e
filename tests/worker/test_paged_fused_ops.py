"""The fused kernels equal their torch versions. Rotary + K/V write: every head of q, k and v, head counts
that do not fill the kernel's last group of heads (Qwen2-7B's 28 + 4 + 4), both cache layouts, scattered
slots. Residual add + RMSNorm: the sum and the norm of the sum, widths that do not fill a power of two."""

from __future__ import annotations

import pytest
import torch

from services.worker.paged.fused_ops import ROPE_HEADS_PER_PROGRAM, add_rms_norm, rms_norm, rope_and_write_kv
from tests.worker.paged_support import needs_triton, triton_device


@needs_triton
@pytest.mark.parametrize("num_heads,num_kv_heads,head_major", [(28, 4, False), (4, 4, True), (6, 2, False)])
def test_rope_and_write_kv_kernel_equals_torch(num_heads, num_kv_heads, head_major):
    assert (num_heads + 2 * num_kv_heads) % ROPE_HEADS_PER_PROGRAM  # a partly filled last group of heads
    device, dim, block_tokens, blocks, rows = triton_device(), 16, 4, 12, 7
    gen = torch.Generator().manual_seed(0)
    qkv = torch.randn(rows, (num_heads + 2 * num_kv_heads) * dim, generator=gen).to(device)
    angles = torch.rand(64, dim, generator=gen).to(device)
    cos, sin = angles.cos(), angles.sin()
    positions = torch.randint(0, 64, (rows,), generator=gen).to(device)
    slots = torch.randperm(blocks * block_tokens, generator=gen)[:rows].to(device)
    results = []
    for use_triton in (False, True):
        if head_major:  # [block, kv_head, token, dim] in memory, indexed [block, token, kv_head, dim]
            caches = [torch.zeros(blocks, num_kv_heads, block_tokens, dim, device=device).transpose(1, 2)
                      for _ in range(2)]
        else:
            caches = [torch.zeros(blocks, block_tokens, num_kv_heads, dim, device=device) for _ in range(2)]
        q = rope_and_write_kv(qkv, cos, sin, positions, slots, *caches, num_heads, use_triton=use_triton)
        results.append((q, *caches))
    for expected, got in zip(*results, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert results[0][1].abs().sum() > 0 and results[0][2].abs().sum() > 0  # K and V were written


@needs_triton
@pytest.mark.parametrize("rows,width", [(1, 64), (5, 72), (33, 200)])
def test_add_rms_norm_kernel_equals_torch(rows, width):
    device = triton_device()
    gen = torch.Generator().manual_seed(rows)
    x, residual = (torch.randn(rows, width, generator=gen).to(device) for _ in range(2))
    weight = (torch.rand(width, generator=gen) + 0.5).to(device)
    hidden, normed = add_rms_norm(x, residual, weight, 1e-6, use_triton=True)
    torch.testing.assert_close(hidden, x + residual)
    torch.testing.assert_close(normed, rms_norm(x + residual, weight, 1e-6, use_triton=False), rtol=1e-5, atol=1e-5)
    expected = add_rms_norm(x, residual, weight, 1e-6, use_triton=False)
    torch.testing.assert_close(normed, expected[1], rtol=1e-5, atol=1e-5)
