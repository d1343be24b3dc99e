"""The paged engine's scheduling vocabulary (issue 23): its settings, a request's state, and the plan of one
step. Plain data: the Scheduler (scheduler.py) owns and changes them; the runner, the engine and the benches
read them (scheduler.py re-exports every name, so `from services.worker.paged.scheduler import Request` works).
"""

from __future__ import annotations

import math
from collections.abc import Hashable
from dataclasses import dataclass, field
from enum import Enum, IntEnum
from functools import cached_property

from services.worker.paged.speculation import NgramIndex

RequestId = Hashable
# An output token a running step samples, not yet read (`Scheduler.commit`); a plan's decode row may
# carry it, for the runner to take from that step's output on the device
PENDING_TOKEN = -1


class Admission(str, Enum):
    PREDICTED = "predicted"
    GREEDY = "greedy"


class WaitOrder(str, Enum):
    FCFS = "fcfs"
    HRRN = "hrrn"
    HRRN_TAIL = "hrrn_tail"


class PreemptRule(str, Enum):
    MOST_WORK_LEFT = "most_work_left"
    YOUNGEST = "youngest"


class RequestStatus(IntEnum):
    """Ordered: every status from FINISHED_STOPPED on is final."""

    WAITING = 0
    RUNNING = 1
    PREEMPTED = 2
    FINISHED_STOPPED = 3
    FINISHED_LENGTH = 4
    FINISHED_ABORTED = 5

    @property
    def is_finished(self) -> bool:
        return self >= RequestStatus.FINISHED_STOPPED


class FinishReason(str, Enum):
    STOP = "stop"  # a stop token (EOS), kept as the last output token
    LENGTH = "length"  # max_new_tokens generated
    ABORT = "abort"  # cancelled by its caller


FINISH_REASONS = {
    RequestStatus.FINISHED_STOPPED: FinishReason.STOP,
    RequestStatus.FINISHED_LENGTH: FinishReason.LENGTH,
    RequestStatus.FINISHED_ABORTED: FinishReason.ABORT,
}


@dataclass(frozen=True)
class SchedulerConfig:
    max_running: int = 256  # requests running at once (rows of a step)
    token_budget: int = 2048  # tokens one step computes: decode rows plus prefill chunks
    admission: Admission = Admission.PREDICTED
    margin: float = 1.2  # predicted admission plans for predicted output tokens x this (a quantile's stand-in)
    order: WaitOrder = WaitOrder.FCFS
    preempt_rule: PreemptRule = PreemptRule.MOST_WORK_LEFT
    # static batches (the paper's `vs` on this engine): admit only when nothing runs, then up to
    # max_running at once (prefilled over as many steps as the token budget needs); the batch runs
    # until its last member ends
    static_batches: bool = False
    # speculative decoding by prompt lookup (speculation.py): a decoding request drafts up to
    # draft_tokens tokens a step while at most draft_max_rows requests run (a step of few rows is bound
    # by reading the weights, so verifying the drafts costs little there); 0 = off
    draft_tokens: int = 0
    draft_max_rows: int = 16

    def __post_init__(self) -> None:
        if self.max_running < 1:
            raise ValueError(f"max_running must be >= 1, got {self.max_running}")
        if self.token_budget < self.max_running:  # every running request decodes in every step
            raise ValueError(f"token_budget ({self.token_budget}) must be >= max_running ({self.max_running})")
        if not self.margin > 0:
            raise ValueError(f"margin must be > 0, got {self.margin}")
        if self.draft_tokens < 0 or self.draft_max_rows < 1:
            raise ValueError(f"need draft_tokens >= 0 and draft_max_rows >= 1, got {self.draft_tokens}, "
                             f"{self.draft_max_rows}")
        for name, kind in (("admission", Admission), ("order", WaitOrder), ("preempt_rule", PreemptRule)):
            object.__setattr__(self, name, kind(getattr(self, name)))  # a string names its member


@dataclass(eq=False)
class Request:
    """One request's state; the scheduler owns it once added."""

    request_id: RequestId
    prompt_ids: list[int]
    max_new_tokens: int
    predicted_tokens: int = 0  # predicted output length, tokens; 0 = unknown (max_new_tokens assumed)
    # trace replay (benchmarks on random weights): ends after this many output tokens as if on a
    # stop token, while admission still sees only max_new_tokens and the prediction; 0 = off
    replay_tokens: int = 0
    output_ids: list[int] = field(default_factory=list)
    status: RequestStatus = RequestStatus.WAITING
    num_computed_tokens: int = 0  # tokens whose K/V is in the cache
    num_preemptions: int = 0
    num_recomputed_tokens: int = 0  # cached tokens thrown away by preemptions (computed again on resume)
    num_pending_tokens: int = 0  # the last output_ids, PENDING_TOKEN: sampled by steps not yet resolved
    arrival_step: int = 0
    admitted_order: int = 0  # larger = admitted (or resumed) later
    num_draft_tokens: int = 0  # drafted and verified
    num_accepted_tokens: int = 0  # drafts the model agreed with (each saved a step)
    ngram_index: NgramIndex | None = None  # its known tokens, for drafting; made at its first draft
    num_draft_misses: int = 0  # drafting attempts in a row that kept no draft
    draft_rest_until: int = 0  # output tokens before which it does not draft (speculation.REST_TOKENS)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    def tokens(self, start: int, end: int) -> tuple[int, ...]:
        """Known tokens start..end-1 (prompt, then output)."""
        prompt = len(self.prompt_ids)
        return tuple(self.prompt_ids[start:end]) + tuple(self.output_ids[max(0, start - prompt):max(0, end - prompt)])

    @property
    def output_limit(self) -> int:
        """Output tokens at which it ends unless a stop token comes first (max_new_tokens, or replay_tokens)."""
        return min(self.max_new_tokens, self.replay_tokens) if self.replay_tokens else self.max_new_tokens

    @property
    def length_end(self) -> RequestStatus | None:
        """How its output tokens so far end it by length alone: STOPPED at replay_tokens (a replay ends as on
        a stop token), LENGTH at max_new_tokens; None before either."""
        generated = len(self.output_ids)
        if generated == self.replay_tokens:
            return RequestStatus.FINISHED_STOPPED
        return RequestStatus.FINISHED_LENGTH if generated >= self.max_new_tokens else None

    @property
    def predicted_output_tokens(self) -> int:
        return min(self.predicted_tokens, self.max_new_tokens) if self.predicted_tokens > 0 else self.max_new_tokens

    def predicted_total_tokens(self, margin: float) -> int:
        """Tokens it is predicted to hold at its end: prompt + predicted output x margin, capped at
        max_new_tokens, and at least one more than it holds (an under-predicted request grows on)."""
        output = min(self.max_new_tokens, max(math.ceil(self.predicted_output_tokens * margin),
                                              len(self.output_ids) + 1))
        return len(self.prompt_ids) + output

    @property
    def predicted_output_left(self) -> int:
        return max(0, self.predicted_output_tokens - len(self.output_ids))

    @property
    def finish_reason(self) -> FinishReason | None:
        return FINISH_REASONS.get(self.status)


@dataclass(frozen=True)
class ScheduledChunk:
    """Tokens of one request a step computes: token_ids at positions start_position.. of its sequence."""

    request_id: RequestId
    token_ids: tuple[int, ...]
    start_position: int  # tokens already cached; the chunk attends them and itself (causally)
    block_table: tuple[int, ...]  # the request's blocks, covering every position of the chunk
    is_sampled: bool  # the chunk ends the request's known tokens: the step samples its next token
    # the last num_drafts token_ids are drafts (speculation.py): the step samples after each of the
    # chunk's last num_drafts + 1 tokens
    num_drafts: int = 0

    @property
    def context_tokens(self) -> int:
        return self.start_position + len(self.token_ids)


@dataclass(frozen=True)
class StepPlan:
    chunks: tuple[ScheduledChunk, ...]  # decode rows (one token) first, then prefill chunks
    preempted: tuple[RequestId, ...]  # preempted while planning this step
    num_batched_tokens: int
    num_draft_tokens: int = 0  # drafts among its tokens: resolve this step before planning the next

    @property
    def is_empty(self) -> bool:
        return not self.chunks

    @cached_property  # the runner and the engine's accounting ask it of every step
    def is_decode_only(self) -> bool:
        return all(len(c.token_ids) == 1 for c in self.chunks)
