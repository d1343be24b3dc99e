"""Mixed-step attention: the varlen kernel over a step's chunks equals each chunk attended alone
(causal over its paged prefix), decode rows and prefill chunks together, for multi-head and
grouped-query caches in both memory layouts; the packed step buffer pads so a captured step ignores
its padding. The Triton kernel runs where Triton does (a GPU, or TRITON_INTERPRET=1 with numpy < 2)."""

from __future__ import annotations

import pytest
import torch

from services.worker.paged import varlen_attention
from services.worker.paged.attention import paged_decode_attention_reference
from services.worker.paged.decode_step import PagedDecoder, PagedModelConfig, PagedWeights
from services.worker.paged.kv_blocks import BlockPool
from services.worker.paged.mixed_step import MixedLayout, mixed_forward
from services.worker.paged.runner import ModelRunner
from services.worker.paged.scheduler import ScheduledChunk, StepPlan
from services.worker.paged.varlen_attention import paged_prefill_attention_reference, varlen_paged_attention

# (cached tokens before the step, tokens the step computes): first chunks, later chunks, decode rows,
# a chunk longer than a query tile (70 > 64 tokens)
SHAPES = [(0, 9), (13, 5), (20, 1), (0, 2), (6, 1), (3, 14), (0, 70), (40, 1)]
KERNEL_DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
needs_triton = pytest.mark.skipif(not varlen_attention.is_available(KERNEL_DEVICE),
                                  reason="the Triton kernel needs a GPU or TRITON_INTERPRET=1")
# float32 everywhere; on a GPU tl.dot rounds float32 inputs to TF32 (10-bit mantissa)
KERNEL_TOLERANCE = dict(rtol=2e-2, atol=2e-2) if KERNEL_DEVICE.type == "cuda" else dict(rtol=1e-4, atol=1e-4)


def _decoder(kv_heads: int, kv_layout: str, num_blocks: int = 80, block_tokens: int = 4,
             device: torch.device = torch.device("cpu")) -> PagedDecoder:
    config = PagedModelConfig(vocab_size=128, hidden_size=64, intermediate_size=32, num_layers=1, num_heads=4,
                              num_kv_heads=kv_heads, max_positions=256)
    return PagedDecoder(config, PagedWeights.random(config, device, torch.float32), num_blocks=num_blocks,
                        block_tokens=block_tokens, use_triton=False, kv_layout=kv_layout)


def _step(decoder: PagedDecoder, seed: int = 0):
    """Random caches, chunks over scattered blocks, and the runner's eager inputs for them."""
    gen = torch.Generator().manual_seed(seed)
    k_cache, v_cache = decoder.k_caches[0], decoder.v_caches[0]
    k_cache.copy_(torch.randn(k_cache.shape, generator=gen).to(decoder.device))
    v_cache.copy_(torch.randn(v_cache.shape, generator=gen).to(decoder.device))
    pool = BlockPool(decoder.num_blocks, decoder.block_tokens)
    pool._free = type(pool._free)(torch.randperm(decoder.num_blocks, generator=gen).tolist())  # scattered blocks
    chunks = []
    for request, (start, count) in enumerate(SHAPES):
        pool.allocate(request, start + count)
        chunks.append(ScheduledChunk(request, tuple(range(count)), start, pool.block_table(request), True))
    # rows_attended_limit=0: the mixed path even for these short chunks (else they run as decode rows)
    prepared = ModelRunner(decoder, rows_attended_limit=0).prepare(
        StepPlan(tuple(chunks), (), sum(c for _, c in SHAPES)))
    q = torch.randn(sum(count for _, count in SHAPES), 4, decoder.config.head_dim, generator=gen)
    return chunks, prepared.mixed, q.to(decoder.device)


def _each_chunk_alone(decoder, chunks, q) -> torch.Tensor:
    k_cache, v_cache = decoder.k_caches[0], decoder.v_caches[0]
    expected, first = torch.empty_like(q), 0
    for chunk in chunks:
        rows = slice(first, first + len(chunk.token_ids))
        table = torch.tensor(chunk.block_table, dtype=torch.int32, device=q.device)
        if len(chunk.token_ids) > 1:
            expected[rows] = paged_prefill_attention_reference(q[rows], k_cache, v_cache, table,
                                                               chunk.context_tokens, decoder.scale)
        else:
            expected[rows] = paged_decode_attention_reference(q[rows], k_cache, v_cache, table[None],
                                                              torch.tensor([chunk.context_tokens], device=q.device),
                                                              decoder.scale)
        first += len(chunk.token_ids)
    return expected


def _padded(decoder, chunks, inputs, *, extra_tokens: int, extra_chunks: int, extra_width: int):
    """`inputs` repacked into a larger bucket, as a captured step's buffer holds them, on the same device."""
    layout = MixedLayout(inputs.token_ids.shape[0] + extra_tokens, len(chunks) + extra_chunks,
                         len(chunks) + extra_chunks, inputs.block_tables.shape[1] + extra_width)
    return layout.views(torch.from_numpy(layout.pack(
        inputs.token_ids.tolist(), inputs.positions.tolist(), inputs.slot_mapping.tolist(),
        inputs.query_starts.tolist(), inputs.context_lens.tolist(), [c.block_table for c in chunks],
        inputs.sample_indices.tolist(), scratch_slot=decoder.scratch_slot, scratch_block=decoder.num_blocks,
    )).to(decoder.device))


def _attend(decoder, inputs, q, use_triton, **launch):
    return varlen_paged_attention(q, decoder.k_caches[0], decoder.v_caches[0], inputs.block_tables,
                                  inputs.context_lens, inputs.query_starts, decoder.scale, use_triton=use_triton,
                                  **launch)


@pytest.mark.parametrize("kv_heads,kv_layout", [(4, "token_major"), (2, "token_major"), (1, "head_major")])
def test_varlen_reference_equals_each_chunk_alone(kv_heads, kv_layout):
    decoder = _decoder(kv_heads, kv_layout)
    chunks, inputs, q = _step(decoder)
    torch.testing.assert_close(_attend(decoder, inputs, q, False), _each_chunk_alone(decoder, chunks, q),
                               rtol=1e-5, atol=1e-5)


@needs_triton
@pytest.mark.parametrize("kv_heads,kv_layout,block_m", [(4, "token_major", 64), (2, "token_major", 16),
                                                        (1, "head_major", 64), (4, "head_major", 16)])
def test_varlen_kernel_equals_each_chunk_alone(kv_heads, kv_layout, block_m):
    decoder = _decoder(kv_heads, kv_layout, device=KERNEL_DEVICE)
    chunks, inputs, q = _step(decoder, seed=1)
    out = _attend(decoder, inputs, q, None, block_m=block_m, block_n=16)
    torch.testing.assert_close(out, _each_chunk_alone(decoder, chunks, q), **KERNEL_TOLERANCE)


@needs_triton
def test_varlen_kernel_ignores_padding_tokens_and_chunks():
    """A step packed into a larger bucket (as a captured one is): its live rows unchanged, padding rows zero."""
    decoder = _decoder(2, "token_major", device=KERNEL_DEVICE)
    chunks, inputs, q = _step(decoder, seed=2)
    live = q.shape[0]
    padded = _padded(decoder, chunks, inputs, extra_tokens=37, extra_chunks=5, extra_width=3)
    q_padded = torch.cat([q, torch.randn(37, *q.shape[1:], device=q.device)])
    out = _attend(decoder, padded, q_padded, None, block_n=16)
    torch.testing.assert_close(out[:live], _each_chunk_alone(decoder, chunks, q), **KERNEL_TOLERANCE)
    assert out[live:].abs().max() == 0


def test_packed_buffer_pads_with_scratch_and_empty_chunks():
    layout = MixedLayout(tokens=6, chunks=3, samples=3, table_width=2)
    inputs = layout.views(torch.from_numpy(layout.pack(
        [5, 6, 7], [0, 1, 4], [10, 11, 12], [0, 2, 3], [2, 5], [[1], [2, 3]], [1, 2], scratch_slot=99,
        scratch_block=9)))
    assert inputs.token_ids.tolist() == [5, 6, 7, 0, 0, 0]
    assert inputs.slot_mapping.tolist() == [10, 11, 12, 99, 99, 99]
    assert inputs.query_starts.tolist() == [0, 2, 3, 3]  # the padding chunk starts at the last live token: empty
    assert inputs.context_lens.tolist() == [2, 5, 0]
    assert inputs.block_tables.tolist() == [[1, 9], [2, 3], [9, 9]]
    assert inputs.sample_indices.tolist() == [1, 2, 0]


def test_mixed_forward_of_a_padded_step_equals_the_live_step():
    """The whole step packed into a larger bucket gives the live step's logits for its sampled tokens
    and writes the live tokens' K/V where the unpadded step does (padding only touches the scratch block)."""
    decoder = _decoder(2, "token_major")
    chunks, inputs, _ = _step(decoder, seed=3)
    caches = [c.clone() for c in (*decoder.k_caches, *decoder.v_caches)]
    logits = mixed_forward(decoder, inputs)
    written = [c.clone() for c in (*decoder.k_caches, *decoder.v_caches)]
    for cache, before in zip((*decoder.k_caches, *decoder.v_caches), caches, strict=True):
        cache.copy_(before)
    padded = _padded(decoder, chunks, inputs, extra_tokens=11, extra_chunks=4, extra_width=2)
    padded_logits = mixed_forward(decoder, padded)
    torch.testing.assert_close(padded_logits[: logits.shape[0]], logits, rtol=1e-5, atol=1e-5)
    for cache, expected in zip((*decoder.k_caches, *decoder.v_caches), written, strict=True):
        torch.testing.assert_close(cache[:-1], expected[:-1])  # the last block is the padding's scratch
