"""Wasted memory access (WMA) of a static batch, in KV-cache token reads (paper, Sec. on ABP).

With L(B), G(B) the batch's longest prompt and generation:
  WMA_gen(p)  = G(p) (L(B) - L(p))                       padding read while p generates
  WMA_wait(p) = sum_{g=G(p)}^{G(B)} (g + L(B))           reads after p finished
  WMA(B)      = max_p WMA_gen(p) + WMA_wait(p)

Expanding the arithmetic series, WMA_gen(p) + WMA_wait(p) = C(L(B), G(B)) + h(p) with
  C(L, G) = (G + 1) L + G (G + 1) / 2
  h(p)    = -G(p) L(p) + (G(p) - G(p)^2) / 2
so h(p) does not depend on the batch: a batch only needs L, G and max_p h(p), and the WMA after
inserting a request is O(1). tests/batcher check this against a brute-force count.
"""

from __future__ import annotations


def batch_constant(input_tokens_max: int, gen_tokens_max: int) -> float:
    """C(L, G), the part of every member's WMA that depends only on the batch."""
    return (gen_tokens_max + 1) * input_tokens_max + gen_tokens_max * (gen_tokens_max + 1) / 2


def member_term(input_tokens: int, gen_tokens: int) -> float:
    """h(p), the part of a member's WMA that depends only on the member."""
    return -gen_tokens * input_tokens + (gen_tokens - gen_tokens * gen_tokens) / 2


def wma_from_aggregates(input_tokens_max: int, gen_tokens_max: int, max_member_term: float) -> float:
    """WMA(B) from its aggregates; 0 for an empty batch."""
    if max_member_term == float("-inf"):
        return 0.0
    return batch_constant(input_tokens_max, gen_tokens_max) + max_member_term


def wma_after_insert(
    input_tokens_max: int, gen_tokens_max: int, max_member_term: float, input_tokens: int, gen_tokens: int
) -> float:
    """WMA of a batch with the given aggregates after adding a request of (L(p), G(p))."""
    return wma_from_aggregates(
        max(input_tokens_max, input_tokens),
        max(gen_tokens_max, gen_tokens),
        max(max_member_term, member_term(input_tokens, gen_tokens)),
    )
