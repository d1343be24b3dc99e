"""Predicted block use of running requests: the check behind predicted admission (issue 23). Pure.

Each request holds `tokens` now and is predicted to grow one token a step for `steps` more steps, then
to free all its blocks. What the pool must hold is the peak of that projection over future steps,
not the sum of final sizes: the requests do not all reach their ends at once.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def peak_blocks(holding: Sequence[tuple[int, int]], block_tokens: int) -> int:
    """Most blocks in use at any future step if request i holds tokens_i now, grows one token a step
    for steps_i more steps and then frees its blocks: holding = [(tokens_i, steps_i)], steps_i >= 0.
    Usage only grows between two ends, so the peak is at one: max over k of the blocks of every
    request with steps_i >= steps_k, at t = steps_k (vectorised: n x n for n requests)."""
    if not holding:
        return 0
    tokens, steps = np.array(holding, dtype=np.int64).reshape(-1, 2).T
    is_alive = steps[None, :] >= steps[:, None]  # [k, i]: request i still holds blocks at t = steps_k
    blocks = -(-(tokens[None, :] + steps[:, None]) // block_tokens)
    return int((blocks * is_alive).sum(axis=1).max())


class BlockProjection:
    """`peak_blocks` of a set of requests kept as the blocks in use at each one's end, so that checking
    and adding one more request costs O(n) (a step may admit many against hundreds running)."""

    def __init__(self, holding: Sequence[tuple[int, int]], block_tokens: int) -> None:
        self.block_tokens = block_tokens
        tokens, steps = np.array(holding, dtype=np.int64).reshape(-1, 2).T
        self.tokens, self.steps = tokens, steps
        self.usage = self._usage_at(steps)  # [n]: blocks held at t = steps_k, request k's last step

    def _usage_at(self, times: np.ndarray) -> np.ndarray:
        is_alive = self.steps[None, :] >= times[:, None]
        return (-(-(self.tokens[None, :] + times[:, None]) // self.block_tokens) * is_alive).sum(axis=1)

    def _with(self, tokens: int, steps: int) -> tuple[np.ndarray, int]:
        """Usage at the others' ends with the request added, and at its own end."""
        extra = np.where(self.steps <= steps, -(-(tokens + self.steps) // self.block_tokens), 0)
        own_end = int(self._usage_at(np.array([steps]))[0]) - (-(tokens + steps) // self.block_tokens)
        return self.usage + extra, own_end

    def peak_with(self, tokens: int, steps: int) -> int:
        """peak_blocks of the requests and one more holding `tokens` now, for `steps` more steps."""
        at_ends, own_end = self._with(tokens, steps)
        return max(int(at_ends.max(initial=0)), own_end)

    def add(self, tokens: int, steps: int) -> None:
        at_ends, own_end = self._with(tokens, steps)
        self.usage = np.append(at_ends, own_end)
        self.tokens, self.steps = np.append(self.tokens, tokens), np.append(self.steps, steps)
