"""Mixed-step attention: the step's prefill chunks attended in one padded call equal each chunk
attended alone (causal over its paged prefix), next to decode rows, for multi-head and grouped-query
caches in both memory layouts."""

from __future__ import annotations

import pytest
import torch

from services.worker.paged.attention import paged_decode_attention_reference
from services.worker.paged.decode_step import PagedDecoder, PagedModelConfig, PagedWeights
from services.worker.paged.kv_blocks import BlockPool
from services.worker.paged.mixed_step import mixed_attention, paged_prefill_attention_reference
from services.worker.paged.runner import ModelRunner
from services.worker.paged.scheduler import ScheduledChunk, StepPlan


@pytest.mark.parametrize("kv_heads,kv_layout", [(4, "token_major"), (2, "token_major"), (1, "head_major")])
def test_padded_prefill_attention_equals_each_chunk_alone(kv_heads, kv_layout):
    config = PagedModelConfig(vocab_size=32, hidden_size=64, intermediate_size=32, num_layers=1, num_heads=4,
                              num_kv_heads=kv_heads, max_positions=256)
    decoder = PagedDecoder(config, PagedWeights.random(config, "cpu", torch.float32), num_blocks=40, block_tokens=4,
                           use_triton=False, kv_layout=kv_layout)
    gen = torch.Generator().manual_seed(0)
    k_cache, v_cache = decoder.k_caches[0], decoder.v_caches[0]
    k_cache.copy_(torch.randn(k_cache.shape, generator=gen))
    v_cache.copy_(torch.randn(v_cache.shape, generator=gen))
    pool = BlockPool(40, 4)
    pool._free = type(pool._free)(torch.randperm(40, generator=gen).tolist())  # scattered blocks
    # (cached tokens before the step, tokens the step computes): a first chunk, a later chunk, decode rows
    shapes = [(0, 9), (13, 5), (20, 1), (0, 2), (6, 1), (3, 14)]
    chunks = []
    for request, (start, count) in enumerate(shapes):
        pool.allocate(request, start + count)
        chunks.append(ScheduledChunk(request, tuple(range(count)), start, pool.block_table(request), True))
    # rows_attended_limit=0: the mixed path even for these short chunks (else they run as decode rows)
    prepared = ModelRunner(decoder, rows_attended_limit=0).prepare(StepPlan(tuple(chunks), (), sum(c for _, c in shapes)))
    num_tokens = sum(count for _, count in shapes)
    q = torch.randn(num_tokens, 4, config.head_dim, generator=gen)
    out = mixed_attention(decoder, q, k_cache, v_cache, prepared.mixed)
    first = 0
    for chunk in chunks:
        rows = slice(first, first + len(chunk.token_ids))
        table = torch.tensor(chunk.block_table, dtype=torch.int32)
        if len(chunk.token_ids) > 1:
            expected = paged_prefill_attention_reference(q[rows], k_cache, v_cache, table, chunk.context_tokens,
                                                         decoder.scale)
        else:
            expected = paged_decode_attention_reference(q[rows], k_cache, v_cache, table[None],
                                                        torch.tensor([chunk.context_tokens]), decoder.scale)
        torch.testing.assert_close(out[rows], expected, rtol=1e-5, atol=1e-5)
        first += len(chunk.token_ids)
