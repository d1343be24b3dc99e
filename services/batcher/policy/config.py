"""The ablation's policies, selectable by name (paper: VS -> GLP -> ABP -> Magnus; plus oracle)."""

from __future__ import annotations

import enum
from dataclasses import dataclass

from services.batcher.policy.pack_cost import LinearBatchCost


class InsertMode(enum.Enum):
    FCFS = "fcfs"  # append to the newest open batch until it is full
    WMA = "wma"  # the open batch with the smallest WMA after insertion
    SINGLE = "single"  # every request queues alone; batches form when a worker pulls (PACK)


class ChooseMode(enum.Enum):
    FCFS = "fcfs"  # the batch holding the oldest request
    HRRN = "hrrn"  # highest response ratio (wait + estimate) / estimate
    # beyond the paper: the response ratio times the batch size, i.e. the batch whose requests
    # have waited longest in total relative to its run time; see hrrn.py
    HRRN_SIZE_WEIGHTED = "hrrn_size_weighted"
    # beyond the paper: build the batch from the whole queue at pull time (pack.py)
    PACK = "pack"

    @property
    def uses_estimates(self) -> bool:
        return self in (ChooseMode.HRRN, ChooseMode.HRRN_SIZE_WEIGHTED)


@dataclass(frozen=True)
class PolicyConfig:
    """How requests are grouped and batches ordered.

    phi_token_reads: WMA threshold Phi; None = no threshold (a request joins any batch it may).
    max_batch_size: fixed batch size for VS/GLP, an optional ceiling otherwise; None = no limit.
    use_memory_cap: enforce MEM(B) = |B| (L+G) Delta <= Theta by predicted lengths.
    uses_predictions: False for VS, which batches without knowing lengths.
    uses_true_lengths: the oracle's upper bound: the simulator supplies true lengths; the batcher
      takes max_new_tokens as the true length (exact in trace replay, where a request stops there).
    memory_fill_fraction: share of Theta a batch may fill by *predicted* lengths; the rest is
      headroom for under-predictions, each of which would otherwise cost an OOM and a split.
    uses_upper_lengths: plan with the predictor's upper estimate instead of its point prediction.
    """

    name: str
    insert_mode: InsertMode
    choose_mode: ChooseMode
    phi_token_reads: float | None
    max_batch_size: int | None
    use_memory_cap: bool
    uses_predictions: bool = True
    uses_true_lengths: bool = False
    memory_fill_fraction: float = 1.0
    pack_cost: LinearBatchCost | None = None  # PACK's batch-time model
    uses_upper_lengths: bool = False  # plan with the predictor's upper estimate (magnus_pack)

    def __post_init__(self) -> None:
        if self.max_batch_size is not None and self.max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {self.max_batch_size}")
        if self.phi_token_reads is not None and self.phi_token_reads <= 0:
            raise ValueError(f"phi_token_reads must be > 0, got {self.phi_token_reads}")
        if not 0.0 < self.memory_fill_fraction <= 1.0:
            raise ValueError(f"memory_fill_fraction must be in (0, 1], got {self.memory_fill_fraction}")
        if self.insert_mode is InsertMode.FCFS and self.max_batch_size is None:
            raise ValueError(f"{self.name}: FCFS insertion needs a fixed max_batch_size")
        if (self.choose_mode is ChooseMode.PACK) != (self.insert_mode is InsertMode.SINGLE):
            raise ValueError(f"{self.name}: PACK dispatch and SINGLE insertion go together")
        if self.choose_mode is ChooseMode.PACK and self.pack_cost is None:
            raise ValueError(f"{self.name}: PACK needs a pack_cost model")


# static batching; the oracles plan with true lengths (an upper bound for the grouping rule)
POLICY_NAMES = ("vs", "glp", "abp", "magnus", "magnus_sw", "magnus_pack", "oracle", "oracle_pack")
# ccb and magnus_ccb serve continuous-batching workers, which the static-batch simulator does not model
CONTINUOUS_POLICY_NAMES = ("ccb", "magnus_ccb")
SERVING_POLICY_NAMES = (*POLICY_NAMES, *CONTINUOUS_POLICY_NAMES)


def make_policy(
    name: str,
    *,
    phi_token_reads: float,
    fixed_batch_size: int,
    max_batch_size: int | None,
    memory_fill_fraction: float = 1.0,
    pack_cost: LinearBatchCost | None = None,
) -> PolicyConfig:
    """The policy called `name` with the given knobs. Raises ValueError for an unknown name.

    `memory_fill_fraction` applies to the policies that plan with predictions (abp, magnus);
    the oracle knows the true lengths and may fill Theta.
    """
    if name == "vs":
        return PolicyConfig(name, InsertMode.FCFS, ChooseMode.FCFS, None, fixed_batch_size, False, False)
    if name == "glp":
        # WMA grouping under Phi; without Phi every request would join some open batch and the
        # fixed-size batches would fill in arrival order, i.e. glp would be vs.
        return PolicyConfig(name, InsertMode.WMA, ChooseMode.FCFS, phi_token_reads, fixed_batch_size, False)
    if name == "abp":
        return PolicyConfig(
            name, InsertMode.WMA, ChooseMode.FCFS, phi_token_reads, max_batch_size, True,
            memory_fill_fraction=memory_fill_fraction,
        )
    if name == "magnus":
        return PolicyConfig(
            name, InsertMode.WMA, ChooseMode.HRRN, phi_token_reads, max_batch_size, True,
            memory_fill_fraction=memory_fill_fraction,
        )
    if name == "magnus_sw":
        return PolicyConfig(
            name, InsertMode.WMA, ChooseMode.HRRN_SIZE_WEIGHTED, phi_token_reads, max_batch_size, True,
            memory_fill_fraction=memory_fill_fraction,
        )
    if name == "magnus_pack":
        # the upper estimate: one under-predicted request stretches a whole packed batch
        # (reports/gpu/e2e.md), and the forest's spread flags most of them
        return PolicyConfig(
            name, InsertMode.SINGLE, ChooseMode.PACK, None, max_batch_size, True,
            memory_fill_fraction=memory_fill_fraction, pack_cost=pack_cost or LinearBatchCost(),
            uses_upper_lengths=True,
        )
    if name == "oracle_pack":
        return PolicyConfig(
            name, InsertMode.SINGLE, ChooseMode.PACK, None, max_batch_size, True, True, True,
            pack_cost=pack_cost or LinearBatchCost(),
        )
    if name == "oracle":
        return PolicyConfig(
            name, InsertMode.WMA, ChooseMode.HRRN, phi_token_reads, max_batch_size, True, True, True
        )
    if name == "ccb":
        # FCFS continuous batching (the paper's CCB baseline): every request is its own lease, and
        # a worker in continuous mode pulls one whenever a slot of its running batch frees.
        return PolicyConfig(name, InsertMode.FCFS, ChooseMode.FCFS, None, 1, False, False)
    if name == "magnus_ccb":
        # beyond the paper (its future work: continuous batching with length prediction): still one
        # lease per request, but the next request to join the running batch is the one with the highest
        # response ratio by its predicted length; short requests stop queueing behind long ones and the
        # long ones age until they go. Memory is the row's: admission checks L + max_new_tokens.
        return PolicyConfig(name, InsertMode.FCFS, ChooseMode.HRRN, None, 1, False, True)
    raise ValueError(f"unknown policy {name!r}; choose one of {', '.join(SERVING_POLICY_NAMES)}")
