"""The batcher's domain objects: requests in flight, their results, workers, leases."""

from __future__ import annotations

import asyncio
import hashlib
import json
from dataclasses import dataclass, field
from datetime import datetime

from services.batcher.policy.batch import QueuedBatch


@dataclass(frozen=True)
class GenerationInput:
    """A validated client request."""

    instruction: str
    user_input: str
    max_new_tokens: int
    client_request_id: str
    tenant_id: str

    def request_sha256(self) -> str:
        """Hex SHA-256 of what decides the answer, to tell a retry from another request under the same
        idempotency key. The same function hashes a logged row (logged_results), so a field that
        changes the answer must be added here and kept in the log.
        """
        return request_sha256(self.instruction, self.user_input, self.max_new_tokens)


def request_sha256(instruction: str, user_input: str, max_new_tokens: int) -> str:
    # JSON: an unambiguous encoding (no two field lists serialise alike)
    canonical = json.dumps([instruction, user_input, max_new_tokens], ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


@dataclass(frozen=True)
class Prediction:
    """What the predictor (or the fallback) said about one request."""

    input_tokens: int
    predicted_tokens: int
    model_version: int
    is_fallback: bool
    upper_tokens: int | None = None  # the predictor's upper estimate (>= predicted), when it gave one
    # The predictor's calibrated quantile at MAGNUS_BATCHER_PLAN_QUANTILE, when that is set and the
    # predictor gave that level; requests are then planned with it (see `planning_tokens`).
    quantile_tokens: int | None = None

    @property
    def planning_tokens(self) -> int:
        """The length the policy plans with, tokens: the plan quantile where there is one, else the
        point prediction (which stays what is logged and what the trainer scores)."""
        return self.predicted_tokens if self.quantile_tokens is None else self.quantile_tokens


@dataclass(frozen=True)
class RequestResult:
    request_id: str
    text: str
    generated_tokens: int
    predicted_tokens: int
    input_tokens: int
    batch_id: str
    batch_size: int
    queued_at: datetime
    started_at: datetime
    finished_at: datetime
    is_prediction_fallback: bool


class Phase:
    """Lifecycle events pushed to streaming callers."""

    QUEUED = "queued"
    STARTED = "started"


@dataclass
class PendingRequest:
    """A request from admission until its result is delivered. Owned by the Scheduler."""

    request_id: str
    generation: GenerationInput
    prediction: Prediction
    prompt: str
    arrival_s: float  # monotonic clock
    queued_at: datetime  # wall clock, for responses and the log
    future: asyncio.Future[RequestResult]
    events: asyncio.Queue[str] | None = None  # only for GenerateStream callers
    deadline_s: float | None = None  # monotonic clock: when the caller stops waiting (its gRPC deadline)
    started_at: datetime | None = None
    # straggler preemption: what earlier batches generated before they were cut
    output_so_far: str = ""
    tokens_so_far: int = 0
    num_preemptions: int = 0

    @property
    def remaining_new_tokens(self) -> int:
        return self.generation.max_new_tokens - self.tokens_so_far

    @property
    def lease_prompt(self) -> str:
        """What the worker runs: the prompt, continued by the output of batches that cut this request."""
        return self.prompt + self.output_so_far

    @property
    def input_tokens_now(self) -> int:
        return self.prediction.input_tokens + self.tokens_so_far


@dataclass
class WorkerInfo:
    worker_id: str
    kv_bytes_per_token: int
    free_kv_bytes: int
    max_batch_size: int  # 0 = no limit of its own
    model_name: str
    device: str
    last_seen_s: float
    max_context_tokens: int = 0  # prompt + max_new_tokens it can run, tokens; 0 = unknown
    incarnation_id: str = ""  # new at every process start; empty = an older worker that sends none


@dataclass
class Lease:
    """A batch handed to a worker; it must be renewed by Heartbeat before deadline_s."""

    batch: QueuedBatch
    worker_id: str
    deadline_s: float
    started_s: float
    started_at: datetime
    estimated_s: float
    items: list[PendingRequest] = field(default_factory=list)
    preempt_max_rows: int = 0  # the worker may cut this many stragglers after G(B) steps; 0 = never
    # requests whose callers left while the batch ran: out of `items`, told to the worker by Heartbeat
    cancelled_ids: set[str] = field(default_factory=set)


@dataclass(frozen=True)
class ItemOutput:
    request_id: str
    text: str
    generated_tokens: int
    is_preempted: bool = False  # the batch was cut before this request's stop: its output so far


@dataclass(frozen=True)
class BatchReport:
    """What a worker reported for a finished batch."""

    outputs: list[ItemOutput]
    run_s: float
    valid_tokens: int
    total_tokens: int
