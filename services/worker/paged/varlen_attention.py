"""Varlen paged attention: every token of a mixed step over its own request's paged prefix, in one launch.

A step's tokens are flat [T]; chunk s holds tokens query_starts[s]..query_starts[s + 1] - 1, the last
q_len of its request's context_lens[s] tokens, whose K/V (the step's own included) already lie in the
blocks block_tables[s]. Query i of a chunk sees positions 0..context - q_len + i (causal); a decode
row is a chunk of one token.

The Triton kernel follows vLLM v1's unified attention in outline, written here for this cache: one
program per (query tile, KV head). A chunk's queries are cut into tiles of BLOCK_Q tokens and tile t
of chunk s is program query_starts[s] // BLOCK_Q + s + t, so T // BLOCK_Q + S programs cover any
chunk lengths: the grid depends only on (T, S), and a CUDA graph captured for them replays with any
split of its tokens into chunks. A program finds its chunk by binary search over query_starts; tiles
past a chunk's queries return at once. The rows of a tile are its tokens x the query heads sharing the
KV head (BLOCK_Q x GROUP <= BLOCK_M), so each K/V load serves them all on the tensor cores. Keys are
read in place through the block table, BLOCK_N at a time up to the tile's last query's position (no
gather, no padding, no mask tensor), with the online softmax in float32.

It replaces one SDPA call over the step's prefill chunks padded to the longest chunk and prefix, fed
by a gather of their K/V and a mask built per step (reports/gpu/serving_e2e_ab: mixed steps were ~70 %
of a burst's step time and about a third of their host time launched those kernels).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from services.worker.paged.attention import is_available

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None

# Launch defaults, measured for the Llama-2-7B shape on an H200 in mixed steps of the 8-task mix
# (reports/gpu/mixed_step, run 1: 16 x 32 took 4.4 ms a 721-token step over all layers, 64 x 64 7.1 ms):
# a decode row fills one query row of its tile, so small tiles waste less. Grouped-query models fill
# a tile's rows with a token's query heads; 64 rows there (9 tokens of Qwen2-7B's groups of 7) is untimed.
DEFAULT_BLOCK_M_MHA = 16  # query rows (tokens x grouped heads) a program holds, multi-head models
DEFAULT_BLOCK_M_GQA = 64  # the same, grouped-query models
DEFAULT_BLOCK_N = 32  # keys a loop iteration reads


def varlen_paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                           context_lens: torch.Tensor, query_starts: torch.Tensor, scale: float, *,
                           use_triton: bool | None = None, **launch) -> torch.Tensor:
    """q [T, H, D] over k_cache / v_cache [blocks, block_tokens, Hkv, D] as the module docstring says;
    block_tables [S, W], context_lens [S], query_starts [S + 1] (any integer dtype, on q's device).
    Tokens past query_starts[S] are padding: their rows of the result are zero. use_triton: None runs
    the kernel where Triton runs, False the torch reference (which syncs with the host)."""
    if use_triton is not False and is_available(q.device):
        return varlen_paged_attention_triton(q, k_cache, v_cache, block_tables, context_lens, query_starts, scale,
                                             **launch)
    return varlen_paged_attention_reference(q, k_cache, v_cache, block_tables, context_lens, query_starts, scale)


def paged_prefill_attention_reference(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                                      block_table: torch.Tensor, context_tokens: int, scale: float) -> torch.Tensor:
    """q [n, H, D]: the last n of a request's `context_tokens` tokens, whose K/V (with the prefix's)
    is in the blocks `block_table` [>= blocks needed]. Query i attends positions 0..context_tokens - n + i."""
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


def varlen_paged_attention_reference(q, k_cache, v_cache, block_tables, context_lens, query_starts,
                                     scale) -> torch.Tensor:
    """Each chunk attended alone by SDPA over its gathered prefix (one chunk at a time)."""
    out = torch.zeros_like(q)
    starts, lens = query_starts.tolist(), context_lens.tolist()
    for chunk, context in enumerate(lens):
        first, end = starts[chunk], starts[chunk + 1]
        if end > first:
            out[first:end] = paged_prefill_attention_reference(q[first:end], k_cache, v_cache, block_tables[chunk],
                                                               context, scale)
    return out


def num_query_tiles(num_tokens: int, num_chunks: int, heads: int, kv_heads: int,
                    block_m: int | None = None) -> tuple[int, int]:
    """(tokens a tile, programs along the token axis) for a step of `num_tokens` in `num_chunks` chunks."""
    group = heads // kv_heads
    block_q = max(1, _block_m(block_m, group) // group)
    return block_q, num_tokens // block_q + num_chunks


def _block_m(block_m: int | None, group: int) -> int:
    if block_m is None:
        block_m = DEFAULT_BLOCK_M_MHA if group == 1 else DEFAULT_BLOCK_M_GQA
    return max(block_m, 16, 1 << (group - 1).bit_length())  # tl.dot wants >= 16 rows; a group fits a tile


def varlen_paged_attention_triton(q, k_cache, v_cache, block_tables, context_lens, query_starts, scale, *,
                                  block_m: int | None = None, block_n: int = DEFAULT_BLOCK_N, num_warps: int = 4,
                                  num_stages: int = 2) -> torch.Tensor:
    """The kernel (module docstring). Graph-capturable: no host sync, the launch depends only on shapes."""
    num_tokens, heads, head_dim = q.shape
    block_tokens, kv_heads = k_cache.shape[1], k_cache.shape[2]
    if heads % kv_heads or head_dim & (head_dim - 1) or block_tokens & (block_tokens - 1):
        raise ValueError(f"need heads % kv_heads == 0 and power-of-two head_dim and block_tokens, got "
                         f"{heads}, {kv_heads}, {head_dim}, {block_tokens}")
    if q.stride(-1) != 1 or k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("varlen_paged_attention needs the head dimension contiguous")
    num_chunks = context_lens.shape[0]
    group = heads // kv_heads
    block_m = _block_m(block_m, group)
    block_q, tiles = num_query_tiles(num_tokens, num_chunks, heads, kv_heads, block_m)
    out = torch.zeros_like(q)
    if num_tokens == 0 or num_chunks == 0:
        return out
    _varlen_paged_kernel[(tiles, kv_heads)](
        q, k_cache, v_cache, block_tables, context_lens, query_starts, out, num_chunks,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), block_tables.stride(0),
        out.stride(0), out.stride(1), scale,
        GROUP=group, BLOCK_Q=block_q, BLOCK_M=block_m, BLOCK_N=block_n, HEAD_DIM=head_dim,
        BLOCK_TOKENS=block_tokens, num_warps=num_warps, num_stages=num_stages,
    )
    return out


if triton is not None:

    @triton.jit
    def _chunk_of_tile(starts_ptr, num_chunks, tile, BLOCK_Q: tl.constexpr):
        """The last chunk s whose first tile, starts[s] // BLOCK_Q + s, is at most `tile`."""
        low = 0
        high = num_chunks
        while low < high:
            middle = (low + high) // 2
            if tl.load(starts_ptr + middle) // BLOCK_Q + middle <= tile:
                low = middle + 1
            else:
                high = middle
        return low - 1

    # num_chunks varies from step to step: specializing on it (== 1, % 16) would compile new variants mid-serving
    @triton.jit(do_not_specialize=["num_chunks"])
    def _varlen_paged_kernel(
        q_ptr, k_ptr, v_ptr, tables_ptr, lens_ptr, starts_ptr, out_ptr, num_chunks,
        q_stride_t, q_stride_h, k_stride_block, k_stride_tok, k_stride_h, v_stride_block, v_stride_tok, v_stride_h,
        table_stride, out_stride_t, out_stride_h, scale,
        GROUP: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        HEAD_DIM: tl.constexpr, BLOCK_TOKENS: tl.constexpr,
    ):
        tile, kv_head = tl.program_id(0), tl.program_id(1)
        chunk = _chunk_of_tile(starts_ptr, num_chunks, tile, BLOCK_Q)
        first_token = tl.load(starts_ptr + chunk).to(tl.int64)
        num_queries = tl.load(starts_ptr + chunk + 1).to(tl.int64) - first_token
        first_query = (tile - (first_token // BLOCK_Q + chunk)) * BLOCK_Q  # this tile's first, within the chunk
        if first_query >= num_queries:
            return
        context = tl.load(lens_ptr + chunk).to(tl.int64)
        prefix = context - num_queries
        rows = tl.arange(0, BLOCK_M)
        query = first_query + rows // GROUP
        heads = kv_head * GROUP + rows % GROUP
        is_row = (rows < BLOCK_Q * GROUP) & (query < num_queries)
        dims = tl.arange(0, HEAD_DIM)
        token = first_token + query
        q = tl.load(q_ptr + token[:, None] * q_stride_t + heads[:, None] * q_stride_h + dims[None, :],
                    mask=is_row[:, None], other=0.0)
        position = prefix + query  # each row's token's position: it sees keys 0..position
        end = tl.minimum(context, prefix + first_query + BLOCK_Q)  # keys the tile's last query sees
        running_max = tl.full([BLOCK_M], float("-inf"), tl.float32)
        running_sum = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
        table_row = tables_ptr + chunk * table_stride
        for key_start in tl.range(0, end, BLOCK_N):
            keys = key_start + tl.arange(0, BLOCK_N)
            is_key = keys < end
            block = tl.load(table_row + keys // BLOCK_TOKENS, mask=is_key, other=0).to(tl.int64)
            offset = keys % BLOCK_TOKENS
            k = tl.load(k_ptr + block[:, None] * k_stride_block + offset[:, None] * k_stride_tok
                        + kv_head * k_stride_h + dims[None, :], mask=is_key[:, None], other=0.0)
            v = tl.load(v_ptr + block[:, None] * v_stride_block + offset[:, None] * v_stride_tok
                        + kv_head * v_stride_h + dims[None, :], mask=is_key[:, None], other=0.0)
            scores = tl.dot(q, tl.trans(k)) * scale
            scores = tl.where(is_key[None, :] & (keys[None, :] <= position[:, None]), scores, float("-inf"))
            new_max = tl.maximum(running_max, tl.max(scores, axis=1))
            # a padding row (or a row whose keys all lie ahead) has seen nothing yet: keep it at zero
            safe_max = tl.where(new_max == float("-inf"), 0.0, new_max)
            weights = tl.exp(scores - safe_max[:, None])
            rescale = tl.exp(running_max - safe_max)
            running_sum = running_sum * rescale + tl.sum(weights, axis=1)
            acc = acc * rescale[:, None] + tl.dot(weights.to(v.dtype), v)
            running_max = new_max
        out = acc / tl.where(running_sum > 0, running_sum, 1.0)[:, None]
        tl.store(out_ptr + token[:, None] * out_stride_t + heads[:, None] * out_stride_h + dims[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=is_row[:, None])
