"""Paged KV cache bookkeeping: a pool of fixed-size blocks and one block table per sequence.

Pure bookkeeping, as nano-vllm's BlockManager: which blocks are free, which sequence owns which,
how many tokens each sequence holds. No device memory is touched; the only tensor made here is
the padded block-table matrix a kernel reads. Every mutating verb has a check that precedes it
(`can_allocate` / `allocate`, `can_grow` / `grow`); calling the verb when its check is False raises
instead of corrupting the pool, so a scheduler bug surfaces at the call that made it.

Invariant (tested with hypothesis): every block is either on the free list or in exactly one
table, so num_free_blocks + num_used_blocks == num_blocks after any sequence of verbs.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Hashable, Mapping, Sequence
from itertools import chain

import numpy as np
import torch

SeqId = Hashable


def padded_tables(tables: Sequence[Sequence[int]], width: int, pad_block: int, dtype=np.int64) -> np.ndarray:
    """Block tables as a [len(tables), width] array, each padded with `pad_block`: filled through one
    mask, not row by row (a step holds hundreds). ValueError if a table is longer than `width`."""
    lengths = np.fromiter(map(len, tables), np.int64, len(tables))
    if len(tables) and lengths.max() > width:
        raise ValueError(f"width {width} is shorter than the longest table ({lengths.max()} blocks)")
    rows = np.full((len(tables), width), pad_block, dtype)
    rows[np.arange(width) < lengths[:, None]] = np.fromiter(chain.from_iterable(tables), dtype, int(lengths.sum()))
    return rows


class PoolExhaustedError(RuntimeError):
    """A verb asked for more blocks than are free (its can_* check would have said False)."""


class BlockPool:
    """`num_blocks` blocks of `block_tokens` token slots each; a token's slot is
    block_id * block_tokens + offset, the flat index into a cache laid out
    [num_blocks, block_tokens, kv_heads, head_dim]."""

    def __init__(self, num_blocks: int, block_tokens: int) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        if block_tokens < 1:
            raise ValueError(f"block_tokens must be >= 1, got {block_tokens}")
        self.num_blocks = num_blocks
        self.block_tokens = block_tokens
        # FIFO reuse: a freed block goes to the back, so recently freed slots are reused last
        self._free: deque[int] = deque(range(num_blocks))
        self._tables: dict[SeqId, list[int]] = {}
        # block_table's tuples, kept until the table changes: a decoding sequence takes a new block
        # once every block_tokens steps, while the scheduler reads its table every step
        self._table_tuples: dict[SeqId, tuple[int, ...]] = {}
        self._num_tokens: dict[SeqId, int] = {}
        self.num_preemptions = 0

    # ---- counts -----------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self._free)

    def blocks_for(self, num_tokens: int) -> int:
        """Blocks that hold `num_tokens` tokens (ceil division)."""
        if num_tokens < 0:
            raise ValueError(f"num_tokens must be >= 0, got {num_tokens}")
        return -(-num_tokens // self.block_tokens)

    def __contains__(self, seq: SeqId) -> bool:
        return seq in self._tables

    def __len__(self) -> int:
        return len(self._tables)

    def num_tokens(self, seq: SeqId) -> int:
        return self._num_tokens[seq]

    def block_table(self, seq: SeqId) -> tuple[int, ...]:
        table = self._table_tuples.get(seq)
        if table is None:
            table = self._table_tuples[seq] = tuple(self._tables[seq])
        return table

    # ---- admit ------------------------------------------------------------------------------
    def can_allocate(self, num_tokens: int) -> bool:
        """Whether a new sequence of `num_tokens` tokens (its prompt, say) fits in the free blocks."""
        return self.blocks_for(num_tokens) <= len(self._free)

    def allocate(self, seq: SeqId, num_tokens: int) -> tuple[int, ...]:
        """Give a new sequence the blocks for its first `num_tokens` tokens; returns its table."""
        if seq in self._tables:
            raise ValueError(f"sequence {seq!r} already holds blocks")
        if num_tokens < 1:
            raise ValueError(f"a sequence starts with at least one token, got {num_tokens}")
        needed = self.blocks_for(num_tokens)
        if needed > len(self._free):
            raise PoolExhaustedError(f"{needed} blocks needed, {len(self._free)} free")
        self._tables[seq] = [self._free.popleft() for _ in range(needed)]
        self._num_tokens[seq] = num_tokens
        return tuple(self._tables[seq])

    # ---- grow by one decoded token ----------------------------------------------------------
    def can_grow(self, seq: SeqId) -> bool:
        """Whether `seq` can take one more token: room left in its last block, or a free block."""
        return self._num_tokens[seq] % self.block_tokens != 0 or len(self._free) > 0

    def grow(self, seq: SeqId) -> int:
        """Append one token to `seq` (taking a new block when its last is full); returns its slot."""
        table, position = self._tables[seq], self._num_tokens[seq]
        if position % self.block_tokens == 0:
            if not self._free:
                raise PoolExhaustedError(f"no free block for sequence {seq!r} to grow into")
            table.append(self._free.popleft())
            self._table_tuples.pop(seq, None)
        self._num_tokens[seq] = position + 1
        return self.slot(seq, position)

    def blocks_to_grow(self, seq: SeqId, num_tokens: int) -> int:
        """New blocks `seq` takes to hold `num_tokens` more tokens (0 while its last block has room)."""
        return self.blocks_for(self._num_tokens[seq] + num_tokens) - len(self._tables[seq])

    def can_extend(self, seq: SeqId, num_tokens: int) -> bool:
        """Whether `seq` can take `num_tokens` more tokens from the free blocks."""
        return self.blocks_to_grow(seq, num_tokens) <= len(self._free)

    def extend(self, seq: SeqId, num_tokens: int) -> None:
        """Append `num_tokens` tokens to `seq` (a chunk, or one decoded token), all or none."""
        self.extend_all({seq: num_tokens})

    def blocks_to_extend(self, growth: Mapping[SeqId, int]) -> int:
        """New blocks `extend_all(growth)` takes: blocks_to_grow summed over its sequences (one pass
        over a step's hundreds of running sequences, not a call each)."""
        tables, num_tokens, block_tokens = self._tables, self._num_tokens, self.block_tokens
        return sum(-(-(num_tokens[seq] + tokens) // block_tokens) - len(tables[seq]) for seq, tokens in growth.items())

    def extend_all(self, growth: Mapping[SeqId, int]) -> None:
        """`extend(seq, num_tokens)` for every (seq, num_tokens) of `growth`, in its order; all or none."""
        needed = self.blocks_to_extend(growth)
        if needed > len(self._free):
            grown = ", ".join(map(repr, list(growth)[:3])) + (", ..." if len(growth) > 3 else "")
            raise PoolExhaustedError(f"{needed} blocks needed for sequences {grown} to grow, {len(self._free)} free")
        tables, num_tokens, block_tokens, free = self._tables, self._num_tokens, self.block_tokens, self._free
        for seq, tokens in growth.items():
            table, held = tables[seq], num_tokens[seq] + tokens
            new_blocks = -(-held // block_tokens) - len(table)
            if new_blocks > 0:  # most add a decoded token to a block with room
                table.extend(free.popleft() for _ in range(new_blocks))
                self._table_tuples.pop(seq, None)
            num_tokens[seq] = held

    def slot(self, seq: SeqId, position: int) -> int:
        """Flat cache slot of token `position` (0-based) of `seq`."""
        if not 0 <= position < self._num_tokens[seq]:
            raise IndexError(f"position {position} outside sequence {seq!r} of {self._num_tokens[seq]} tokens")
        block = self._tables[seq][position // self.block_tokens]
        return block * self.block_tokens + position % self.block_tokens

    def truncate(self, seq: SeqId, num_tokens: int) -> tuple[int, ...]:
        """Keep only `seq`'s first `num_tokens` tokens (>= 1; no more than it holds): the blocks past
        them go back to the pool (slots taken for drafted tokens the model did not keep). Returns them."""
        held = self._num_tokens[seq]
        if not 1 <= num_tokens <= held:
            raise ValueError(f"sequence {seq!r} holds {held} tokens: cannot truncate it to {num_tokens}")
        table = self._tables[seq]
        kept = self.blocks_for(num_tokens)
        freed = tuple(table[kept:])
        if freed:
            del table[kept:]
            self._table_tuples.pop(seq, None)
            self._free.extend(freed)
        self._num_tokens[seq] = num_tokens
        return freed

    # ---- end --------------------------------------------------------------------------------
    def free(self, seq: SeqId) -> tuple[int, ...]:
        """Return a finished sequence's blocks to the pool; returns the blocks freed."""
        blocks = self._tables.pop(seq)
        self._table_tuples.pop(seq, None)
        del self._num_tokens[seq]
        self._free.extend(blocks)
        return tuple(blocks)

    def preempt(self, seq: SeqId) -> tuple[int, ...]:
        """Free a running sequence's blocks so others can grow; it resumes later by recompute.
        The same release as `free`, counted apart so a scheduler's preemptions show."""
        blocks = self.free(seq)
        self.num_preemptions += 1
        return blocks

    # ---- for the kernel ---------------------------------------------------------------------
    def table_tensor(
        self, seqs: Sequence[SeqId], *, width: int | None = None, pad_block: int = 0,
        device: torch.device | str = "cpu",
    ) -> torch.Tensor:
        """Block tables of `seqs` as an int32 [len(seqs), width] tensor, padded with `pad_block`.

        width defaults to the longest table; a CUDA-graph bucket passes its fixed width. Padding
        entries are never read by the attention kernel (it stops at each row's context length),
        but pad_block defaults to a real block index so that a stray read stays in bounds.
        """
        tables = [self._tables[s] for s in seqs]
        width = max(map(len, tables), default=0) if width is None else width
        return torch.from_numpy(padded_tables(tables, width, pad_block, np.int32)).to(device)
