"""The worker's metrics: batches run by outcome, valid and total decode tokens, run and busy time.

Utilisation is `rate(magnus_worker_busy_seconds_total[5m])` (seconds busy per second), which
stays right across scrapes of any interval, unlike a 0/1 gauge sampled now and then.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from prometheus_client import Counter, Gauge, Histogram

from services.shared.db.models import BatchOutcome

if TYPE_CHECKING:
    from services.worker.paged.scheduler import Scheduler

RUN_BUCKETS_S = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600)

BATCHES = Counter("magnus_worker_batches_total", "Batches this worker ran, by outcome (ok, oom, failed).", ["outcome"])
VALID_TOKENS = Counter("magnus_worker_valid_tokens_total", "Tokens generated for requests (no padding).")
SLOT_TOKENS = Counter(
    "magnus_worker_slot_tokens_total", "Decode slots run: batch size x decode steps, padding included."
)
RUN_TIME = Histogram("magnus_worker_batch_run_seconds", "Engine time of each batch, seconds.", buckets=RUN_BUCKETS_S)
BUSY_SECONDS = Counter("magnus_worker_busy_seconds_total", "Seconds spent running batches.")
IS_BUSY = Gauge("magnus_worker_busy", "1 while this worker runs a batch, else 0.")
CANCELLED_REQUESTS = Counter(
    "magnus_worker_cancelled_requests_total",
    "Continuous mode: requests stopped before their end because the batcher said their callers left or "
    "their lease moved on (or the worker abandoned them at shutdown).",
)


def observe_batch(outcome: str, busy_s: float, *, run_s: float = 0.0, valid_tokens: int = 0, total_tokens: int = 0) -> None:
    """One batch ended on this worker: `ok` (with its engine numbers), `oom` or `failed`."""
    BATCHES.labels(outcome=outcome).inc()
    BUSY_SECONDS.inc(max(0.0, busy_s))
    if outcome == BatchOutcome.OK:
        RUN_TIME.observe(run_s)
        VALID_TOKENS.inc(valid_tokens)
        SLOT_TOKENS.inc(total_tokens)

# continuous mode: where the decode thread's time goes (steps, joiner prefills, the rest = host work)
CONTINUOUS_STEPS = Counter("magnus_worker_continuous_steps_total", "Decode steps of the continuous batch.")
CONTINUOUS_STEP_SECONDS = Counter(
    "magnus_worker_continuous_step_seconds_total", "Seconds in continuous decode steps (host sync included)."
)
CONTINUOUS_ACTIVE_ROW_STEPS = Counter(
    "magnus_worker_continuous_active_row_steps_total", "Rows running summed over decode steps (occupancy)."
)
CONTINUOUS_PREFILLS = Counter("magnus_worker_continuous_prefills_total", "Joiner prefills (one per group).")
CONTINUOUS_PREFILL_ROWS = Counter("magnus_worker_continuous_prefill_rows_total", "Requests prefilled into rows.")
CONTINUOUS_PREFILL_SECONDS = Counter(
    "magnus_worker_continuous_prefill_seconds_total", "Seconds in joiner prefills (host sync included)."
)
CONTINUOUS_LONG_RUNS = Counter(
    "magnus_worker_continuous_long_runs_total", "Requests too long for a row, run alone after the rows drained."
)
# paged engine (MAGNUS_WORKER_BACKEND=paged); its steps count in the continuous_* counters above
PAGED_PREEMPTIONS = Counter(
    "magnus_worker_paged_preemptions_total", "Running requests preempted because the KV blocks ran out."
)
PAGED_RECOMPUTED_TOKENS = Counter(
    "magnus_worker_paged_recomputed_tokens_total", "Cached tokens thrown away by preemptions (prefilled again)."
)
PAGED_DECODE_ONLY_STEPS = Counter(
    "magnus_worker_paged_decode_only_steps_total", "Paged steps of decode rows only (graph-replayed; the rest are mixed)."
)
PAGED_DECODE_ONLY_STEP_SECONDS = Counter(
    "magnus_worker_paged_decode_only_step_seconds_total", "Time of the paged decode-only steps, seconds."
)
PAGED_BATCHED_TOKENS = Counter(
    "magnus_worker_paged_batched_tokens_total", "Tokens the paged steps computed (decode rows + prefill chunks)."
)
PAGED_DRAFT_TOKENS = Counter(
    "magnus_worker_paged_draft_tokens_total",
    "Tokens drafted by prompt lookup and verified (MAGNUS_WORKER_PAGED_DRAFT_TOKENS).",
)
PAGED_ACCEPTED_DRAFT_TOKENS = Counter(
    "magnus_worker_paged_accepted_draft_tokens_total",
    "Drafted tokens the model agreed with: each saved its request a step.",
)
PAGED_RUNNING_REQUESTS = Gauge("magnus_worker_paged_running_requests", "Requests running in the paged engine now.")
PAGED_WAITING_REQUESTS = Gauge(
    "magnus_worker_paged_waiting_requests", "Requests in the paged engine waiting to be admitted (preempted ones too)."
)
PAGED_MAX_RUNNING_REQUESTS = Gauge(
    "magnus_worker_paged_max_running_requests", "Most requests the paged engine ran at once since the worker started."
)


def track_paged(scheduler: Scheduler) -> None:
    """Export the paged scheduler's queue sizes, read at each scrape (plain int reads: no lock)."""
    PAGED_RUNNING_REQUESTS.set_function(lambda: len(scheduler.running))
    PAGED_WAITING_REQUESTS.set_function(lambda: scheduler.num_waiting)
    PAGED_MAX_RUNNING_REQUESTS.set_function(lambda: scheduler.max_running_seen)
