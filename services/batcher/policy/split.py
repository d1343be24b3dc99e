"""Failure recovery: split a failed batch in two halves and requeue both (arrival times kept).

Out of memory, the halves fit; on any other error, halving again and again isolates the request
that breaks its batch, so only it fails.
"""

from __future__ import annotations

import enum

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


class FailureAction(enum.Enum):
    """What the scheduler does with a leased batch the worker reported as failed."""

    SPLIT = "split"  # requeue both halves: the failing request ends up alone, its neighbours run
    RETRY = "retry"  # requeue the batch whole (a lone request: the error may have been transient)
    FAIL = "fail"  # answer its requests with the error
    REQUEUE = "requeue"  # the worker stopped, not the batch's fault: requeue whole, count nothing


def after_failure(
    size: int,
    num_failures: int,
    max_failures: int,
    *,
    is_out_of_memory: bool,
    is_worker_stopping: bool = False,
    is_lost: bool = False,
) -> FailureAction:
    """The decision for a batch of `size` requests that has now failed `num_failures` times (this one
    included, its parent batches' failures inherited).

    A batch of two or more is split, OOM or not: splitting is bounded by log2(size) rounds, and a
    request that breaks every batch it is in (a poison request) then fails alone while every
    neighbour is answered. Alone, an OOM cannot shrink further and fails at once; another error is
    retried until the request has failed `max_failures` times. A lost lease (the worker died or
    restarted) is retried whole the first time, as that is usually the worker's fault, not the
    batch's; lost again, it is split like a failure, in case one request is what kills workers.
    """
    if is_worker_stopping:
        return FailureAction.REQUEUE
    if is_lost and num_failures <= 1 < max_failures:
        return FailureAction.RETRY
    if size >= 2:
        return FailureAction.SPLIT
    if is_out_of_memory or num_failures >= max_failures:
        return FailureAction.FAIL
    return FailureAction.RETRY
