"""One decode step of a Llama-family model over a paged KV cache, replayable as a CUDA graph.

Written against plain weight tensors (`PagedWeights`), so a benchmark can build a 7B shape with
random weights and a test can take them from a transformers model. A step advances every row by
one token: embed -> per layer [RMSNorm, fused QKV projection, rotary at the row's own position and
the new K/V written to the row's slot, ragged paged attention, O projection + residual, RMSNorm,
fused gate/up projection, SiLU-and-mul, down projection + residual] -> final norm -> lm_head -> argmax.

Everything a step reads per row lives in `StepInputs`, fixed-address device buffers: a graph is
captured once per batch-size bucket (`GraphedDecode`) and replayed with new contents. Rows beyond
the live ones in a bucket are padding: they write to and read from a scratch block past the pool
(block index num_blocks), so they never touch a live row's blocks.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import torch
import torch.nn.functional as F

from services.worker.fast_decoder import LayerWeights, view_rows_of
from services.worker.paged.attention import paged_decode_attention, paged_decode_attention_reference
from services.worker.paged.fused_ops import rms_norm, rope_and_write_kv, silu_mul
from services.worker.paged.skinny_gemm import DEFAULT_SKINNY_ROWS, default_launch, linear, linear_and_norm


@dataclass(frozen=True)
class PagedModelConfig:
    """The shape of a Llama-family decoder (pre-norm RMSNorm, rotary, GQA, SwiGLU)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    has_qkv_bias: bool = False  # Qwen2 has biases on q/k/v, Llama none
    max_positions: int = 4096

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not a multiple of num_heads {self.num_heads}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"rotary needs an even head_dim, got {self.head_dim}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def kv_bytes_per_token(self) -> int:
        """K and V of one token over all layers, in bytes at 2 bytes an element (bf16)."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * 2

    @classmethod
    def from_hf(cls, config) -> PagedModelConfig:
        return cls(
            vocab_size=config.vocab_size, hidden_size=config.hidden_size,
            intermediate_size=config.intermediate_size, num_layers=config.num_hidden_layers,
            num_heads=config.num_attention_heads,
            num_kv_heads=getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
            rms_norm_eps=config.rms_norm_eps, rope_theta=_rope_theta(config),
            has_qkv_bias=config.model_type == "qwen2", max_positions=config.max_position_embeddings,
        )


def _rope_theta(config) -> float:
    """transformers 5 keeps rope_theta in rope_parameters; older versions on the config. Only
    plain rotary is built here, so a scaled one is refused rather than silently changed."""
    parameters = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if parameters.get("rope_type", "default") != "default":
        raise ValueError(f"only default rotary is supported, got {parameters.get('rope_type')}")
    return float(parameters.get("rope_theta") or getattr(config, "rope_theta", None) or 10000.0)


LLAMA2_7B = PagedModelConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_layers=32,
                             num_heads=32, num_kv_heads=32, rms_norm_eps=1e-5)
QWEN2_7B = PagedModelConfig(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_layers=28,
                            num_heads=28, num_kv_heads=4, rope_theta=1e6, has_qkv_bias=True)


@dataclass
class PagedWeights:
    embed: torch.Tensor  # [vocab, hidden]
    layers: list[LayerWeights]
    final_norm: torch.Tensor
    lm_head: torch.Tensor  # [vocab, hidden]

    @classmethod
    def random(cls, config: PagedModelConfig, device, dtype=torch.bfloat16, seed: int = 0) -> PagedWeights:
        """Random weights at std 0.02 (norms at 1): activations stay finite over many layers."""
        gen = torch.Generator(device=device).manual_seed(seed)
        hidden, inner, dim = config.hidden_size, config.intermediate_size, config.head_dim
        qkv_rows = (config.num_heads + 2 * config.num_kv_heads) * dim

        def normal(*shape):
            return (torch.randn(*shape, generator=gen, device=device, dtype=dtype) * 0.02)

        def ones():
            return torch.ones(hidden, device=device, dtype=dtype)

        layers = [
            LayerWeights(
                input_norm=ones(), qkv=normal(qkv_rows, hidden),
                qkv_bias=normal(qkv_rows) if config.has_qkv_bias else None, out=normal(hidden, config.num_heads * dim),
                post_norm=ones(), gate_up=normal(2 * inner, hidden), down=normal(hidden, inner),
            )
            for _ in range(config.num_layers)
        ]
        return cls(embed=normal(config.vocab_size, hidden), layers=layers, final_norm=ones(),
                   lm_head=normal(config.vocab_size, hidden))

    @classmethod
    def from_hf(cls, model, *, share: bool = False) -> PagedWeights:
        """A transformers Llama-family model's weights, q/k/v and gate/up fused. share=False: copies;
        share=True: no weight stored twice (a served 7B model would otherwise hold ~13 GB of bf16
        weights twice): the fused matrices are new and the model's q/k/v and gate/up projections
        become views of their rows; every other tensor is the model's own (its forward is unchanged)."""
        def own(t: torch.Tensor) -> torch.Tensor:
            return t.detach() if share else t.detach().clone()

        layers = []
        for layer in model.model.layers:
            attn, mlp = layer.self_attn, layer.mlp
            projections = (attn.q_proj, attn.k_proj, attn.v_proj)
            biases = [p.bias for p in projections]
            qkv = torch.cat([p.weight.detach() for p in projections])
            qkv_bias = torch.cat([b.detach() for b in biases]) if all(b is not None for b in biases) else None
            gate_up = torch.cat([mlp.gate_proj.weight.detach(), mlp.up_proj.weight.detach()])
            if share:
                view_rows_of(projections, qkv, qkv_bias)
                view_rows_of((mlp.gate_proj, mlp.up_proj), gate_up, None)
            layers.append(LayerWeights(
                input_norm=own(layer.input_layernorm.weight), qkv=qkv, qkv_bias=qkv_bias, out=own(attn.o_proj.weight),
                post_norm=own(layer.post_attention_layernorm.weight), gate_up=gate_up, down=own(mlp.down_proj.weight),
            ))
        return cls(embed=own(model.model.embed_tokens.weight), layers=layers, final_norm=own(model.model.norm.weight),
                   lm_head=own(model.lm_head.weight))

    def step_read_bytes(self, batch: int) -> int:
        """Weight bytes one decode step must read: every matrix and norm, but only `batch` rows of
        the embedding table."""
        tensors = [self.final_norm, self.lm_head]
        for layer in self.layers:
            tensors += [t for t in vars(layer).values() if t is not None]
        embedding_rows = batch * self.embed.shape[1] * self.embed.element_size()
        return sum(t.numel() * t.element_size() for t in tensors) + embedding_rows


# Host buffers at least this large are pinned and copied asynchronously, smaller ones copied plainly.
# On an H200's host (reports/gpu/serving.md, 2026-12-04) pinning each step's buffer cost ~0.15 ms more
# than a plain copy for a few rows, and ~0.45 ms less over the mix burst's steps of hundreds of rows.
PIN_BYTES = 16 * 1024


def upload(host: torch.Tensor, device: torch.device, pin: bool = False) -> torch.Tensor:
    """`host` (a CPU tensor) on `device` in one copy; pin: always pinned and asynchronous (a step may
    still run, which a plain copy would wait for)."""
    if device.type != "cuda":
        return host
    if not pin and host.numel() * host.element_size() < PIN_BYTES:
        return host.to(device)  # the GPU is idle between steps (each ends at its sync): nothing to overlap
    # a pinned block from torch's caching host allocator, which reuses it only once this copy ran
    # (one reused staging buffer could be overwritten by a later call while its copy was queued)
    return host.pin_memory().to(device, non_blocking=True)


@dataclass
class StepInputs:
    """Per-row inputs of a decode step (device buffers; a captured graph reads them in place)."""

    token_ids: torch.Tensor  # [B] int64: the token each row feeds this step
    positions: torch.Tensor  # [B] int64: its rotary position (= tokens the row held before it)
    slot_mapping: torch.Tensor  # [B] int64: cache slot its K/V is written to
    block_tables: torch.Tensor  # [B, W] int32: the row's blocks, padded
    context_lens: torch.Tensor  # [B] int32: tokens attended, the new one included (= positions + 1)

    @property
    def batch(self) -> int:
        return self.token_ids.shape[0]


class PagedDecoder:
    """Owns the weights, the paged KV cache (all layers) and the rotary tables; `decode` runs one step."""

    def __init__(self, config: PagedModelConfig, weights: PagedWeights, num_blocks: int, block_tokens: int = 16,
                 *, use_triton: bool | None = None, attention_launch: dict | None = None,
                 varlen_launch: dict | None = None,
                 kv_layout: str = "token_major") -> None:
        self.config, self.weights = config, weights
        self.num_blocks, self.block_tokens = num_blocks, block_tokens
        self.use_triton = use_triton
        self.attention_launch = attention_launch or {}
        self.varlen_launch = varlen_launch or {}  # the mixed step's attention (varlen_attention's launch)
        # weight shape (N, K) -> skinny_gemm launch (a bench's sweep); shapes not in it use
        # skinny_gemm.default_launch (which may say torch) in steps of up to skinny_gemm_rows rows, torch
        # beyond (or use_triton False)
        self.gemm_launch: dict[tuple[int, int], dict] = {}
        self.skinny_gemm_rows = DEFAULT_SKINNY_ROWS
        device, dtype = weights.embed.device, weights.embed.dtype
        self.device, self.dtype = device, dtype
        # num_blocks + 1: the last block is the padding rows' scratch. Every cache is indexed
        # [block, token, kv_head, dim]; kv_layout says how it lies in memory: "token_major" as indexed
        # (a token's heads together), "head_major" [block, kv_head, token, dim] (a block's tokens of
        # one head together: one contiguous block_tokens * head_dim run per (block, head) read).
        if kv_layout not in ("token_major", "head_major"):
            raise ValueError(f"kv_layout must be token_major or head_major, got {kv_layout!r}")
        self.kv_layout = kv_layout
        self.k_caches = [self._new_cache() for _ in range(config.num_layers)]
        self.v_caches = [self._new_cache() for _ in range(config.num_layers)]
        dim = config.head_dim
        inv_freq = 1.0 / config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float64, device=device) / dim)
        angles = torch.arange(config.max_positions, dtype=torch.float64, device=device)[:, None] * inv_freq[None]
        angles = torch.cat((angles, angles), dim=-1)
        self.cos, self.sin = angles.cos().float().contiguous(), angles.sin().float().contiguous()
        self.scale = dim**-0.5

    def _new_cache(self) -> torch.Tensor:
        blocks, kv_heads, dim = self.num_blocks + 1, self.config.num_kv_heads, self.config.head_dim
        if self.kv_layout == "token_major":
            return torch.zeros(blocks, self.block_tokens, kv_heads, dim, device=self.device, dtype=self.dtype)
        cache = torch.zeros(blocks, kv_heads, self.block_tokens, dim, device=self.device, dtype=self.dtype)
        return cache.transpose(1, 2)

    @property
    def scratch_slot(self) -> int:
        return self.num_blocks * self.block_tokens

    def empty_inputs(self, batch: int, table_width: int) -> StepInputs:
        """Inputs whose every row is padding (scratch slot, one attended token)."""
        long = dict(dtype=torch.int64, device=self.device)
        return StepInputs(
            token_ids=torch.zeros(batch, **long), positions=torch.zeros(batch, **long),
            slot_mapping=torch.full((batch,), self.scratch_slot, **long),
            block_tables=torch.full((batch, table_width), self.num_blocks, dtype=torch.int32, device=self.device),
            context_lens=torch.ones(batch, dtype=torch.int32, device=self.device),
        )

    def fill(self, inputs: StepInputs, token_ids, positions, slot_mapping, block_tables, *, pin: bool = False) -> None:
        """Write live rows 0..n-1 into `inputs` in place and reset the rest to padding.
        token_ids, positions, slot_mapping: n ints each (sequences or arrays); block_tables [n, <= W]
        (a tensor or array, on the host or the device); context_lens follow from positions. pin: as
        `upload`'s."""
        live = len(token_ids)
        if live > inputs.batch:
            raise ValueError(f"{live} rows do not fit a bucket of {inputs.batch}")
        rows = np.stack([np.asarray(v, dtype=np.int64) for v in (token_ids, positions, slot_mapping)])
        tables = torch.as_tensor(block_tables)
        width = tables.shape[1] if tables.dim() == 2 else 0
        host = torch.from_numpy(rows.reshape(-1))
        if tables.device.type == "cpu":  # the tables travel in the same buffer
            host = torch.cat((host, tables.reshape(-1).to(torch.int64)))
        staged = upload(host, self.device, pin)  # one buffer, one copy
        if tables.device.type == "cpu":
            tables = staged[3 * live:].view(live, width)
        inputs.token_ids.zero_()[:live].copy_(staged[:live])
        inputs.positions.zero_()[:live].copy_(staged[live:2 * live])
        inputs.slot_mapping.fill_(self.scratch_slot)[:live].copy_(staged[2 * live:3 * live])
        inputs.block_tables.fill_(self.num_blocks)[:live, :width].copy_(tables)
        inputs.context_lens.fill_(1)[:live].copy_(inputs.positions[:live] + 1)

    def decode(self, inputs: StepInputs) -> torch.Tensor:
        """One step for every row of `inputs`; returns logits [B, vocab] in the model's dtype.
        No host sync unless use_triton is False (the reference attention): capturable."""
        config, weights, use_triton, rows = self.config, self.weights, self.use_triton, inputs.batch
        eps = config.rms_norm_eps
        hidden = F.embedding(inputs.token_ids, weights.embed)
        normed = rms_norm(hidden, weights.layers[0].input_norm, eps, use_triton=use_triton)
        next_norms = [layer.input_norm for layer in weights.layers[1:]] + [weights.final_norm]
        for layer, next_norm, k_cache, v_cache in zip(weights.layers, next_norms, self.k_caches, self.v_caches,
                                                      strict=True):
            qkv = linear(normed, layer.qkv, layer.qkv_bias, launch=self._gemm(layer.qkv, rows))
            q = rope_and_write_kv(qkv, self.cos, self.sin, inputs.positions, inputs.slot_mapping, k_cache, v_cache,
                                  config.num_heads, use_triton=use_triton)
            if use_triton is False:
                attended = paged_decode_attention_reference(q, k_cache, v_cache, inputs.block_tables,
                                                            inputs.context_lens, self.scale)
            else:
                attended = paged_decode_attention(q, k_cache, v_cache, inputs.block_tables, inputs.context_lens,
                                                  self.scale, **self.attention_launch)
            hidden, normed = linear_and_norm(attended.view(rows, -1), layer.out, layer.post_norm, eps,
                                             residual=hidden, launch=self._gemm(layer.out, rows),
                                             use_triton=use_triton)
            gate_up = linear(normed, layer.gate_up, launch=self._gemm(layer.gate_up, rows))
            activated = silu_mul(gate_up, use_triton=use_triton)
            hidden, normed = linear_and_norm(activated, layer.down, next_norm, eps, residual=hidden,
                                             launch=self._gemm(layer.down, rows), use_triton=use_triton)
        return linear(normed, weights.lm_head, launch=self._gemm(weights.lm_head, rows))

    def _gemm(self, weight: torch.Tensor, rows: int) -> dict | None:
        """The skinny kernel's launch for this product, or None for torch's (`linear` also runs torch's
        where Triton does not run)."""
        if self.use_triton is False:
            return None
        shape = tuple(weight.shape)
        if shape in self.gemm_launch:
            return self.gemm_launch[shape]
        return default_launch(shape, rows) if rows <= self.skinny_gemm_rows else None


Outputs = TypeVar("Outputs")


def capture_step(run: Callable[[], Outputs], pool=None) -> tuple[torch.cuda.CUDAGraph, Outputs]:
    """`run` captured as a CUDA graph (in the graph pool `pool`), and the tensors it returned, which
    each replay rewrites. It runs twice first on a side stream: that compiles the Triton kernels and
    warms cuBLAS outside the capture."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            run()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        outputs = run()
    return graph, outputs


class GraphedDecode:
    """A decode step captured as a CUDA graph for one batch-size bucket and table width.

    Write the step's rows with `decoder.fill(graphed.inputs, ...)`, call `replay()`, read
    `next_tokens` (greedy) or `logits`."""

    def __init__(self, decoder: PagedDecoder, batch: int, table_width: int, pool=None) -> None:
        self.inputs = decoder.empty_inputs(batch, table_width)

        def step() -> tuple[torch.Tensor, torch.Tensor]:
            logits = decoder.decode(self.inputs)
            return logits, logits.argmax(dim=-1)

        self.graph, (self.logits, self.next_tokens) = capture_step(step, pool)

    def replay(self) -> None:
        self.graph.replay()
