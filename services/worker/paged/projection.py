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
        self.usage = self._usage_at_ends()  # [n]: blocks held at t = steps_k, request k's last step
        self._checked: tuple[int, int, np.ndarray, int] | None = None  # peak_with's last joiner, for add

    def _usage_at_ends(self) -> np.ndarray:
        """`peak_blocks`'s sum at every end, in O(n (log n + block_tokens)) rather than its n x n (a
        scheduler builds this for hundreds of running requests in a step that admits). Request i holds
        ceil((tokens_i + t) / b) = q_i + t // b + [r_i >= b - t % b] blocks at step t, where
        tokens_i + b - 1 = q_i * b + r_i; the requests alive at t (steps_i >= t) are a prefix of them
        sorted by steps, longest first, so the sum takes prefix sums of q and of a histogram of r."""
        b, n = self.block_tokens, len(self.steps)
        order = np.argsort(-self.steps, kind="stable")
        q, r = np.divmod(self.tokens[order] + (b - 1), b)
        q_sums = np.zeros(n + 1, np.int64)
        np.cumsum(q, out=q_sums[1:])
        # at_least[m, x]: of the first m in that order, how many have r >= x (x = b: none)
        at_least = np.zeros((n + 1, b + 1), np.int64)
        at_least[np.arange(1, n + 1), r] = 1
        at_least = at_least.cumsum(axis=0)[:, ::-1].cumsum(axis=1)[:, ::-1]
        alive = n - np.searchsorted(np.sort(self.steps), self.steps, side="left")  # [k]: with steps_i >= steps_k
        t_blocks, t_rest = np.divmod(self.steps, b)
        return q_sums[alive] + alive * t_blocks + at_least[alive, b - t_rest]

    def _with(self, tokens: int, steps: int) -> tuple[np.ndarray, int]:
        """Usage at the others' ends with the request added, and at its own end."""
        if self._checked is not None and self._checked[:2] == (tokens, steps):
            return self._checked[2:]  # admission checks a joiner, then adds it
        extra = np.where(self.steps <= steps, -(-(tokens + self.steps) // self.block_tokens), 0)
        others_at_own_end = -(-(self.tokens[self.steps >= steps] + steps) // self.block_tokens)
        own_end = int(others_at_own_end.sum()) - (-(tokens + steps) // self.block_tokens)
        self._checked = (tokens, steps, self.usage + extra, own_end)
        return self._checked[2:]

    def peak_with(self, tokens: int, steps: int) -> int:
        """peak_blocks of the requests and one more holding `tokens` now, for `steps` more steps."""
        at_ends, own_end = self._with(tokens, steps)
        return max(int(at_ends.max(initial=0)), own_end)

    def add(self, tokens: int, steps: int) -> None:
        at_ends, own_end = self._with(tokens, steps)
        self.usage = np.append(at_ends, own_end)
        self.tokens, self.steps = np.append(self.tokens, tokens), np.append(self.steps, steps)
        self._checked = None
