"""Paged decode attention equals dense SDPA on random ragged lengths (multi-head and grouped-query).

The reference runs everywhere. The Triton kernel is checked where Triton runs: on a CUDA device,
or on the CPU under TRITON_INTERPRET=1 (set before the first import of triton; Triton 3.6's
interpreter needs numpy < 2 for its loop bounds); elsewhere skipped.
"""

from __future__ import annotations

import pytest
import torch

from services.worker.paged import attention
from services.worker.paged.kv_blocks import BlockPool
from tests.worker.paged_support import needs_triton, triton_device


def ragged_case(seed: int, *, batch: int, heads: int, kv_heads: int, head_dim: int = 16, block_tokens: int = 4,
                max_tokens: int = 40, dtype=torch.float64, device="cpu"):
    """Random lengths, K/V written through a BlockPool into shuffled blocks, and the same K/V dense."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, max_tokens + 1, (batch,), generator=gen).tolist()
    num_blocks = sum(-(-n // block_tokens) for n in lengths) + 3
    pool = BlockPool(num_blocks, block_tokens)
    pool._free = type(pool._free)(torch.randperm(num_blocks, generator=gen).tolist())  # scattered blocks
    k_cache = torch.randn(num_blocks, block_tokens, kv_heads, head_dim, generator=gen, dtype=dtype)
    v_cache = torch.randn(num_blocks, block_tokens, kv_heads, head_dim, generator=gen, dtype=dtype)
    dense_k = torch.zeros(batch, kv_heads, max_tokens, head_dim, dtype=dtype)
    dense_v = torch.zeros_like(dense_k)
    for row, length in enumerate(lengths):
        pool.allocate(row, length)
        slots = torch.tensor([pool.slot(row, p) for p in range(length)])
        dense_k[row, :, :length] = k_cache.view(-1, kv_heads, head_dim)[slots].transpose(0, 1)
        dense_v[row, :, :length] = v_cache.view(-1, kv_heads, head_dim)[slots].transpose(0, 1)
    tables = pool.table_tensor(range(batch), width=-(-max_tokens // block_tokens) + 1, pad_block=num_blocks - 1)
    q = torch.randn(batch, heads, head_dim, generator=gen, dtype=dtype)
    lens = torch.tensor(lengths, dtype=torch.int32)
    moved = [t.to(device) for t in (q, k_cache, v_cache, tables, lens, dense_k, dense_v)]
    return dict(zip(("q", "k_cache", "v_cache", "tables", "lens", "dense_k", "dense_v"), moved, strict=True))


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (6, 2), (7, 1)])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_reference_equals_dense_sdpa(heads, kv_heads, seed):
    case = ragged_case(seed, batch=5, heads=heads, kv_heads=kv_heads)
    scale = 0.25
    paged = attention.paged_decode_attention_reference(
        case["q"], case["k_cache"], case["v_cache"], case["tables"], case["lens"], scale)
    dense = attention.dense_decode_attention(case["q"], case["dense_k"], case["dense_v"], case["lens"], scale)
    torch.testing.assert_close(paged, dense, rtol=1e-10, atol=1e-10)


def test_reference_ignores_what_lies_past_each_length():
    case = ragged_case(3, batch=4, heads=4, kv_heads=2)
    args = (case["q"], case["k_cache"], case["v_cache"], case["tables"], case["lens"], 0.3)
    before = attention.paged_decode_attention_reference(*args)
    for row, length in enumerate(case["lens"].tolist()):  # poison the rest of each row's last block
        last = case["tables"][row, (length - 1) // 4]
        case["k_cache"][last, (length - 1) % 4 + 1 :] = float("nan")
    torch.testing.assert_close(attention.paged_decode_attention_reference(*args), before)


@needs_triton
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (8, 2), (7, 1)])
@pytest.mark.parametrize("num_splits,prefetch,use_dot", [(1, False, True), (3, False, True), (1, True, True),
                                                          (3, True, False), (1, False, False)])
def test_triton_kernel_equals_reference(heads, kv_heads, num_splits, prefetch, use_dot):
    device = triton_device()
    case = ragged_case(7, batch=4, heads=heads, kv_heads=kv_heads, head_dim=16, block_tokens=4,
                       max_tokens=70, dtype=torch.float32, device=device)
    args = (case["q"], case["k_cache"], case["v_cache"], case["tables"], case["lens"], 0.25)
    out = attention.paged_decode_attention_triton(*args, num_splits=num_splits, block_l=16, prefetch=prefetch,
                                                  use_dot=use_dot)
    ref = attention.paged_decode_attention_reference(*args)
    # tl.dot may run at tf32 on a GPU: ~1e-3 relative
    torch.testing.assert_close(out, ref, rtol=3e-3, atol=3e-3)
