"""One engine step that mixes decode rows and prefill chunks over the paged cache (issue 23).

All the step's tokens run as one flat batch [T] through every per-token operation (embedding, norms,
projections, rotary + K/V write at each token's own slot, MLP): a prefill chunk costs the matrix
products of its tokens and nothing else, and a decode row is a chunk of one token. Only attention
differs per chunk: a chunk's tokens attend the request's cached prefix and, causally, each other,
read through its block table after the step wrote their K/V. Decode rows go through the ragged
paged decode attention (the Triton kernel on a GPU); longer chunks through one SDPA call over all of
them, each padded to the longest chunk and prefix (`PrefillBatch`; the per-chunk loop it replaced
took 44-114 ms a step on an H200, reports/gpu/paged_engine). A varlen paged prefill kernel, reading
blocks in place instead of gathering them, is the GPU's next step. Logits are computed only for
tokens that are sampled (each chunk's last, when it ends the request's known tokens).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from services.worker.paged.attention import paged_decode_attention, paged_decode_attention_reference
from services.worker.paged.decode_step import PagedDecoder
from services.worker.paged.fused_ops import rms_norm, rope_and_write_kv, silu_mul
from services.worker.paged.skinny_gemm import linear


@dataclass
class PrefillBatch:
    """The step's chunks of more than one token, padded to Q queries and L cached positions each, for
    one attention call over all of them (P chunks)."""

    token_index: torch.Tensor  # [P, Q] int64: flat token index of query i of chunk p (padding: 0)
    cache_blocks: torch.Tensor  # [P, L] int64: block of position j of chunk p's request (padding: scratch)
    cache_offsets: torch.Tensor  # [P, L] int64: its offset in the block
    # [P, 1, G * Q, L] bool: query i (of each of the G query heads sharing a K/V head, G = 1 without
    # grouped-query attention) sees position j (causal; a padding query sees position 0). Built once per
    # step, not per layer: a mixed step is bound by its kernel launches (reports/gpu/serving_e2e_ab)
    mask: torch.Tensor
    valid_rows: torch.Tensor  # [V] int64: rows of the flattened [P * Q] that are real queries
    valid_tokens: torch.Tensor  # [V] int64: their flat token indices


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
    decode_chunks: torch.Tensor  # [Sd] int64: chunks of one token (their token index = query_starts[i])
    decode_token_indices: torch.Tensor  # [Sd] int64
    # the decode chunks' rows of block_tables / context_lens, gathered once per step rather than per layer
    decode_block_tables: torch.Tensor  # [Sd, W] int32
    decode_context_lens: torch.Tensor  # [Sd] int32
    prefill: PrefillBatch | None = None  # the chunks of > 1 token (None: there are none)

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


def batched_prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, prefill: PrefillBatch,
                              scale: float) -> torch.Tensor:
    """Every prefill chunk's queries over its gathered prefix, in one SDPA call (padding masked):
    returns [V, H, D] for prefill.valid_tokens. A few launches per layer whatever the chunk count.

    Grouped-query heads are folded into the query axis (query head h reads K/V head h // group), so
    K/V are never repeated per head. On CUDA the call is pinned to the memory-efficient kernel: the
    default picked cuDNN's, which builds a new graph for every new (chunks, queries, positions)
    shape, ~5 ms of host time per layer, and a mixed step's shape is new almost every step
    (reports/gpu/paged_engine/run3: 87 ms a mixed step, ~33 ms of it on the GPU)."""
    num_chunks, num_queries = prefill.token_index.shape
    heads, head_dim = q.shape[1], q.shape[2]
    keys = k_cache[prefill.cache_blocks, prefill.cache_offsets].transpose(1, 2).to(q.dtype)  # [P, Hkv, L, D]
    values = v_cache[prefill.cache_blocks, prefill.cache_offsets].transpose(1, 2).to(q.dtype)
    kv_heads = keys.shape[1]
    group = heads // kv_heads
    queries = (q[prefill.token_index].view(num_chunks, num_queries, kv_heads, group, head_dim)
               .permute(0, 2, 3, 1, 4).reshape(num_chunks, kv_heads, group * num_queries, head_dim))
    with sdpa_backends(q.device):
        out = F.scaled_dot_product_attention(queries, keys, values, attn_mask=prefill.mask, scale=scale)
    out = out.view(num_chunks, kv_heads, group, num_queries, head_dim).permute(0, 3, 1, 2, 4)
    return out.reshape(num_chunks * num_queries, heads, head_dim)[prefill.valid_rows]


def sdpa_backends(device: torch.device):
    """The memory-efficient SDPA kernel on CUDA (masks of any shape, no per-shape build); the default elsewhere."""
    if device.type != "cuda":
        return contextlib.nullcontext()
    return sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


def mixed_attention(decoder: PagedDecoder, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    inputs: MixedInputs) -> torch.Tensor:
    """Attention of every token of the step (q [T, H, D], K/V already written) -> [T, H, D]."""
    out = torch.empty_like(q)
    if len(inputs.decode_chunks):
        rows = inputs.decode_token_indices
        tables, lens = inputs.decode_block_tables, inputs.decode_context_lens
        if decoder.use_triton is False:
            out[rows] = paged_decode_attention_reference(q[rows], k_cache, v_cache, tables, lens, decoder.scale)
        else:
            out[rows] = paged_decode_attention(q[rows], k_cache, v_cache, tables, lens, decoder.scale,
                                               **decoder.attention_launch)
    if inputs.prefill is not None:
        out[inputs.prefill.valid_tokens] = batched_prefill_attention(q, k_cache, v_cache, inputs.prefill,
                                                                     decoder.scale)
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
