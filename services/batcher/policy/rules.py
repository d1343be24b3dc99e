"""The paper's rules, each defined once: the WMA term, the response ratio, the memory of a batch and
the KV cap. Every policy and every vectorised kernel (columns.py, pack.py, batch_queue.py, the
scheduler's cap checks) calls these; tests/batcher/test_rules.py checks each kernel against them.

Every function but wma_from_aggregates works on plain numbers and on numpy arrays alike (same arithmetic, broadcast), so a
kernel over thousands of queued batches and a scalar check over one batch run the same line.

WMA (paper, Sec. on ABP), with L(B), G(B) the batch's longest prompt and generation, in token reads:
  WMA_gen(p)  = G(p) (L(B) - L(p))                       padding read while p generates
  WMA_wait(p) = sum_{g=G(p)}^{G(B)} (g + L(B))           reads after p finished
  WMA(B)      = max_p WMA_gen(p) + WMA_wait(p)
Expanding the arithmetic series, WMA_gen(p) + WMA_wait(p) = C(L(B), G(B)) + h(p) with
  C(L, G) = (G + 1) L + G (G + 1) / 2
  h(p)    = -G(p) L(p) + (G(p) - G(p)^2) / 2
so h(p) does not depend on the batch: a batch only needs L, G and max_p h(p), and the WMA after
inserting a request is O(1).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# ---- WMA -----------------------------------------------------------------------------------------


def batch_constant(input_tokens_max, gen_tokens_max):
    """C(L, G), the part of every member's WMA that depends only on the batch, token reads."""
    return (gen_tokens_max + 1) * input_tokens_max + gen_tokens_max * (gen_tokens_max + 1) / 2


def member_term(input_tokens, gen_tokens):
    """h(p), the part of a member's WMA that depends only on the member, token reads."""
    return -gen_tokens * input_tokens + (gen_tokens - gen_tokens * gen_tokens) / 2


def wma_from_aggregates(input_tokens_max: int, gen_tokens_max: int, max_member_term: float) -> float:
    """WMA(B) = C(L(B), G(B)) + max_p h(p) of one batch, token reads; 0 for an empty one (max term -inf)."""
    if max_member_term == float("-inf"):
        return 0.0
    return batch_constant(input_tokens_max, gen_tokens_max) + max_member_term


def wma_after_insert(input_tokens_max, gen_tokens_max, max_member_term, input_tokens, gen_tokens):
    """WMA of a batch with the given aggregates once a request of (L(p), G(p)) joins it, token reads."""
    return batch_constant(np.maximum(input_tokens_max, input_tokens), np.maximum(gen_tokens_max, gen_tokens)) + (
        np.maximum(max_member_term, member_term(input_tokens, gen_tokens)))


# ---- response ratio (HRRN) -----------------------------------------------------------------------


def response_ratio(wait_s, run_s):
    """(wait + run) / run: the HRRN priority of a batch that has waited `wait_s` and runs `run_s`.

    Wait = now - arrival of its oldest member (its response time is bounded below by that one's).
    """
    return (wait_s + run_s) / run_s


def size_weighted_ratio(size, wait_s, run_s):
    """The response ratio times the batch size (magnus_sw): the batch whose requests have waited the
    longest in total per second of its work; it still ages without bound, so nothing starves."""
    return size * response_ratio(wait_s, run_s)


def summed_ratio(size, wait_sum_s, run_s):
    """Sum of the members' own response ratios when they run together for `run_s` seconds:
    sum_p (wait(p) + T) / T = |W| + sum wait / T (magnus_pack's window score)."""
    return size + wait_sum_s / run_s


# ---- memory --------------------------------------------------------------------------------------


def memory_bytes(size, input_tokens_max, gen_tokens_max, kv_bytes_per_token):
    """MEM(B) = |B| (L(B) + G(B)) Delta: KV bytes a static batch holds at its last step."""
    return size * (input_tokens_max + gen_tokens_max) * kv_bytes_per_token


def fits_memory(size, input_tokens_max, gen_tokens_max, kv_bytes_per_token, free_kv_bytes, fill_fraction=1.0):
    """The KV cap: MEM(B) <= Theta x fill_fraction. Always true when Delta or Theta is unknown (None).

    fill_fraction < 1 keeps headroom for under-predicted lengths (PolicyKnobs.memory_fill_fraction).
    """
    if kv_bytes_per_token is None or free_kv_bytes is None:
        return True
    return memory_bytes(size, input_tokens_max, gen_tokens_max, kv_bytes_per_token) <= free_kv_bytes * fill_fraction


@dataclass(frozen=True)
class MemoryBudget:
    """Delta (KV bytes per token) and Theta (free KV bytes) of the workers; None = unknown, no cap.
    lanes: batches the workers run at once (a continuous worker's rows), which the tail guard of
    magnus_ccb_tail divides the queue's work by; None = unknown."""

    kv_bytes_per_token: int | None = None
    free_kv_bytes: int | None = None
    lanes: int | None = None

    def fits(self, size: int, input_tokens_max: int, gen_tokens_max: int, fill_fraction: float = 1.0) -> bool:
        """The KV cap (fits_memory) for a batch of `size` rows of L + G tokens each."""
        return bool(fits_memory(size, input_tokens_max, gen_tokens_max, self.kv_bytes_per_token, self.free_kv_bytes,
                                fill_fraction))
