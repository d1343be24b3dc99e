"""BlockPool: check-then-act verbs, and a hypothesis state machine over admit/grow/finish/preempt."""

from __future__ import annotations

import pytest
import torch
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from services.worker.paged.kv_blocks import BlockPool, PoolExhaustedError, padded_tables


def test_allocate_grow_free_counts_and_slots():
    pool = BlockPool(num_blocks=4, block_tokens=4)
    assert pool.allocate("a", 5) == (0, 1)
    assert (pool.num_free_blocks, pool.num_used_blocks) == (2, 2)
    assert pool.slot("a", 4) == 1 * 4 + 0
    assert [pool.grow("a") for _ in range(3)] == [5, 6, 7]  # fills block 1, no new block
    assert pool.num_used_blocks == 2
    assert pool.grow("a") == 2 * 4  # token 8 opens block 2
    assert pool.block_table("a") == (0, 1, 2)
    assert pool.free("a") == (0, 1, 2)
    assert (pool.num_free_blocks, len(pool)) == (4, 0)


def test_verbs_refuse_what_their_checks_refuse():
    pool = BlockPool(num_blocks=2, block_tokens=2)
    assert not pool.can_allocate(5)
    with pytest.raises(PoolExhaustedError):
        pool.allocate("big", 5)
    pool.allocate("a", 4)
    assert not pool.can_grow("a")
    with pytest.raises(PoolExhaustedError):
        pool.grow("a")
    assert pool.num_tokens("a") == 4  # a refused grow changed nothing
    with pytest.raises(ValueError):
        pool.allocate("a", 1)
    assert pool.preempt("a") == (0, 1) and pool.num_preemptions == 1
    with pytest.raises(KeyError):
        pool.free("a")


def test_table_tensor_is_padded_int32():
    pool = BlockPool(num_blocks=8, block_tokens=2)
    pool.allocate("a", 5)
    pool.allocate("b", 1)
    table = pool.table_tensor(["a", "b"], width=4, pad_block=7)
    assert table.dtype == torch.int32
    assert table.tolist() == [[0, 1, 2, 7], [3, 7, 7, 7]]
    with pytest.raises(ValueError):
        pool.table_tensor(["a"], width=2)


def test_padded_tables_pads_each_row_and_refuses_a_longer_table():
    rows = padded_tables([(3, 1), (), (4, 5, 9)], width=4, pad_block=-1)
    assert rows.tolist() == [[3, 1, -1, -1], [-1, -1, -1, -1], [4, 5, 9, -1]]
    assert padded_tables([], width=3, pad_block=0).shape == (0, 3)
    with pytest.raises(ValueError):
        padded_tables([(1, 2, 3)], width=2, pad_block=0)


class PoolMachine(RuleBasedStateMachine):
    """Random admit/grow/extend/truncate/finish/preempt; after every step no block leaks or is owned twice, and
    every table covers exactly its sequence's tokens."""

    def __init__(self) -> None:
        super().__init__()
        self.pool = BlockPool(num_blocks=12, block_tokens=4)
        self.tokens: dict[int, int] = {}  # the model: tokens each live sequence holds
        self.next_id = 0

    @rule(num_tokens=st.integers(1, 30))
    def admit(self, num_tokens):
        if self.pool.can_allocate(num_tokens):
            self.pool.allocate(self.next_id, num_tokens)
            self.tokens[self.next_id] = num_tokens
        else:
            with pytest.raises(PoolExhaustedError):
                self.pool.allocate(self.next_id, num_tokens)
            assert self.next_id not in self.pool
        self.next_id += 1

    @precondition(lambda self: self.tokens)
    @rule(data=st.data())
    def grow(self, data):
        seq = data.draw(st.sampled_from(sorted(self.tokens)))
        if self.pool.can_grow(seq):
            slot = self.pool.grow(seq)
            self.tokens[seq] += 1
            assert slot == self.pool.slot(seq, self.tokens[seq] - 1)
        else:
            with pytest.raises(PoolExhaustedError):
                self.pool.grow(seq)

    @precondition(lambda self: self.tokens)
    @rule(data=st.data())
    def extend_all(self, data):
        growth = data.draw(st.dictionaries(st.sampled_from(sorted(self.tokens)), st.integers(0, 6)))
        needed = sum(self.pool.blocks_to_grow(seq, n) for seq, n in growth.items())
        assert self.pool.blocks_to_extend(growth) == needed
        if needed <= self.pool.num_free_blocks:
            self.pool.extend_all(growth)
            for seq, n in growth.items():
                self.tokens[seq] += n
        else:
            free_before = self.pool.num_free_blocks
            with pytest.raises(PoolExhaustedError):
                self.pool.extend_all(growth)
            assert self.pool.num_free_blocks == free_before  # all or none

    @precondition(lambda self: self.tokens)
    @rule(data=st.data())
    def truncate(self, data):
        """Give back the tail of a sequence (drafted tokens the model did not keep)."""
        seq = data.draw(st.sampled_from(sorted(self.tokens)))
        num_tokens = data.draw(st.integers(0, self.tokens[seq] + 1))
        if not 1 <= num_tokens <= self.tokens[seq]:
            with pytest.raises(ValueError):
                self.pool.truncate(seq, num_tokens)
            return
        free_before, blocks_before = self.pool.num_free_blocks, self.pool.blocks_for(self.tokens[seq])
        freed = self.pool.truncate(seq, num_tokens)
        self.tokens[seq] = num_tokens
        assert len(freed) == blocks_before - self.pool.blocks_for(num_tokens)
        assert self.pool.num_free_blocks == free_before + len(freed)

    @precondition(lambda self: self.tokens)
    @rule(data=st.data(), is_preempt=st.booleans())
    def finish_or_preempt(self, data, is_preempt):
        seq = data.draw(st.sampled_from(sorted(self.tokens)))
        free_before = self.pool.num_free_blocks
        freed = self.pool.preempt(seq) if is_preempt else self.pool.free(seq)
        assert len(freed) == self.pool.blocks_for(self.tokens.pop(seq))
        assert self.pool.num_free_blocks == free_before + len(freed)

    @invariant()
    def no_leak_no_double_ownership(self):
        pool = self.pool
        assert pool.num_free_blocks + pool.num_used_blocks == pool.num_blocks
        owned = [b for seq in self.tokens for b in pool.block_table(seq)]
        free = list(pool._free)
        assert len(owned) == len(set(owned)) == pool.num_used_blocks
        assert len(free) == len(set(free))
        assert not set(owned) & set(free)
        assert set(owned) | set(free) == set(range(pool.num_blocks))
        for seq, num_tokens in self.tokens.items():
            assert pool.num_tokens(seq) == num_tokens
            assert len(pool.block_table(seq)) == pool.blocks_for(num_tokens)
        slots = [pool.slot(seq, p) for seq, n in self.tokens.items() for p in range(n)]
        assert len(slots) == len(set(slots))  # no two live tokens share a cache slot


TestPoolMachine = PoolMachine.TestCase
TestPoolMachine.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
