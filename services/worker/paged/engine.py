"""The paged continuous engine: schedule -> run -> postprocess, one step at a time (issue 23).

nano-vllm's loop: the Scheduler plans which tokens the step computes (and moves blocks), the
ModelRunner computes them and samples, the Scheduler applies the sampled tokens and says who
finished. This class adds only what a caller wants back: per request its tokens, why it ended,
how often it was preempted, and when it was queued, first scheduled and answered. Not thread-safe:
one thread owns an engine (the worker's `PagedBatcher` does).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass

from services.worker.paged.kv_blocks import BlockPool
from services.worker.paged.runner import LaunchedStep, ModelRunner
from services.worker.paged.scheduler import FinishReason, Request, Scheduler, SchedulerConfig, StepPlan


@dataclass(frozen=True)
class RequestResult:
    request_id: Hashable
    prompt_tokens: int
    output_ids: list[int]  # generated tokens, the stop token (EOS) included when it ended on one
    finish_reason: FinishReason
    num_preemptions: int
    num_recomputed_tokens: int  # cached tokens its preemptions threw away (prefilled again)
    num_draft_tokens: int  # drafted by prompt lookup and verified (speculation.py)
    num_accepted_tokens: int  # drafts kept: steps saved
    queued_s: float  # added -> first scheduled, seconds (0 if never scheduled)
    first_token_s: float  # added -> first output token, seconds (0 if none)
    total_s: float  # added -> finished, seconds


@dataclass
class _Timing:
    added_s: float
    scheduled_s: float | None = None
    first_token_s: float | None = None


@dataclass
class EngineStats:
    steps: int = 0
    decode_only_steps: int = 0
    batched_tokens: int = 0  # summed over steps
    rows: int = 0  # chunks summed over steps
    step_s: float = 0.0  # prepare + run + sample (+ scheduling), summed
    decode_only_step_s: float = 0.0  # the same, steps of decode rows only


class PagedEngine:
    """Add requests, call `step` until `has_unfinished` is False; results come back from `step`.

    overlap: plan and prepare step N+1 while step N runs on the device (vLLM v1's async scheduling):
    each `step` launches the next step before reading the previous one's tokens, and a decode row
    takes its token from the previous step's output on the device. A request that samples a stop
    token at N has computed one more token at N+1 by the time that is known; it is dropped. A step
    with drafts (`SchedulerConfig.draft_tokens`), or one after which the scheduler may draft, is read
    before the next is planned: drafts need every token known, and a verified chunk's length is known
    only once read. So speculation trades the overlap for fewer steps, and only at few running rows."""

    def __init__(self, runner: ModelRunner, scheduler: Scheduler, clock: Callable[[], float] = time.monotonic,
                 *, overlap: bool = False) -> None:
        if scheduler.pool.num_blocks > runner.num_blocks or runner.block_tokens != scheduler.pool.block_tokens:
            raise ValueError("the scheduler's pool must be blocks of the runner's cache (as many or fewer)")
        self.runner, self.scheduler, self.clock = runner, scheduler, clock
        self.overlap = overlap
        self._running: tuple[StepPlan, LaunchedStep] | None = None  # overlap: the step launched, not yet read
        self.stats = EngineStats()
        # each step's new tokens per request (several where drafts were kept)
        self.on_tokens: Callable[[dict[Hashable, list[int]]], None] | None = None
        self._timings: dict[Hashable, _Timing] = {}

    @classmethod
    def build(cls, runner: ModelRunner, config: SchedulerConfig, stop_ids: Iterable[int] = (),
              **options) -> PagedEngine:
        """A scheduler over a fresh BlockPool of the runner's blocks."""
        pool = BlockPool(runner.num_blocks, runner.block_tokens)
        return cls(runner, Scheduler(config, pool, stop_ids), **options)

    @property
    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished or self._running is not None

    def add_request(self, request_id: Hashable, prompt_ids: list[int], max_new_tokens: int,
                    predicted_tokens: int = 0, replay_tokens: int = 0) -> None:
        """Queue a request (greedy, stops at a stop token or max_new_tokens; after `replay_tokens`
        too when > 0, see `Request`). ValueError when it can never run here (longer than the KV
        pool) or is malformed."""
        self.scheduler.add(Request(request_id, list(prompt_ids), max_new_tokens, predicted_tokens,
                                   replay_tokens=replay_tokens))
        self._timings[request_id] = _Timing(self.clock())

    def abort(self, request_id: Hashable) -> RequestResult | None:
        request = self.scheduler.abort(request_id)
        return None if request is None else self._result(request)

    def step(self) -> list[RequestResult]:
        """One engine step; returns the requests that finished in it (overlap: in the step before)."""
        if self.overlap:
            return self._step_overlapped()
        started_s = self.clock()
        plan = self.scheduler.schedule()
        sampled = self.runner.step(self.runner.prepare(plan)) if not plan.is_empty else {}
        finished = self.scheduler.update(plan, sampled)
        self._account(plan, started_s)
        self._note_tokens(self.scheduler.resolved)
        return [self._result(request) for request in finished]

    def _step_overlapped(self) -> list[RequestResult]:
        """Plan, prepare and launch step N+1 while step N runs, then read N's tokens and apply them
        (N first, when N has drafts or N+1 may: see the class docstring)."""
        started_s = self.clock()
        running, self._running = self._running, None
        has_read = running is not None
        finished, kept = [], {}
        if has_read and (running[0].num_draft_tokens or self.scheduler.drafts_next_step):
            finished, kept = self._read(*running), self.scheduler.resolved
            running = None
        plan = self.scheduler.schedule()
        if not plan.is_empty:
            launched = self.runner.launch(self.runner.prepare(plan, previous=running and running[1]))
            self.scheduler.commit(plan)
            self._running = (plan, launched)
        if running is not None:
            finished, kept = self._read(*running), self.scheduler.resolved
        self._account(plan, started_s, draining=has_read)
        self._note_tokens(kept)
        return [self._result(request) for request in finished]

    def _read(self, plan: StepPlan, launched: LaunchedStep) -> list:
        """Wait for a launched step and apply its tokens; the requests it finished."""
        return self.scheduler.resolve(plan, self.runner.collect(launched))

    def run(self) -> dict[Hashable, RequestResult]:
        """Step until every added request finished; their results by id."""
        results = {}
        while self.has_unfinished:
            results.update((r.request_id, r) for r in self.step())
        return results

    def _account(self, plan: StepPlan, started_s: float, draining: bool = False) -> None:
        """draining (overlap): a step was read in this call, so an empty plan need not mean a stall."""
        if plan.is_empty and not draining and self.scheduler.has_unfinished:
            raise RuntimeError("the scheduler planned nothing while requests wait: a request no pool state admits")
        now_s = self.clock()
        stats = self.stats
        if plan.is_empty and draining:
            return
        stats.steps += 1
        stats.decode_only_steps += plan.is_decode_only
        stats.batched_tokens += plan.num_batched_tokens
        stats.rows += len(plan.chunks)
        stats.step_s += now_s - started_s  # overlap: from planning this step to reading the one before
        if plan.is_decode_only:
            stats.decode_only_step_s += now_s - started_s
        for chunk in plan.chunks:
            timing = self._timings.get(chunk.request_id)
            if timing is not None and timing.scheduled_s is None:
                timing.scheduled_s = started_s

    def _note_tokens(self, kept: dict[Hashable, list[int]]) -> None:
        """First-token times, and the step's kept tokens to `on_tokens`."""
        now_s = self.clock()
        for request_id in kept:
            timing = self._timings.get(request_id)
            if timing is not None and timing.first_token_s is None:
                timing.first_token_s = now_s
        if self.on_tokens is not None and kept:
            self.on_tokens(kept)

    def _result(self, request: Request) -> RequestResult:
        timing = self._timings.pop(request.request_id)
        now_s = self.clock()

        def since_added(then_s: float | None) -> float:
            return 0.0 if then_s is None else then_s - timing.added_s

        return RequestResult(
            request_id=request.request_id, prompt_tokens=len(request.prompt_ids), output_ids=list(request.output_ids),
            finish_reason=request.finish_reason, num_preemptions=request.num_preemptions,
            num_recomputed_tokens=request.num_recomputed_tokens, num_draft_tokens=request.num_draft_tokens,
            num_accepted_tokens=request.num_accepted_tokens, queued_s=since_added(timing.scheduled_s),
            first_token_s=since_added(timing.first_token_s), total_s=now_s - timing.added_s,
        )
