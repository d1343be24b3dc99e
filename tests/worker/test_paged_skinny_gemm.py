"""The Triton GEMM equals torch's product (with bias and residual) where Triton runs, in one pass, in
row tiles and split along K; torch otherwise."""

from __future__ import annotations

import pytest
import torch

from services.worker.paged.fused_ops import rms_norm
from services.worker.paged.skinny_gemm import linear, linear_and_norm
from tests.worker.paged_support import needs_triton, triton_device


def test_without_launch_is_torch():
    gen = torch.Generator().manual_seed(0)
    x, w, b, r = (torch.randn(*s, generator=gen) for s in ((3, 8), (5, 8), (5,), (3, 5)))
    torch.testing.assert_close(linear(x, w, b, r), x @ w.T + b + r)
    torch.testing.assert_close(linear(x, w), x @ w.T)


@needs_triton
@pytest.mark.parametrize("rows", [1, 5, 16, 40])
@pytest.mark.parametrize("has_bias,has_residual", [(False, False), (True, False), (False, True)])
def test_triton_equals_torch(rows, has_bias, has_residual):
    device = triton_device()
    gen = torch.Generator().manual_seed(rows)
    width, depth = 72, 64  # width not a multiple of block_n: the column mask is exercised
    x = torch.randn(rows, depth, generator=gen).to(device)
    w = torch.randn(width, depth, generator=gen).to(device)
    b = torch.randn(width, generator=gen).to(device) if has_bias else None
    r = torch.randn(rows, width, generator=gen).to(device) if has_residual else None
    out = linear(x, w, b, r, launch=dict(block_n=32, block_k=32, num_stages=2))
    expected = x @ w.T + (b if b is not None else 0) + (r if r is not None else 0)
    torch.testing.assert_close(out, expected, rtol=3e-3, atol=3e-2)  # tf32 products on a GPU


@needs_triton
@pytest.mark.parametrize("rows,block_m,splits", [(40, None, 2), (40, None, 3), (70, 32, 1), (70, 32, 4)])
@pytest.mark.parametrize("has_bias,has_residual", [(False, False), (True, True)])
def test_row_tiles_and_split_k_equal_torch(rows, block_m, splits, has_bias, has_residual):
    """Several row tiles (70 rows in 32-row tiles: a partial last tile) and K split 2-4 ways, also
    unevenly (5 K tiles in 3 or 4 splits): the partial sums plus bias and residual equal torch's."""
    device = triton_device()
    gen = torch.Generator().manual_seed(rows + splits)
    width, depth = 72, 80
    x = torch.randn(rows, depth, generator=gen).to(device)
    w = torch.randn(width, depth, generator=gen).to(device)
    b = torch.randn(width, generator=gen).to(device) if has_bias else None
    r = torch.randn(rows, width, generator=gen).to(device) if has_residual else None
    out = linear(x, w, b, r, launch=dict(block_n=32, block_k=16, num_stages=2, block_m=block_m, splits=splits))
    expected = x @ w.T + (b if b is not None else 0) + (r if r is not None else 0)
    torch.testing.assert_close(out, expected, rtol=3e-3, atol=3e-2)


def test_refuses_depth_not_a_multiple_of_block_k():
    if triton_device() is None:
        pytest.skip("the Triton path only")
    x = torch.randn(4, 40, device=triton_device())
    with pytest.raises(ValueError, match="block_k"):
        linear(x, torch.randn(8, 40, device=x.device), launch=dict(block_n=32, block_k=32))


@needs_triton
@pytest.mark.parametrize("launch", [None, dict(block_n=32, block_k=16, num_stages=2),
                                    dict(block_n=32, block_k=16, num_stages=2, splits=3),
                                    dict(block_n=32, block_k=16, num_stages=2, block_m=32)])
def test_product_then_norm_equals_product_with_residual_then_norm(launch):
    """linear_and_norm (the residual added by the split-K sum, or by add_rms_norm after a product
    without it) gives `linear`'s output with the residual and `rms_norm` of it."""
    device = triton_device()
    gen = torch.Generator().manual_seed(7)
    rows, width, depth = 40, 72, 80
    x = torch.randn(rows, depth, generator=gen).to(device)
    w = torch.randn(width, depth, generator=gen).to(device)
    r = torch.randn(rows, width, generator=gen).to(device)
    norm_weight = (torch.rand(width, generator=gen) + 0.5).to(device)
    hidden, normed = linear_and_norm(x, w, norm_weight, 1e-6, residual=r, launch=launch)
    torch.testing.assert_close(hidden, x @ w.T + r, rtol=3e-3, atol=3e-2)  # tf32 products on a GPU
    torch.testing.assert_close(normed, rms_norm(hidden, norm_weight, 1e-6, use_triton=False), rtol=1e-5, atol=1e-5)


def test_product_then_norm_on_the_cpu_is_torch():
    gen = torch.Generator().manual_seed(0)
    x, w, r = (torch.randn(*s, generator=gen) for s in ((3, 8), (5, 8), (3, 5)))
    norm_weight = torch.rand(5, generator=gen)
    hidden, normed = linear_and_norm(x, w, norm_weight, 1e-5, residual=r)
    torch.testing.assert_close(hidden, x @ w.T + r)
    torch.testing.assert_close(normed, rms_norm(x @ w.T + r, norm_weight, 1e-5, use_triton=False))
