"""Queued batches and the per-batch aggregates that make WMA O(1) to update."""

from __future__ import annotations

from dataclasses import dataclass, field

from services.batcher.policy.rules import member_term, wma_from_aggregates


@dataclass(frozen=True)
class Member:
    """One request as the policy sees it. Lengths in tokens, arrival on the monotonic clock."""

    request_id: str
    input_tokens: int  # L(p): prompt tokens
    gen_tokens: int  # G(p): predicted generation tokens (true ones for the oracle policy)
    arrival_s: float


@dataclass
class QueuedBatch:
    """A batch waiting in the queue. `revision` increases on every change (estimate caching)."""

    batch_id: str
    members: list[Member] = field(default_factory=list)
    input_tokens_max: int = 0  # L(B)
    gen_tokens_max: int = 0  # G(B)
    max_member_term: float = float("-inf")  # max_p h(p), see rules.member_term
    oldest_arrival_s: float = float("inf")
    revision: int = 0
    is_sealed: bool = False  # no more insertions (e.g. halves of an OOM split)
    parent_batch_id: str | None = None
    estimated_s: float | None = None  # cached estimate for `estimate_revision`
    estimate_revision: int = -1
    estimator_version: int = 0
    num_failures: int = 0  # worker failures other than OOM, for bounded retries

    @property
    def size(self) -> int:
        return len(self.members)

    @property
    def wma(self) -> float:
        return wma_from_aggregates(self.input_tokens_max, self.gen_tokens_max, self.max_member_term)

    @property
    def is_estimate_fresh(self) -> bool:
        return self.estimated_s is not None and self.estimate_revision == self.revision

    def add(self, member: Member) -> None:
        self.members.append(member)
        self.input_tokens_max = max(self.input_tokens_max, member.input_tokens)
        self.gen_tokens_max = max(self.gen_tokens_max, member.gen_tokens)
        self.max_member_term = max(self.max_member_term, member_term(member.input_tokens, member.gen_tokens))
        self.oldest_arrival_s = min(self.oldest_arrival_s, member.arrival_s)
        self.revision += 1

    def remove(self, request_id: str) -> Member | None:
        """Remove one member (a cancelled request); aggregates are rebuilt in O(size)."""
        kept = [m for m in self.members if m.request_id != request_id]
        if len(kept) == len(self.members):
            return None
        removed = next(m for m in self.members if m.request_id == request_id)
        self.members = []
        self.input_tokens_max = self.gen_tokens_max = 0
        self.max_member_term = float("-inf")
        self.oldest_arrival_s = float("inf")
        revision = self.revision
        for member in kept:
            self.add(member)
        self.revision = revision + 1
        return removed

