"""Ragged paged decode attention: one query token per row over that row's own KV blocks.

Cache layout [num_blocks, block_tokens, kv_heads, head_dim] (vLLM v1's): a step's new K/V for a row
is one contiguous [kv_heads, head_dim] write at its slot (slot = block * block_tokens + offset,
so the cache viewed as [num_slots, kv_heads, head_dim] takes an index_copy_), and the kernel reads
each token's head as one contiguous head_dim run (256 B in bf16: full-width coalesced loads). The
alternative [num_blocks, kv_heads, block_tokens, head_dim] makes each (block, head) read one 4 KiB
run instead, at the price of a strided write; a decode step reads each cached token once, so both
move the same bytes and the simpler write wins.

`paged_decode_attention` runs the Triton kernel on a CUDA device (or under TRITON_INTERPRET=1) and
the pure-torch reference otherwise. The kernel runs one program per (row, KV head, split): all
query heads of the KV head's group share each K/V load (the products on the tensor cores, the
group padded to 16 query rows, even for multi-head models), the online softmax runs in float32 over
chunks of BLOCK_L tokens gathered through the block table, and a row's program stops at its own
context length, so padding blocks are never read. When rows x KV heads are too few to fill the GPU
(grouped-query models at small batches) the tokens are split across programs and a second kernel
merges the partial softmaxes. The split count depends only on shapes (rows, table width), never on
the lengths, so a captured CUDA graph replays with any lengths.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

try:  # CPU-only installs have no Triton: the reference runs there
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None

IS_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
TARGET_PROGRAMS_PER_SM = 2  # split the tokens until rows x KV heads x splits fills this many
MIN_SPLIT_TOKENS = 64  # never split a row's tokens finer than this: the merge would cost more


def is_available(device: torch.device) -> bool:
    return triton is not None and (device.type == "cuda" or IS_INTERPRETED)


def paged_decode_attention(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
    context_lens: torch.Tensor, scale: float, **launch,
) -> torch.Tensor:
    """q [B, H, D] (the new token of each row) over the first context_lens[b] tokens of row b,
    stored in blocks block_tables[b, :] of k_cache / v_cache [num_blocks, block_tokens, Hkv, D].
    Returns [B, H, D] in q's dtype. context_lens must be >= 1 (the new token is already written).
    launch: the Triton launch shape (see `paged_decode_attention_triton`), ignored by the reference."""
    if is_available(q.device):
        return paged_decode_attention_triton(q, k_cache, v_cache, block_tables, context_lens, scale, **launch)
    return paged_decode_attention_reference(q, k_cache, v_cache, block_tables, context_lens, scale)


def paged_decode_attention_reference(q, k_cache, v_cache, block_tables, context_lens, scale) -> torch.Tensor:
    """Gather each row's blocks and attend in float32 or finer (one row at a time; syncs with the host)."""
    batch, heads, head_dim = q.shape
    block_tokens, kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = heads // kv_heads
    compute_dtype = torch.promote_types(q.dtype, torch.float32)
    out = torch.empty_like(q)
    for row, length in enumerate(context_lens.tolist()):
        blocks = block_tables[row, : -(-length // block_tokens)].long()
        keys = k_cache[blocks].reshape(-1, kv_heads, head_dim)[:length].to(compute_dtype)
        values = v_cache[blocks].reshape(-1, kv_heads, head_dim)[:length].to(compute_dtype)
        keys, values = keys.repeat_interleave(group, dim=1), values.repeat_interleave(group, dim=1)
        scores = torch.einsum("hd,nhd->hn", q[row].to(compute_dtype), keys) * scale
        out[row] = torch.einsum("hn,nhd->hd", torch.softmax(scores, dim=-1), values).to(q.dtype)
    return out


def dense_decode_attention(q, keys, values, context_lens, scale) -> torch.Tensor:
    """SDPA over dense per-row caches keys/values [B, Hkv, L, D] whose first context_lens[b]
    positions are valid: the ground truth the paged versions are tested against."""
    positions = torch.arange(keys.shape[2], device=q.device)
    is_visible = positions[None, :] < context_lens[:, None].to(positions.device)
    mask = torch.zeros(is_visible.shape, dtype=q.dtype, device=q.device).masked_fill(~is_visible, float("-inf"))
    out = F.scaled_dot_product_attention(
        q[:, :, None], keys, values, attn_mask=mask[:, None, None], scale=scale,
        enable_gqa=keys.shape[1] != q.shape[1],
    )
    return out[:, :, 0]


def num_splits_for(batch: int, kv_heads: int, max_context_tokens: int, device: torch.device) -> int:
    """Token splits per (row, KV head) so that the grid fills the GPU; a function of shapes only."""
    if device.type != "cuda":
        return 1
    num_sms = torch.cuda.get_device_properties(device).multi_processor_count
    wanted = -(-TARGET_PROGRAMS_PER_SM * num_sms // (batch * kv_heads))
    return max(1, min(wanted, max_context_tokens // MIN_SPLIT_TOKENS))


def paged_decode_attention_triton(
    q, k_cache, v_cache, block_tables, context_lens, scale, *,
    num_splits: int | None = None, block_l: int | None = None, num_warps: int = 4, num_stages: int = 2,
    use_dot: bool = True, prefetch: bool = False,
) -> torch.Tensor:
    """The Triton kernel (see the module docstring). Graph-capturable: no host sync, and the launch
    depends only on shapes. num_splits: None picks from the shapes (`num_splits_for`); block_l:
    tokens per loop iteration (power of two); num_warps / num_stages: Triton's launch options;
    use_dot: products on the tensor cores (query heads padded to 16), else on the CUDA cores;
    prefetch: load the next chunk's K/V before reducing this one (two chunks in flight).
    Defaults measured on an H200 (reports/gpu/paged_step, run 2): tl.dot even for multi-head models
    (Llama-2-7B shape, 256 rows: 98 % of copy bandwidth against 51 % with CUDA-core reductions),
    64-token chunks, 4 warps; prefetching by hand did not help."""
    batch, heads, head_dim = q.shape
    num_blocks, block_tokens, kv_heads, _ = k_cache.shape
    group = heads // kv_heads
    if heads % kv_heads or head_dim & (head_dim - 1) or block_tokens & (block_tokens - 1):
        raise ValueError(f"need heads % kv_heads == 0 and power-of-two head_dim and block_tokens, got "
                         f"{heads}, {kv_heads}, {head_dim}, {block_tokens}")
    if q.stride(-1) != 1 or k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("paged_decode_attention needs the head dimension contiguous")
    is_dot = use_dot
    # tl.dot wants at least 16 rows
    group_pad = max(16, triton.next_power_of_2(group)) if is_dot else triton.next_power_of_2(group)
    block_l = block_l or 64
    max_context_tokens = block_tables.shape[1] * block_tokens
    if num_splits is None:
        num_splits = num_splits_for(batch, kv_heads, max_context_tokens, q.device)
    split_tokens = -(-max_context_tokens // num_splits)
    split_tokens = -(-split_tokens // block_l) * block_l
    out = torch.empty_like(q)
    if num_splits == 1:
        partial_acc = partial_max = partial_sum = out  # unused: the kernel writes out directly
    else:
        partial_acc = torch.empty(batch, heads, num_splits, head_dim, dtype=torch.float32, device=q.device)
        partial_max = torch.empty(batch, heads, num_splits, dtype=torch.float32, device=q.device)
        partial_sum = torch.empty_like(partial_max)
    _paged_decode_kernel[(batch, kv_heads, num_splits)](
        q, k_cache, v_cache, block_tables, context_lens, out, partial_acc, partial_max, partial_sum,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), block_tables.stride(0),
        out.stride(0), out.stride(1), split_tokens, scale,
        GROUP=group, GROUP_PAD=group_pad, HEAD_DIM=head_dim, BLOCK_TOKENS=block_tokens, BLOCK_L=block_l,
        NUM_SPLITS=num_splits, IS_DOT=is_dot, PREFETCH=prefetch, num_warps=num_warps, num_stages=num_stages,
    )
    if num_splits > 1:
        _merge_splits_kernel[(batch, heads)](
            partial_acc, partial_max, partial_sum, out, out.stride(0), out.stride(1),
            NUM_SPLITS=num_splits, SPLITS_PAD=triton.next_power_of_2(num_splits), HEAD_DIM=head_dim,
        )
    return out


if triton is not None:

    @triton.jit
    def _load_chunk(k_ptr, v_ptr, table_row, chunk, end, kv_head, k_stride_block, k_stride_tok, k_stride_h,
                    v_stride_block, v_stride_tok, v_stride_h,
                    HEAD_DIM: tl.constexpr, BLOCK_TOKENS: tl.constexpr, BLOCK_L: tl.constexpr):
        """K and V [BLOCK_L, HEAD_DIM] of tokens chunk.. (masked past end), gathered through the table."""
        dims = tl.arange(0, HEAD_DIM)
        positions = chunk + tl.arange(0, BLOCK_L)
        is_token = positions < end
        block = tl.load(table_row + positions // BLOCK_TOKENS, mask=is_token, other=0).to(tl.int64)
        offset = positions % BLOCK_TOKENS
        k_rows = k_ptr + block * k_stride_block + offset * k_stride_tok + kv_head * k_stride_h
        v_rows = v_ptr + block * v_stride_block + offset * v_stride_tok + kv_head * v_stride_h
        k = tl.load(k_rows[:, None] + dims[None, :], mask=is_token[:, None], other=0.0)
        v = tl.load(v_rows[:, None] + dims[None, :], mask=is_token[:, None], other=0.0)
        return k, v, is_token

    @triton.jit
    def _attend_chunk(q, k, v, is_token, running_max, running_sum, acc, scale, IS_DOT: tl.constexpr):
        """One online-softmax update of (max, sum, acc) [GROUP_PAD, ...] with a chunk of >= 1 token."""
        if IS_DOT:
            scores = tl.dot(q, tl.trans(k)) * scale  # [GROUP_PAD, BLOCK_L], float32 accumulate
        else:
            scores = tl.sum(q[:, None, :] * k.to(tl.float32)[None, :, :], axis=2) * scale
        scores = tl.where(is_token[None, :], scores, float("-inf"))
        new_max = tl.maximum(running_max, tl.max(scores, axis=1))
        weights = tl.exp(scores - new_max[:, None])  # the chunk holds >= 1 token: new_max is finite
        rescale = tl.exp(running_max - new_max)
        running_sum = running_sum * rescale + tl.sum(weights, axis=1)
        if IS_DOT:
            acc = acc * rescale[:, None] + tl.dot(weights.to(v.dtype), v)
        else:
            acc = acc * rescale[:, None] + tl.sum(weights[:, :, None] * v.to(tl.float32)[None, :, :], axis=1)
        return new_max, running_sum, acc

    @triton.jit
    def _paged_decode_kernel(
        q_ptr, k_ptr, v_ptr, tables_ptr, lens_ptr, out_ptr, pacc_ptr, pmax_ptr, psum_ptr,
        q_stride_b, q_stride_h, k_stride_block, k_stride_tok, k_stride_h,
        v_stride_block, v_stride_tok, v_stride_h, table_stride_b,
        out_stride_b, out_stride_h, split_tokens, scale,
        GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_TOKENS: tl.constexpr,
        BLOCK_L: tl.constexpr, NUM_SPLITS: tl.constexpr, IS_DOT: tl.constexpr, PREFETCH: tl.constexpr,
    ):
        row, kv_head, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        length = tl.load(lens_ptr + row)
        start = split * split_tokens
        end = tl.minimum(start + split_tokens, length)
        dims = tl.arange(0, HEAD_DIM)
        group = tl.arange(0, GROUP_PAD)
        heads = kv_head * GROUP + group
        is_head = group < GROUP
        q = tl.load(q_ptr + row * q_stride_b + heads[:, None] * q_stride_h + dims[None, :], mask=is_head[:, None],
                    other=0.0)
        if not IS_DOT:
            q = q.to(tl.float32)
        running_max = tl.full([GROUP_PAD], float("-inf"), tl.float32)
        running_sum = tl.zeros([GROUP_PAD], tl.float32)
        acc = tl.zeros([GROUP_PAD, HEAD_DIM], tl.float32)
        table_row = tables_ptr + row * table_stride_b
        if PREFETCH:  # the loads of chunk i + 1 are issued before chunk i is reduced
            k, v, is_token = _load_chunk(k_ptr, v_ptr, table_row, start, end, kv_head, k_stride_block, k_stride_tok,
                                         k_stride_h, v_stride_block, v_stride_tok, v_stride_h,
                                         HEAD_DIM, BLOCK_TOKENS, BLOCK_L)
            for chunk in tl.range(start, end, BLOCK_L):
                next_k, next_v, next_is_token = _load_chunk(
                    k_ptr, v_ptr, table_row, chunk + BLOCK_L, end, kv_head, k_stride_block, k_stride_tok,
                    k_stride_h, v_stride_block, v_stride_tok, v_stride_h, HEAD_DIM, BLOCK_TOKENS, BLOCK_L)
                running_max, running_sum, acc = _attend_chunk(q, k, v, is_token, running_max, running_sum, acc,
                                                              scale, IS_DOT)
                k, v, is_token = next_k, next_v, next_is_token
        else:
            for chunk in tl.range(start, end, BLOCK_L):
                k, v, is_token = _load_chunk(k_ptr, v_ptr, table_row, chunk, end, kv_head, k_stride_block,
                                             k_stride_tok, k_stride_h, v_stride_block, v_stride_tok, v_stride_h,
                                             HEAD_DIM, BLOCK_TOKENS, BLOCK_L)
                running_max, running_sum, acc = _attend_chunk(q, k, v, is_token, running_max, running_sum, acc,
                                                              scale, IS_DOT)
        if NUM_SPLITS == 1:
            out = acc / running_sum[:, None]
            tl.store(out_ptr + row * out_stride_b + heads[:, None] * out_stride_h + dims[None, :],
                     out.to(out_ptr.dtype.element_ty), mask=is_head[:, None])
        else:  # unnormalised partials [B, H, S, (D)]; an empty split leaves max -inf and sum 0
            num_heads = tl.num_programs(1) * GROUP
            partial = (row * num_heads + heads) * NUM_SPLITS + split
            tl.store(pmax_ptr + partial, running_max, mask=is_head)
            tl.store(psum_ptr + partial, running_sum, mask=is_head)
            tl.store(pacc_ptr + partial[:, None] * HEAD_DIM + dims[None, :], acc, mask=is_head[:, None])

    @triton.jit
    def _merge_splits_kernel(
        pacc_ptr, pmax_ptr, psum_ptr, out_ptr, out_stride_b, out_stride_h,
        NUM_SPLITS: tl.constexpr, SPLITS_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
    ):
        row, head = tl.program_id(0), tl.program_id(1)
        splits = tl.arange(0, SPLITS_PAD)
        dims = tl.arange(0, HEAD_DIM)
        is_split = splits < NUM_SPLITS
        base = (row * tl.num_programs(1) + head) * NUM_SPLITS
        maxes = tl.load(pmax_ptr + base + splits, mask=is_split, other=float("-inf"))
        sums = tl.load(psum_ptr + base + splits, mask=is_split, other=0.0)
        accs = tl.load(pacc_ptr + (base + splits)[:, None] * HEAD_DIM + dims[None, :], mask=is_split[:, None],
                       other=0.0)
        top = tl.max(maxes, axis=0)  # finite: split 0 always holds the row's first token
        weights = tl.where(maxes == float("-inf"), 0.0, tl.exp(maxes - top))
        out = tl.sum(accs * weights[:, None], axis=0) / tl.sum(sums * weights, axis=0)
        tl.store(out_ptr + row * out_stride_b + head * out_stride_h + dims, out.to(out_ptr.dtype.element_ty))
