"""The policies by name (MAGNUS_BATCHER_POLICY): paper ablation vs -> glp -> abp -> magnus, beyond it,
the oracles, and the continuous ones. A new policy is one file in families/ and one line below."""

from __future__ import annotations

from services.batcher.policy.base import BasePolicy, Policy, PolicyKnobs
from services.batcher.policy.families.abp import AdaptiveBatching
from services.batcher.policy.families.ccb import ContinuousBatching
from services.batcher.policy.families.glp import GenerationLengthPrediction
from services.batcher.policy.families.magnus import Magnus
from services.batcher.policy.families.magnus_ccb import MagnusContinuous, MagnusContinuousTail
from services.batcher.policy.families.magnus_pack import MagnusPack
from services.batcher.policy.families.magnus_sw import MagnusSizeWeighted
from services.batcher.policy.families.oracle import Oracle
from services.batcher.policy.families.oracle_pack import OraclePack
from services.batcher.policy.families.vs import VanillaScheduling
from services.batcher.policy.pack_cost import LinearBatchCost

POLICIES: dict[str, type[BasePolicy]] = {
    cls.name: cls
    for cls in (
        VanillaScheduling,
        GenerationLengthPrediction,
        AdaptiveBatching,
        Magnus,
        MagnusSizeWeighted,
        MagnusPack,
        Oracle,
        OraclePack,
        ContinuousBatching,
        MagnusContinuous,
        MagnusContinuousTail,
    )
}

# static batching: the simulator's ablation. The continuous ones serve continuous-batching workers,
# which the static-batch simulator does not model.
POLICY_NAMES = tuple(name for name, cls in POLICIES.items() if not cls.is_continuous)
CONTINUOUS_POLICY_NAMES = tuple(name for name, cls in POLICIES.items() if cls.is_continuous)
SERVING_POLICY_NAMES = (*POLICY_NAMES, *CONTINUOUS_POLICY_NAMES)


def make_policy(
    name: str,
    *,
    phi_token_reads: float,
    fixed_batch_size: int,
    max_batch_size: int | None,
    memory_fill_fraction: float = 1.0,
    pack_cost: LinearBatchCost | None = None,
) -> Policy:
    """The policy called `name` with the given knobs (each family reads the ones it uses; PolicyKnobs).
    Raises ValueError for an unknown name or an invalid knob."""
    cls = POLICIES.get(name)
    if cls is None:
        raise ValueError(f"unknown policy {name!r}; choose one of {', '.join(SERVING_POLICY_NAMES)}")
    return cls(PolicyKnobs(phi_token_reads=phi_token_reads, fixed_batch_size=fixed_batch_size,
                           max_batch_size=max_batch_size, memory_fill_fraction=memory_fill_fraction,
                           pack_cost=pack_cost))
