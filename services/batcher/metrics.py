"""The batcher's domain metrics: queue depth, batch shapes, prediction and estimate errors, workers.

The Scheduler calls the `observe_*` functions at the moments it already handles (a lease, a
completion, a failure); queue depth and worker counts are read from it at scrape time, so they are
never stale and cost nothing between scrapes. Kept out of `policy/`, which stays pure.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from prometheus_client import Counter, Gauge, Histogram

from services.batcher.domain import BatchReport, Lease, RequestResult
from services.shared.db.models import BatchOutcome

if TYPE_CHECKING:
    from services.batcher.scheduler import Scheduler

# Batch sizes and token counts grow roughly geometrically in practice.
SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
TOKEN_ERROR_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000)
WMA_BUCKETS = (0, 100, 1_000, 5_000, 10_000, 50_000, 100_000, 500_000, 1_000_000, 5_000_000)
SECONDS_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
RATIO_BUCKETS = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0)

QUEUED_REQUESTS = Gauge("magnus_queue_requests", "Requests admitted and waiting in a queued batch.")
QUEUED_BATCHES = Gauge("magnus_queue_batches", "Batches waiting in the queue.")
PENDING_REQUESTS = Gauge("magnus_pending_requests", "Requests admitted and not yet answered (queued or running).")
LEASED_BATCHES = Gauge("magnus_leased_batches", "Batches leased to workers and running.")
WORKERS = Gauge("magnus_workers", "Workers registered with this batcher.")
BUSY_WORKERS = Gauge("magnus_workers_busy", "Registered workers holding a lease right now.")
WORKER_UTILISATION = Gauge(
    "magnus_worker_utilisation_ratio", "Busy workers / registered workers (0 when none is registered)."
)

BATCH_SIZE = Histogram("magnus_batch_size_requests", "Requests per batch handed to a worker.", buckets=SIZE_BUCKETS)
BATCH_WMA = Histogram(
    "magnus_batch_wma_token_reads",
    "Planned wasted memory access WMA(B) of each batch handed to a worker, KV-token reads.",
    buckets=WMA_BUCKETS,
)
BATCH_PADDING = Histogram(
    "magnus_batch_padding_ratio",
    "Share of a completed batch's decode slots (size x steps) that generated nothing: 1 - valid / total.",
    buckets=RATIO_BUCKETS,
)
QUEUE_WAIT = Histogram(
    "magnus_request_queue_wait_seconds", "Time from admission to the start of the request's batch.",
    buckets=SECONDS_BUCKETS,
)
BATCHES = Counter("magnus_batches_total", "Batches that ended, by outcome (ok, oom, failed, lost).", ["outcome"])
OOM_SPLITS = Counter("magnus_oom_splits_total", "Batches split in two after a worker ran out of memory.")
CANCELLED_REQUESTS = Counter(
    "magnus_cancelled_requests_total",
    "Requests dropped because their caller left (cancelled or past its deadline), by where they were: "
    "queued (no worker time spent) or running (the worker is told to stop).",
    ["stage"],
)
REJECTED_REQUESTS = Counter(
    "magnus_rejected_requests_total",
    "Requests refused at admission with RESOURCE_EXHAUSTED, by reason: queue_full, tenant_full, memory, "
    "wait (estimated wait past the caller's deadline or MAGNUS_BATCHER_MAX_QUEUE_WAIT_S).",
    ["reason"],
)
PREEMPTIONS = Counter("magnus_preemptions_total", "Requests cut from a batch as stragglers and requeued.")
LENGTH_ERROR = Histogram(
    "magnus_length_prediction_error_tokens",
    "|predicted - generated| tokens of each completed request.",
    buckets=TOKEN_ERROR_BUCKETS,
)
PREDICTED_TOKENS = Counter("magnus_predicted_tokens_total", "Predicted generation tokens of completed requests.")
GENERATED_TOKENS = Counter("magnus_generated_tokens_total", "Tokens generated for completed requests.")
ESTIMATE_ERROR = Histogram(
    "magnus_batch_time_estimate_error_seconds",
    "|estimated - actual| run time of each completed batch, seconds.",
    buckets=SECONDS_BUCKETS,
)

# streamed requests (GenerateStream): what their callers see, measured where the events leave
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.035, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0)
TIME_TO_FIRST_TOKEN = Histogram(
    "magnus_time_to_first_token_seconds",
    "Streamed requests: admission to the first token event sent to the caller, seconds.",
    buckets=TTFT_BUCKETS,
)
TIME_PER_OUTPUT_TOKEN = Histogram(
    "magnus_time_per_output_token_seconds",
    "Streamed requests: (finish - first token) / (generated tokens - 1), seconds per token.",
    buckets=TPOT_BUCKETS,
)
STREAMED_TOKEN_REPORTS = Counter(
    "magnus_streamed_token_deltas_total",
    "Per-request token deltas from workers' StreamTokens, by outcome: relayed, or dropped (a resent or late "
    "delta, a request whose caller left or that is not streamed).",
    ["outcome"],
)


LOG_BUFFERED_ROWS = Gauge(
    "magnus_log_buffered_rows", "Log rows kept in memory until the log DB takes them (grows while it is down)."
)
LOG_DROPPED_ROWS = Gauge(
    "magnus_log_dropped_rows", "Log rows dropped because the bounded buffer overflowed or shutdown cut it off."
)
LOG_WRITE_FAILURES = Gauge("magnus_log_write_failures", "Failed log DB writes (each retried later).")


def track_log_writer(writer: object) -> None:
    """Read the log writer's buffer and drop counts at scrape time: a DB outage is visible, not silent."""
    LOG_BUFFERED_ROWS.set_function(lambda: writer.num_buffered_rows)
    LOG_DROPPED_ROWS.set_function(lambda: writer.num_dropped_rows)
    LOG_WRITE_FAILURES.set_function(lambda: writer.num_write_failures)


def track_scheduler(scheduler: Scheduler) -> None:
    """Read queue depth and worker counts from `scheduler` whenever /metrics is scraped.

    One scheduler per process; a later call (tests build several) takes over the gauges.
    """
    QUEUED_REQUESTS.set_function(lambda: len(scheduler.batch_of))  # request id -> its queued batch
    QUEUED_BATCHES.set_function(lambda: len(scheduler.open_batches))
    PENDING_REQUESTS.set_function(lambda: len(scheduler.pending))
    LEASED_BATCHES.set_function(lambda: len(scheduler.leases))
    WORKERS.set_function(lambda: len(scheduler.workers))
    BUSY_WORKERS.set_function(lambda: _num_busy(scheduler))
    WORKER_UTILISATION.set_function(lambda: _num_busy(scheduler) / len(scheduler.workers) if scheduler.workers else 0.0)


def _num_busy(scheduler: Scheduler) -> int:
    return len({lease.worker_id for lease in scheduler.leases.values()} & scheduler.workers.keys())


def observe_lease(lease: Lease) -> None:
    """A batch was handed to a worker."""
    BATCH_SIZE.observe(lease.batch.size)
    BATCH_WMA.observe(lease.batch.wma)
    for request in lease.items:
        QUEUE_WAIT.observe(max(0.0, (lease.started_at - request.queued_at).total_seconds()))


def observe_completion(lease: Lease, report: BatchReport, results: Iterable[RequestResult]) -> None:
    """A batch came back with results: prediction, estimate and padding errors."""
    BATCHES.labels(outcome=BatchOutcome.OK).inc()
    for result in results:
        LENGTH_ERROR.observe(abs(result.predicted_tokens - result.generated_tokens))
        PREDICTED_TOKENS.inc(result.predicted_tokens)
        GENERATED_TOKENS.inc(result.generated_tokens)
    if lease.batch.estimator_version:  # the fallback guess is not the estimator's error
        ESTIMATE_ERROR.observe(abs(lease.estimated_s - report.run_s))
    if report.total_tokens > 0:
        BATCH_PADDING.observe(1.0 - report.valid_tokens / report.total_tokens)


def observe_failure(outcome: str, *, is_split: bool = False) -> None:
    """A leased batch ended without results: `oom`, `failed` or `lost` (lease expired)."""
    BATCHES.labels(outcome=outcome).inc()
    if is_split:
        OOM_SPLITS.inc()
