"""OOM recovery: split a batch in two halves and requeue both (arrival times kept)."""

from __future__ import annotations

from services.batcher.policy.batch import Member, QueuedBatch


def split_members(members: list[Member]) -> tuple[list[Member], list[Member]]:
    """Two halves of equal size (the first one smaller by one for odd sizes).

    Members are ordered by predicted length first, so the short half gets a small G(B) and
    finishes early instead of both halves inheriting the longest member's length.
    Raises ValueError for fewer than two members: a single request cannot be split.
    """
    if len(members) < 2:
        raise ValueError("a batch of fewer than 2 requests cannot be split")
    ordered = sorted(members, key=lambda m: (m.gen_tokens, m.input_tokens, m.arrival_s))
    middle = len(ordered) // 2
    return ordered[:middle], ordered[middle:]


def split_batch(batch: QueuedBatch, new_ids: tuple[str, str]) -> tuple[QueuedBatch, QueuedBatch]:
    """The two sealed halves of `batch`; every member appears in exactly one of them."""
    halves = []
    for batch_id, members in zip(new_ids, split_members(batch.members), strict=True):
        half = QueuedBatch(batch_id=batch_id, is_sealed=True, parent_batch_id=batch.batch_id)
        for member in members:
            half.add(member)
        halves.append(half)
    return halves[0], halves[1]
