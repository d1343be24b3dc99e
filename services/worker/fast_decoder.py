"""A static-KV-cache decoder for Llama-family models, built to replay decode steps as CUDA graphs.

Plain `generate` spends most of a decode step in host overhead (../shared/reference/
gpu_baseline.md: 7x-22x over the memory-bandwidth limit). Here the KV cache is one preallocated
pool, every row of a left-padded batch writes its new token at the same cache position (a
continuous batch's rows each at their own: `DecodeState.is_ragged`), and one
decode step is a fixed sequence of kernels over fixed addresses: it can be captured once per
(batch size, attention length bucket) and replayed. On the CPU the same step runs eagerly, which is
how CI tests it.

Supported: model types whose layers are pre-norm RMSNorm -> attention (q/k/v with optional bias,
rotary embeddings, grouped-query heads) -> RMSNorm -> SwiGLU MLP (llama, qwen2, mistral without a
sliding window). Anything else uses the plain `generate` backend.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from services.worker import triton_attention

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "mistral")
SHORT_ATTENTION_MAX_TOKENS = 96  # attention="auto": the Triton kernel up to here, SDPA beyond (H100)
NEG_INF = float("-inf")
# Prefill attention without cuDNN's: it builds a plan for every new (rows, prompt length), 60-70 ms on
# an H100 against 10-12 ms for the prefill itself, and continuous batching prefills ever new shapes
# (reports/gpu/continuous_steps/run2_prefill.log); without it a new shape's prefill took 15-25 ms
PREFILL_SDPA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def is_supported(config) -> bool:
    """Whether `config` describes a model this decoder runs exactly (else use plain generate)."""
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES or getattr(config, "hidden_act", "silu") != "silu":
        return False
    if model_type == "qwen2":  # Qwen2 configs carry a window size but only use it when told to
        return not getattr(config, "use_sliding_window", False)
    return not getattr(config, "sliding_window", None)


@dataclass
class LayerWeights:
    input_norm: torch.Tensor
    qkv: torch.Tensor  # [(heads + 2 kv_heads) * head_dim, hidden], q, k, v stacked
    qkv_bias: torch.Tensor | None
    out: torch.Tensor
    post_norm: torch.Tensor
    gate_up: torch.Tensor  # [2 * intermediate, hidden], gate then up
    down: torch.Tensor


class LlamaFamilyDecoder:
    """Forward passes over a transformers Llama-family model's weights with an external KV cache.

    The q/k/v and gate/up projections are fused into one matrix each (one GEMM instead of three or
    two per layer); the model's own parameters are re-pointed at slices of the fused tensors so no
    weight is stored twice.
    """

    def __init__(self, model) -> None:
        config = model.config
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = getattr(config, "num_key_value_heads", None) or self.num_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.num_heads
        self.num_layers = config.num_hidden_layers
        self.eps = config.rms_norm_eps
        self.scale = 1.0 / math.sqrt(self.head_dim)
        inner = model.model
        self.embed = inner.embed_tokens.weight
        self.final_norm = inner.norm.weight
        self.lm_head = model.lm_head.weight
        self.layers = [self._fuse(layer) for layer in inner.layers]
        self.dtype = self.embed.dtype
        self.device = self.embed.device
        positions = torch.arange(config.max_position_embeddings, device=self.device)[None, :]
        probe = torch.zeros(1, dtype=torch.float32, device=self.device)
        cos, sin = inner.rotary_emb(probe, positions)  # the model's own rope (scaling types included)
        half = self.head_dim // 2
        # rotate_half(x) * sin == roll(x, half) * [-sin_1, sin_2]: one roll instead of slices and a cat
        sin_signed = torch.cat([-sin[0, :, :half], sin[0, :, half:]], dim=-1)
        self.cos_table, self.sin_table = cos[0].to(self.dtype), sin_signed.to(self.dtype)
        self.pre_attention, self.post_attention = self._pre_attention, self._post_attention
        self._flex = None  # compiled on first use of attention="flex"
        self.bmm_attention = self._bmm_attention
        # attention="auto": the short-length kernel up to this many attended tokens, SDPA beyond. The
        # Triton kernel was timed for multi-head attention only (engine.md); grouped-query models keep SDPA.
        is_mha = self.num_kv_heads == self.num_heads
        self.short_attention = "triton" if triton_attention.is_available(self.device) and is_mha else "sdpa"
        self.short_attention_max_tokens = SHORT_ATTENTION_MAX_TOKENS
        self.rope = rope_cat  # measured faster than rope_roll's roll once compiled (H100, engine.md)

    @staticmethod
    def _fuse(layer) -> LayerWeights:
        attention, mlp = layer.self_attn, layer.mlp
        projections = [attention.q_proj, attention.k_proj, attention.v_proj]
        qkv = torch.cat([p.weight.data for p in projections], dim=0)
        biases = [p.bias for p in projections]
        qkv_bias = torch.cat([b.data for b in biases]) if all(b is not None for b in biases) else None
        view_rows_of(projections, qkv, qkv_bias)
        gate_up = torch.cat([mlp.gate_proj.weight.data, mlp.up_proj.weight.data], dim=0)
        view_rows_of([mlp.gate_proj, mlp.up_proj], gate_up, None)
        return LayerWeights(
            input_norm=layer.input_layernorm.weight,
            qkv=qkv,
            qkv_bias=qkv_bias,
            out=attention.o_proj.weight,
            post_norm=layer.post_attention_layernorm.weight,
            gate_up=gate_up,
            down=mlp.down_proj.weight,
        )

    # ---- pieces ---------------------------------------------------------------------------
    def _norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), weight, self.eps)

    def _qkv(self, x: torch.Tensor, qkv: torch.Tensor, qkv_bias, cos: torch.Tensor, sin_signed: torch.Tensor):
        """q [B, H, T, D], k and v [B, Hkv, T, D], rope applied to q and k (in one pass over both)."""
        batch, tokens, _ = x.shape
        fused = F.linear(x, qkv, qkv_bias)
        qk_size = (self.num_heads + self.num_kv_heads) * self.head_dim
        qk = fused[..., :qk_size].view(batch, tokens, self.num_heads + self.num_kv_heads, self.head_dim)
        qk = self.rope(qk, cos[:, :, None], sin_signed[:, :, None])
        q = qk[:, :, : self.num_heads].transpose(1, 2)
        k = qk[:, :, self.num_heads :].transpose(1, 2)
        v = fused[..., qk_size:].view(batch, tokens, self.num_kv_heads, self.head_dim).transpose(1, 2)
        return q, k, v

    def _logits(self, hidden_last: torch.Tensor) -> torch.Tensor:
        return F.linear(self._norm(hidden_last, self.final_norm), self.lm_head)

    # ---- prefill ---------------------------------------------------------------------------
    def prefill(
        self,
        tokens: torch.Tensor,
        pad_tokens: torch.Tensor,
        k_views: list[torch.Tensor],
        v_views: list[torch.Tensor],
        *,
        rows: torch.Tensor | None = None,
        return_logits: bool = False,
    ) -> torch.Tensor:
        """Run left-padded prompts [B, P]; write their K/V to cache positions [0, P). Returns next ids [B].

        pad_tokens[i] = leading pad positions of row i; rope positions start at 0 after them.
        rows: write prompt i's K/V to cache row rows[i] of the views (rows need not be contiguous:
        continuous batching prefills the joiners of whatever rows freed); None = rows 0..B-1.
        return_logits: return the last position's logits [B, vocab] instead (numerical checks).
        """
        batch, prompt_tokens = tokens.shape
        index = torch.arange(prompt_tokens, device=tokens.device)
        positions = (index[None, :] - pad_tokens[:, None]).clamp(min=0)
        cos, sin = self.cos_table[positions], self.sin_table[positions]
        is_valid_key = index[None, :] >= pad_tokens[:, None]  # [B, P]
        is_causal = index[None, :] <= index[:, None]  # [P, P]
        allowed = is_causal[None, :, :] & is_valid_key[:, None, :]
        # a padded query row sees nothing; let it see itself so softmax stays finite (its output is unused)
        allowed |= torch.eye(prompt_tokens, dtype=torch.bool, device=tokens.device)[None]
        mask = torch.zeros(allowed.shape, dtype=self.dtype, device=tokens.device).masked_fill_(~allowed, NEG_INF)
        mask = mask[:, None]  # [B, 1, P, P]
        hidden = F.embedding(tokens, self.embed)
        # the eager layer pieces: compiling them for every prompt shape would cost more than it saves
        for layer, k_cache, v_cache in zip(self.layers, k_views, v_views, strict=True):
            q, k, v = self._pre_attention(hidden, layer.input_norm, layer.qkv, layer.qkv_bias, cos, sin)
            if rows is None:
                k_cache[:, :, :prompt_tokens].copy_(k)
                v_cache[:, :, :prompt_tokens].copy_(v)
            else:  # an in-place scatter into the pool
                k_cache[rows, :, :prompt_tokens] = k
                v_cache[rows, :, :prompt_tokens] = v
            with sdpa_kernel(PREFILL_SDPA_BACKENDS):
                attended = F.scaled_dot_product_attention(
                    q, k, v, attn_mask=mask, scale=self.scale, enable_gqa=self.num_kv_heads != self.num_heads
                )
            attended = attended.transpose(1, 2).reshape(batch, prompt_tokens, -1)
            hidden = self._post_attention(hidden, attended, layer.out, layer.post_norm, layer.gate_up, layer.down)
        logits = self._logits(hidden[:, -1])
        return logits if return_logits else logits.argmax(dim=-1)

    # ---- one decode step -------------------------------------------------------------------
    def decode_step(self, state: DecodeState, attend_tokens: int, attention: str = "sdpa") -> None:
        """Advance every row by one token, in place on `state` (no host sync: graph-capturable).

        Reads state.tokens at rope positions state.positions, writes K/V at cache position
        state.write_index (one for all rows, or each row its own when state.is_ragged), attends
        over cache positions [0, attend_tokens), writes the greedy next token back into
        state.tokens and advances positions and write_index.
        """
        batch = state.tokens.shape[0]
        kv_index = None  # static batches keep index_copy_ (measured on an H200); ragged rows scatter
        if state.is_ragged:
            state.mask.view(batch, -1).scatter_(1, state.write_index[:, None], 0.0)
            kv_index = state.write_index.view(batch, 1, 1, 1).expand(batch, self.num_kv_heads, 1, self.head_dim)
        else:
            state.mask.index_fill_(-1, state.write_index, 0.0)  # the new position becomes visible
        mask = state.mask[..., :attend_tokens]
        cos = self.cos_table.index_select(0, state.positions)[:, None]  # [B, 1, D]
        sin = self.sin_table.index_select(0, state.positions)[:, None]
        hidden = F.embedding(state.tokens[:, None], self.embed)  # [B, 1, hidden]
        for layer, k_cache, v_cache in zip(self.layers, state.k_views, state.v_views, strict=True):
            q, k, v = self.pre_attention(hidden, layer.input_norm, layer.qkv, layer.qkv_bias, cos, sin)
            if kv_index is None:
                k_cache.index_copy_(2, state.write_index, k)
                v_cache.index_copy_(2, state.write_index, v)
            else:
                k_cache.scatter_(2, kv_index, k)
                v_cache.scatter_(2, kv_index, v)
            keys, values = k_cache[:, :, :attend_tokens], v_cache[:, :, :attend_tokens]
            attended = self.decode_attention(q, keys, values, mask, attention).reshape(batch, 1, -1)
            hidden = self.post_attention(hidden, attended, layer.out, layer.post_norm, layer.gate_up, layer.down)
        state.tokens.copy_(self._logits(hidden[:, 0]).argmax(dim=-1))
        state.positions.add_(1)
        state.write_index.add_(1)

    # The two per-layer pieces around attention take weights as arguments so that one compiled
    # version (torch.compile fuses their elementwise work) serves all layers.
    def _pre_attention(self, hidden, norm, qkv, qkv_bias, cos, sin):
        return self._qkv(self._norm(hidden, norm), qkv, qkv_bias, cos, sin)

    def _post_attention(self, hidden, attended, out, post_norm, gate_up, down):
        hidden = hidden + F.linear(attended, out)
        normed = self._norm(hidden, post_norm)
        gate, up = F.linear(normed, gate_up).chunk(2, dim=-1)
        return hidden + F.linear(F.silu(gate) * up, down)

    def compile_layer_pieces(self, mode: str | None = None, dynamic: bool | None = None) -> None:
        """Fuse the per-layer elementwise work with torch.compile (GPU only; compiles on first use).

        mode "max-autotune-no-cudagraphs" also autotunes the GEMMs (slow to compile, per batch size).
        """
        dynamic = (mode is None) if dynamic is None else dynamic
        if not dynamic:  # one compiled version per shape: allow one per batch bucket
            torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 512)
        self.pre_attention = torch.compile(self._pre_attention, dynamic=dynamic, mode=mode)
        self.post_attention = torch.compile(self._post_attention, dynamic=dynamic, mode=mode)
        self.bmm_attention = torch.compile(self._bmm_attention, dynamic=dynamic, mode=mode)

    def decode_attention(self, q, keys, values, mask, attention: str) -> torch.Tensor:
        """q [B, H, 1, D] over keys/values [B, Hkv, L, D] with additive mask [B, 1, 1, L] -> [B, H, D]."""
        enable_gqa = self.num_kv_heads != self.num_heads
        if attention == "sdpa":
            out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=self.scale, enable_gqa=enable_gqa)
            return out[:, :, 0]
        if attention == "cudnn":  # cuDNN's fused attention with the additive mask as a bias
            from torch.nn.attention import SDPBackend, sdpa_kernel

            with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                out = F.scaled_dot_product_attention(
                    q, keys, values, attn_mask=mask, scale=self.scale, enable_gqa=enable_gqa
                )
            return out[:, :, 0]
        if attention == "flex":  # FlexAttention's split-KV decoding kernel (compiled per attention length)
            if self._flex is None:
                self._flex = torch.compile(_flex_decode, dynamic=False)
            return self._flex(q, keys, values, mask, self.scale, enable_gqa)[:, :, 0]
        if attention == "auto":  # per attention length (fixed per captured graph): the measured faster kernel
            is_short = keys.shape[2] <= self.short_attention_max_tokens
            return self.decode_attention(q, keys, values, mask, self.short_attention if is_short else "sdpa")
        if attention == "triton":
            return triton_attention.decode_attention(q, keys, values, mask, self.scale)
        return self.bmm_attention(q, keys, values, mask)

    def _bmm_attention(self, q, keys, values, mask) -> torch.Tensor:
        """Two batched matmuls around a softmax; the query heads of each KV head grouped so K and V are
        read once per KV head. Compiled, the scale, mask and softmax fuse into one kernel."""
        batch, group = q.shape[0], self.num_heads // self.num_kv_heads
        grouped = q.view(batch, self.num_kv_heads, group, self.head_dim)
        scores = torch.matmul(grouped, keys.transpose(-1, -2)).float() * self.scale + mask.float()
        weights = torch.softmax(scores, dim=-1).to(values.dtype)
        return torch.matmul(weights, values).view(batch, self.num_heads, self.head_dim)


@dataclass
class DecodeState:
    """Device buffers one decode step reads and updates; fixed addresses for graph replay."""

    tokens: torch.Tensor  # [B] long: the last token of every row
    positions: torch.Tensor  # [B] long: rope position of that token
    write_index: torch.Tensor  # [1] long: cache position the step writes ([B] when is_ragged)
    mask: torch.Tensor  # [B, 1, 1, row_capacity] additive: 0 visible, -inf hidden
    k_views: list[torch.Tensor]  # per layer [B, Hkv, row_capacity, D]
    v_views: list[torch.Tensor]
    # rows at different lengths (continuous batching): each writes at its own write_index[row]
    is_ragged: bool = False


def _flex_decode(q, keys, values, mask, scale: float, enable_gqa: bool) -> torch.Tensor:
    """flex_attention with the additive padding mask [B, 1, 1, L] as a score modification."""
    from torch.nn.attention.flex_attention import flex_attention

    def add_mask(score, b, h, q_idx, kv_idx):
        return score + mask[b, 0, 0, kv_idx]

    return flex_attention(q, keys, values, score_mod=add_mask, scale=scale, enable_gqa=enable_gqa)


def rope_roll(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
    """HF's rotate-half rotary embedding; sin_signed = [-sin, sin] over the two halves."""
    return torch.addcmul(x * cos, torch.roll(x, x.shape[-1] // 2, dims=-1), sin_signed)


def rope_cat(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
    """rope_roll with the half-rotation written as a cat of the two halves instead of a roll."""
    half = x.shape[-1] // 2
    return torch.addcmul(x * cos, torch.cat((x[..., half:], x[..., :half]), dim=-1), sin_signed)


def view_rows_of(modules, fused: torch.Tensor, fused_bias: torch.Tensor | None) -> None:
    """Make each module's weight (and bias) a view of its rows in `fused`, freeing the original."""
    start = 0
    for module in modules:
        rows = module.weight.shape[0]
        module.weight = torch.nn.Parameter(fused[start : start + rows], requires_grad=False)
        if fused_bias is not None:
            module.bias = torch.nn.Parameter(fused_bias[start : start + rows], requires_grad=False)
        start += rows
