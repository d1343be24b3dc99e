"""Straggler preemption: the rule that stops a static batch when only a few under-predicted rows still run."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Preemption:
    """Cut a static batch's stragglers. Once `after_steps` decode steps ran (the batch's planned G(B))
    and at most `max_rows` rows still run, the batch stops; those rows return what they generated so
    far, marked preempted, and the batcher requeues them. The other rows' slots would otherwise idle
    while a few under-predicted requests finish (reports/gpu/pack_offline.md)."""

    after_steps: int
    max_rows: int

    def should_cut(self, steps: int, running_rows: int) -> bool:
        return steps >= self.after_steps and 0 < running_rows <= self.max_rows


def stop_tensor(stop_ids: set[int], device: torch.device) -> torch.Tensor:
    """`stop_ids` as a tensor for torch.isin; [-1] (no token) when there are none."""
    return torch.tensor(sorted(stop_ids) or [-1], dtype=torch.long, device=device)


def running_rows(generated: torch.Tensor, limits: torch.Tensor, stops: torch.Tensor) -> int:
    """Rows of `generated` [B, steps] that have neither produced a stop token (`stop_tensor`) nor
    reached their limit."""
    is_done = (limits <= generated.shape[1]) | torch.isin(generated, stops).any(dim=1)
    return int((~is_done).sum())
