"""Which waiting worker a batch goes to, when several pull at once (pure: no I/O, no clock).

Workers pull, so the batcher only chooses among workers that asked for work: a static worker pulls
when its batch ended, a continuous one whenever a row is free (each of its leases is one row under
the continuous policies). Among the waiting pulls, the batch the policy picks next goes to

  1. a worker whose free KV holds the batch whole (no split) before one that would have to split it;
  2. then the one with the most free KV now: its reported Theta less the KV its open leases hold
     (MEM(B) of each, rules.memory_bytes);
  3. then the one with the fewest leased rows (the least loaded);
  4. then the one that has waited longest (its pull came first): equal workers take turns.

Admission keeps every batch within the smallest live worker's Theta (Scheduler.memory_budget), so any
survivor can run any queued batch: nothing waits for one worker in particular, and a dead worker's
requeued leases are run by the others. A batch bigger than a worker's budget exists only when it was
assembled before that worker joined or merged for a bigger one (magnus_pack); rule 1 sends it to a
worker that holds it, and a worker that takes it anyway splits it (Scheduler._fit_for_worker).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from services.batcher.policy.rules import memory_bytes


@dataclass(frozen=True)
class WorkerLoad:
    """One waiting pull, as the placement sees it.

    worker_id: who pulled.
    kv_bytes_per_token: Delta, bytes per token; None = unknown.
    free_kv_bytes: Theta it registered with less the KV of its open leases, bytes; None = unknown.
    num_leased_rows: requests in its open leases.
    pull_order: rank of its pull among the waiting ones, 0 = the oldest.
    """

    worker_id: str
    kv_bytes_per_token: int | None
    free_kv_bytes: int | None
    num_leased_rows: int
    pull_order: int

    def holds(self, size: int, input_tokens_max: int, gen_tokens_max: int) -> bool:
        """The batch's MEM(B) fits this worker's free KV now (True when either figure is unknown)."""
        if self.kv_bytes_per_token is None or self.free_kv_bytes is None:
            return True
        return memory_bytes(size, input_tokens_max, gen_tokens_max, self.kv_bytes_per_token) <= self.free_kv_bytes


def free_kv_now(theta_bytes: int, kv_bytes_per_token: int, leased_shapes: Sequence[tuple[int, int, int]]) -> int:
    """Theta less MEM(B) of each open lease, given as (size, L, G); bytes, never below 0."""
    held = sum(memory_bytes(size, l_max, g_max, kv_bytes_per_token) for size, l_max, g_max in leased_shapes)
    return max(0, theta_bytes - held)


def pick_worker(loads: Sequence[WorkerLoad], batch_shape: tuple[int, int, int] | None) -> WorkerLoad:
    """The waiting worker the next batch goes to (rules 1-4 above). `batch_shape` is (size, L, G) of the
    policy's next choice, None when not known (then rule 1 is skipped). `loads` must not be empty."""
    if not loads:
        raise ValueError("pick_worker needs at least one waiting worker")

    def key(load: WorkerLoad) -> tuple:
        is_split = batch_shape is not None and not load.holds(*batch_shape)
        free = load.free_kv_bytes if load.free_kv_bytes is not None else float("inf")
        return (is_split, -free, load.num_leased_rows, load.pull_order)

    return min(loads, key=key)
