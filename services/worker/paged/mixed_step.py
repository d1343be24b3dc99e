"""One engine step that mixes decode rows and prefill chunks over the paged cache (issue 23).

All the step's tokens run as one flat batch [T] through every per-token operation (embedding, norms,
projections, rotary + K/V write at each token's own slot, MLP): a prefill chunk costs the matrix
products of its tokens and nothing else, and a decode row is a chunk of one token. Attention reads
each chunk's cached prefix and, causally, its own tokens through its block table after the step wrote
their K/V: one varlen kernel launch for every chunk (`varlen_attention`). Logits are computed only for
tokens that are sampled (each chunk's last, when it ends the request's known tokens).

A step's inputs are views of one flat int64 buffer (`MixedLayout`), so they reach the device in one
copy and a captured step (`GraphedMixed`) takes new inputs by overwriting that buffer. Nothing in the
step depends on the split of its tokens into chunks but that buffer: one graph per (tokens, chunks)
bucket serves every step that fits it, its padding tokens writing a scratch slot and its padding
chunks holding no queries. Captured, a mixed step costs its GPU time, not its host launches (py-spy put
~23 ms of an eager ~50 ms 7B step in launching, reports/gpu/serving_e2e_ab run 10; captured with the varlen
kernel a burst's mixed step took 27.7 ms, reports/gpu/serving.md).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from services.worker.paged.decode_step import PagedDecoder, capture_step
from services.worker.paged.fused_ops import rms_norm, rope_and_write_kv, silu_mul
from services.worker.paged.kv_blocks import padded_tables
from services.worker.paged.skinny_gemm import linear, linear_and_norm
from services.worker.paged.varlen_attention import varlen_paged_attention


@dataclass
class MixedInputs:
    """A step's tokens, flat: chunk s holds tokens query_starts[s]..query_starts[s + 1] - 1 (int64 views)."""

    token_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]: position of each token in its request's sequence
    slot_mapping: torch.Tensor  # [T]: cache slot its K/V is written to
    query_starts: torch.Tensor  # [S + 1]
    context_lens: torch.Tensor  # [S]: tokens a chunk's last token attends (its prefix, itself included)
    block_tables: torch.Tensor  # [S, W]: each chunk's request's blocks, padded
    sample_indices: torch.Tensor  # [R]: flat indices of the tokens whose logits are wanted


@dataclass(frozen=True)
class MixedLayout:
    """Where each field of MixedInputs lies in the flat buffer of a step of `tokens`, `chunks`, `samples`."""

    tokens: int
    chunks: int
    samples: int
    table_width: int

    @property
    def sizes(self) -> list[int]:
        t, s = self.tokens, self.chunks
        return [t, t, t, s + 1, s, s * self.table_width, self.samples]

    @property
    def size(self) -> int:
        return sum(self.sizes)

    def views(self, buffer: torch.Tensor) -> MixedInputs:
        tokens, positions, slots, starts, lens, tables, samples = buffer.split(self.sizes)
        return MixedInputs(tokens, positions, slots, starts, lens, tables.view(self.chunks, self.table_width),
                           samples)

    def pack(self, token_ids: Sequence[int], positions: Sequence[int], slots: Sequence[int],
             query_starts: Sequence[int], context_lens: Sequence[int], tables: Sequence[Sequence[int]],
             sample_indices: Sequence[int], *, scratch_slot: int, scratch_block: int) -> np.ndarray:
        """The host buffer of a step that fits this layout, padded: padding tokens write `scratch_slot`,
        padding chunks start at the last live token and hold none, tables pad with `scratch_block`."""
        flat = np.zeros(self.size, dtype=np.int64)
        tokens_, positions_, slots_, starts_, lens_, tables_, samples_ = np.split(flat, np.cumsum(self.sizes)[:-1])
        live = len(token_ids)
        tokens_[:live], positions_[:live], slots_[:live] = token_ids, positions, slots
        slots_[live:] = scratch_slot
        starts_[: len(query_starts)] = query_starts
        starts_[len(query_starts):] = live
        lens_[: len(context_lens)] = context_lens
        table_rows = tables_.reshape(self.chunks, self.table_width)
        live_chunks = min(len(tables), self.chunks)
        table_rows[:live_chunks] = padded_tables(tables[:live_chunks], self.table_width, scratch_block)
        table_rows[live_chunks:] = scratch_block
        samples_[: len(sample_indices)] = sample_indices
        return flat


def mixed_forward(decoder: PagedDecoder, inputs: MixedInputs) -> torch.Tensor:
    """The step over `decoder`'s weights and caches; returns logits [R, vocab] of the sampled tokens.
    No host sync unless decoder.use_triton is False (the reference attention): capturable."""
    config, weights, use_triton = decoder.config, decoder.weights, decoder.use_triton
    hidden = F.embedding(inputs.token_ids, weights.embed)
    num_tokens, eps = hidden.shape[0], config.rms_norm_eps
    normed = rms_norm(hidden, weights.layers[0].input_norm, eps, use_triton=use_triton)
    next_norms = [layer.input_norm for layer in weights.layers[1:]] + [weights.final_norm]
    for layer, next_norm, k_cache, v_cache in zip(weights.layers, next_norms, decoder.k_caches, decoder.v_caches,
                                                  strict=True):
        qkv = linear(normed, layer.qkv, layer.qkv_bias)
        q = rope_and_write_kv(qkv, decoder.cos, decoder.sin, inputs.positions, inputs.slot_mapping, k_cache, v_cache,
                              config.num_heads, use_triton=use_triton)
        attended = varlen_paged_attention(q, k_cache, v_cache, inputs.block_tables, inputs.context_lens,
                                          inputs.query_starts, decoder.scale, use_triton=use_triton,
                                          **decoder.varlen_launch)
        hidden, normed = linear_and_norm(attended.reshape(num_tokens, -1), layer.out, layer.post_norm, eps,
                                         residual=hidden, use_triton=use_triton)
        activated = silu_mul(linear(normed, layer.gate_up), use_triton=use_triton)
        hidden, normed = linear_and_norm(activated, layer.down, next_norm, eps, residual=hidden, use_triton=use_triton)
    # every token is normalised by the last layer's norm (one kernel either way); only the sampled reach the head
    return linear(normed[inputs.sample_indices], weights.lm_head)


class GraphedMixed:
    """A mixed step of up to `tokens` tokens in up to `chunks` chunks, captured as a CUDA graph.

    Copy a host buffer packed by `layout` into `buffer`, call `replay()`, read `next_tokens[:R]`
    (greedy; one sampled token at most per chunk, so R <= chunks)."""

    def __init__(self, decoder: PagedDecoder, tokens: int, chunks: int, table_width: int, pool=None) -> None:
        self.layout = MixedLayout(tokens, chunks, chunks, table_width)
        self.buffer = torch.from_numpy(self.layout.pack(
            [], [], [], [0], [], [], [], scratch_slot=decoder.scratch_slot, scratch_block=decoder.num_blocks,
        )).to(decoder.device)
        self.inputs = inputs = self.layout.views(self.buffer)  # views of `buffer`
        self.graph, self.next_tokens = capture_step(lambda: mixed_forward(decoder, inputs).argmax(dim=-1), pool)

    def replay(self) -> None:
        self.graph.replay()
