"""Deadline-aware admission: how long a new request would wait for its answer (pure).

The rule, in seconds: wait = (what is left of every running batch + run time of every queued batch)
/ (lanes that drain the queue), and the answer comes after wait + the new request's own run time. A queued batch's run time is the estimator's cached estimate, else the
fallback guess (policy/fallback.py); the request's own is the fallback for a batch of one at its
planned length. Both are multiplied by the run-time scale: how much longer than estimated the
batches that completed lately took (an average, so a device slower or faster than the estimates
corrects them after a few batches). A lane is a worker for static batching, a row of a worker's running batch for the
continuous policies (each row takes a lease of its own). What is left of a running batch is its
scaled estimate less the time it has run (never below 0). Deliberately rough: it only has to tell a
request that can make its deadline from one that cannot, and it errs towards admitting (a request
admitted in vain is dropped from the queue when its caller leaves).
"""

from __future__ import annotations

from collections import deque

import numpy as np

from services.batcher.policy.columns import BatchColumns
from services.batcher.policy.fallback import fallback_estimate_s

# the run-time scale: each completed batch moves it a fifth of the way; one odd batch moves it little
SCALE_WEIGHT = 0.2
MIN_SCALE, MAX_SCALE = 0.1, 10.0


def queued_work_s(columns: BatchColumns) -> float:
    """Sum of the queued batches' run-time estimates (cached, else the fallback guess), seconds."""
    if len(columns.size) == 0:
        return 0.0
    fallback = fallback_estimate_s(columns.size, columns.input_max, columns.gen_max)
    estimates = np.where(np.isfinite(columns.estimate_s), columns.estimate_s, fallback)
    return float(estimates[columns.size > 0].sum())


def queue_wait_s(queued_s: float, num_lanes: int) -> float:
    """Seconds until a new request's batch starts: the queued work shared by the lanes.

    num_lanes < 1 (no worker registered yet) counts as one: a worker is expected, and refusing
    everything until one registers would turn a start-up race into errors.
    """
    return queued_s / max(1, num_lanes)


def own_run_s(input_tokens: int, gen_tokens: int) -> float:
    """The new request's own run time: the fallback guess for a batch of one, seconds."""
    return float(fallback_estimate_s(1, input_tokens, gen_tokens))


def wait_excess_s(wait_s: float, run_s: float, time_remaining_s: float | None, max_queue_wait_s: float) -> float:
    """How much too long the request would take, seconds; <= 0 means admit it.

    Too long: answered (wait + run) after the caller's deadline, or queued (wait) longer than
    max_queue_wait_s (0 = no cap). The cap is on queueing alone, so that a long request is never
    refused for its own length, only for the backlog ahead of it.
    """
    excess_s = float("-inf")
    if time_remaining_s is not None:
        excess_s = wait_s + run_s - time_remaining_s
    if max_queue_wait_s > 0:
        excess_s = max(excess_s, wait_s - max_queue_wait_s)
    return excess_s


def updated_scale(scale: float, estimated_s: float, actual_s: float, num_samples: int) -> float:
    """The run-time scale after a batch estimated at `estimated_s` ran `actual_s` seconds, given
    `num_samples` batches learned from before: their plain mean at first (the first batch sets it),
    then a moving average with weight SCALE_WEIGHT; each ratio actual / estimated clamped to
    [MIN_SCALE, MAX_SCALE]. Unchanged when either time is not positive (nothing to learn)."""
    if estimated_s <= 0 or actual_s <= 0:
        return scale
    ratio = min(MAX_SCALE, max(MIN_SCALE, actual_s / estimated_s))
    weight = max(SCALE_WEIGHT, 1.0 / (num_samples + 1))
    return (1.0 - weight) * scale + weight * ratio


def running_left_s(scaled_estimates_s: list[float], elapsed_s: list[float]) -> float:
    """What is left of the running batches, seconds: each one's estimate less its time so far, >= 0."""
    return sum(max(0.0, estimate_s - ran_s) for estimate_s, ran_s in zip(scaled_estimates_s, elapsed_s, strict=True))


def misses_deadline(run_s: float, now_s: float, deadlines_s: list[float | None]) -> bool:
    """Whether a batch starting at `now_s` and running `run_s` seconds answers after the tightest of
    its members' deadlines (monotonic seconds; None = no deadline). The scheduler then splits it at
    lease time: a batch grows after each member's admission check, so only the lease sees its size."""
    tightest_s = min((d for d in deadlines_s if d is not None), default=None)
    return tightest_s is not None and now_s + run_s > tightest_s


class CompletionRate:
    """Requests answered per second over the last `window_s` seconds (times passed in: pure).

    The second opinion of deadline-aware admission (Little's law): a new request waits about
    pending / rate, whatever the estimates say. Under overload the estimates err (the rows a batch
    will gain, halves split off at lease time, a machine slowed by its neighbours) while the measured
    rate already contains all of it.
    """

    def __init__(self, window_s: float = 10.0) -> None:
        self._window_s = window_s
        self._events: deque[tuple[float, int]] = deque()  # (monotonic s, requests answered), oldest first
        self._num_requests = 0  # summed over _events: per_s runs at every admission, in O(1)

    def add(self, now_s: float, num_requests: int) -> None:
        self._events.append((now_s, num_requests))
        self._num_requests += num_requests
        self._forget_before(now_s - self._window_s)

    def per_s(self, now_s: float) -> float | None:
        """The rate, or None with fewer than two completions or under a second between them."""
        self._forget_before(now_s - self._window_s)  # times only move forward: what left the window stays out
        if len(self._events) < 2 or now_s - self._events[0][0] < 1.0:
            return None
        first_s, first_num = self._events[0]
        return (self._num_requests - first_num) / (now_s - first_s)

    def _forget_before(self, since_s: float) -> None:
        while self._events and self._events[0][0] < since_s:
            self._num_requests -= self._events.popleft()[1]


def littles_wait_s(num_pending: int, completions_per_s: float | None) -> float:
    """Seconds until the pending requests ahead are answered at the measured rate; 0 when unknown."""
    if not completions_per_s:
        return 0.0
    return num_pending / completions_per_s
