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
from services.worker.paged.runner import ModelRunner
from services.worker.paged.scheduler import FinishReason, Request, Scheduler, SchedulerConfig


@dataclass(frozen=True)
class RequestResult:
    request_id: Hashable
    prompt_tokens: int
    output_ids: list[int]  # generated tokens, the stop token (EOS) included when it ended on one
    finish_reason: FinishReason
    num_preemptions: int
    num_recomputed_tokens: int  # cached tokens its preemptions threw away (prefilled again)
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
    """Add requests, call `step` until `has_unfinished` is False; results come back from `step`."""

    def __init__(self, runner: ModelRunner, scheduler: Scheduler, clock: Callable[[], float] = time.monotonic) -> None:
        if scheduler.pool.num_blocks > runner.num_blocks or runner.block_tokens != scheduler.pool.block_tokens:
            raise ValueError("the scheduler's pool must be blocks of the runner's cache (as many or fewer)")
        self.runner, self.scheduler, self.clock = runner, scheduler, clock
        self.stats = EngineStats()
        self.on_tokens: Callable[[dict[Hashable, int]], None] | None = None  # each step's sampled tokens
        self._timings: dict[Hashable, _Timing] = {}

    @classmethod
    def build(cls, runner: ModelRunner, config: SchedulerConfig, stop_ids: Iterable[int] = (),
              **options) -> PagedEngine:
        """A scheduler over a fresh BlockPool of the runner's blocks."""
        pool = BlockPool(runner.num_blocks, runner.block_tokens)
        return cls(runner, Scheduler(config, pool, stop_ids), **options)

    @property
    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished

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
        """One engine step; returns the requests that finished in it."""
        started_s = self.clock()
        plan = self.scheduler.schedule()
        sampled = self.runner.step(self.runner.prepare(plan)) if not plan.is_empty else {}
        finished = self.scheduler.update(plan, sampled)
        self._account(plan, sampled, started_s)
        if self.on_tokens is not None and sampled:
            self.on_tokens(sampled)
        return [self._result(request) for request in finished]

    def run(self) -> dict[Hashable, RequestResult]:
        """Step until every added request finished; their results by id."""
        results = {}
        while self.has_unfinished:
            results.update((r.request_id, r) for r in self.step())
        return results

    def _account(self, plan, sampled, started_s: float) -> None:
        if plan.is_empty and self.has_unfinished:
            raise RuntimeError("the scheduler planned nothing while requests wait: a request no pool state admits")
        now_s = self.clock()
        stats = self.stats
        stats.steps += 1
        stats.decode_only_steps += plan.is_decode_only
        stats.batched_tokens += plan.num_batched_tokens
        stats.rows += len(plan.chunks)
        stats.step_s += now_s - started_s
        if plan.is_decode_only:
            stats.decode_only_step_s += now_s - started_s
        for chunk in plan.chunks:
            timing = self._timings.get(chunk.request_id)
            if timing is not None and timing.scheduled_s is None:
                timing.scheduled_s = started_s
        for request_id in sampled:
            timing = self._timings.get(request_id)
            if timing is not None and timing.first_token_s is None:
                timing.first_token_s = now_s

    def _result(self, request: Request) -> RequestResult:
        timing = self._timings.pop(request.request_id)
        now_s = self.clock()

        def since_added(then_s: float | None) -> float:
            return 0.0 if then_s is None else then_s - timing.added_s

        return RequestResult(
            request_id=request.request_id, prompt_tokens=len(request.prompt_ids), output_ids=list(request.output_ids),
            finish_reason=request.finish_reason, num_preemptions=request.num_preemptions,
            num_recomputed_tokens=request.num_recomputed_tokens, queued_s=since_added(timing.scheduled_s),
            first_token_s=since_added(timing.first_token_s), total_s=now_s - timing.added_s,
        )
