"""One engine step that mixes decode rows and prefill chunks over the paged cache (issue 23, item 4).

All the step's tokens run as one flat batch [T] through every per-token operation (embedding, norms,
projections, rotary + K/V write at each token's own slot, MLP): a prefill chunk costs the matrix
products of its tokens and nothing else, and a decode row is a chunk of one token. Only attention
differs per chunk: a chunk's tokens attend the request's cached prefix and, causally, each other,
read through its block table after the step wrote their K/V. Decode rows go through the ragged
paged decode attention (the Triton kernel on a GPU); longer chunks through SDPA over their gathered
blocks, one chunk at a time (correct everywhere; a varlen paged prefill kernel is the GPU's next
step). Logits are computed only for tokens that are sampled (each chunk's last, when it ends the
request's known tokens).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from services.worker.paged.attention import paged_decode_attention, paged_decode_attention_reference
from services.worker.paged.decode_step import PagedDecoder
from services.worker.paged.fused_ops import rms_norm, rope_and_write_kv, silu_mul
from services.worker.paged.skinny_gemm import linear


@dataclass
class MixedInputs:
    """A step's tokens, flat: chunk i holds tokens query_starts[i]..query_starts[i + 1] - 1."""

    token_ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64: position of each token in its request's sequence
    slot_mapping: torch.Tensor  # [T] int64: cache slot its K/V is written to
    block_tables: torch.Tensor  # [S, W] int32: each chunk's request's blocks, padded
    context_lens: torch.Tensor  # [S] int32: tokens a chunk's last token attends (its prefix, itself included)
    sample_indices: torch.Tensor  # [R] int64: flat indices of the tokens whose logits are wanted
    query_starts: list[int]  # S + 1 offsets (host)
    chunk_context_tokens: list[int]  # context_lens on the host (no sync per layer)
    decode_chunks: torch.Tensor  # [Sd] int64: chunks of one token (their token index = query_starts[i])
    decode_token_indices: torch.Tensor  # [Sd] int64

    @property
    def num_chunks(self) -> int:
        return len(self.query_starts) - 1


def paged_prefill_attention_reference(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                                      block_table: torch.Tensor, context_tokens: int, scale: float) -> torch.Tensor:
    """q [n, H, D]: the last n of a request's `context_tokens` tokens, whose K/V (with the prefix's)
    is in the blocks `block_table` [>= blocks needed] of k_cache / v_cache [blocks, block_tokens, Hkv, D].
    Query i attends positions 0..context_tokens - n + i. Returns [n, H, D]."""
    num_queries, heads, head_dim = q.shape
    block_tokens, kv_heads = k_cache.shape[1], k_cache.shape[2]
    blocks = block_table[: -(-context_tokens // block_tokens)].long()
    keys = k_cache[blocks].reshape(-1, kv_heads, head_dim)[:context_tokens]
    values = v_cache[blocks].reshape(-1, kv_heads, head_dim)[:context_tokens]
    start = context_tokens - num_queries
    visible = (torch.arange(context_tokens, device=q.device)[None, :]
               <= start + torch.arange(num_queries, device=q.device)[:, None])
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1)[None], keys.transpose(0, 1)[None].to(q.dtype), values.transpose(0, 1)[None].to(q.dtype),
        attn_mask=visible, scale=scale, enable_gqa=kv_heads != heads,
    )
    return out[0].transpose(0, 1)


def mixed_attention(decoder: PagedDecoder, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    inputs: MixedInputs) -> torch.Tensor:
    """Attention of every token of the step (q [T, H, D], K/V already written) -> [T, H, D]."""
    out = torch.empty_like(q)
    if len(inputs.decode_chunks):
        rows = inputs.decode_token_indices
        tables, lens = inputs.block_tables[inputs.decode_chunks], inputs.context_lens[inputs.decode_chunks]
        if decoder.use_triton is False:
            out[rows] = paged_decode_attention_reference(q[rows], k_cache, v_cache, tables, lens, decoder.scale)
        else:
            out[rows] = paged_decode_attention(q[rows], k_cache, v_cache, tables, lens, decoder.scale,
                                               **decoder.attention_launch)
    starts = inputs.query_starts
    for chunk, context_tokens in enumerate(inputs.chunk_context_tokens):
        begin, end = starts[chunk], starts[chunk + 1]
        if end - begin > 1:
            out[begin:end] = paged_prefill_attention_reference(
                q[begin:end], k_cache, v_cache, inputs.block_tables[chunk], context_tokens, decoder.scale)
    return out


def mixed_forward(decoder: PagedDecoder, inputs: MixedInputs) -> torch.Tensor:
    """The step over `decoder`'s weights and caches; returns logits [R, vocab] of the sampled tokens."""
    config, weights, use_triton = decoder.config, decoder.weights, decoder.use_triton
    hidden = F.embedding(inputs.token_ids, weights.embed)
    num_tokens = hidden.shape[0]
    for layer, k_cache, v_cache in zip(weights.layers, decoder.k_caches, decoder.v_caches, strict=True):
        normed = rms_norm(hidden, layer.input_norm, config.rms_norm_eps, use_triton=use_triton)
        qkv = linear(normed, layer.qkv, layer.qkv_bias)
        q = rope_and_write_kv(qkv, decoder.cos, decoder.sin, inputs.positions, inputs.slot_mapping, k_cache, v_cache,
                              config.num_heads, use_triton=use_triton)
        attended = mixed_attention(decoder, q, k_cache, v_cache, inputs)
        hidden = linear(attended.reshape(num_tokens, -1), layer.out, residual=hidden)
        normed = rms_norm(hidden, layer.post_norm, config.rms_norm_eps, use_triton=use_triton)
        hidden = linear(silu_mul(linear(normed, layer.gate_up), use_triton=use_triton), layer.down, residual=hidden)
    sampled = hidden[inputs.sample_indices]
    return linear(rms_norm(sampled, weights.final_norm, config.rms_norm_eps, use_triton=use_triton), weights.lm_head)
