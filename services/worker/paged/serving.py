"""The paged engine behind the worker's continuous pull loop (MAGNUS_WORKER_BACKEND=paged).

`PagedBatcher` has `ContinuousBatcher`'s face (submit -> future, free_slots, on_slot_freed, warm_up,
start, stop), so `ContinuousWorkerLoop` serves leases with it unchanged: one lease client for both.
One daemon thread owns the PagedEngine and the device; other threads only submit and read counts.
Each turn of the thread takes the submitted requests in (tokenized, validated: a bad one fails
alone), drops the ones whose callers cancelled (their blocks free), runs one engine step, hands
streamed requests' new tokens to the token sink and resolves the finished ones.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, replace

import torch

from services.worker import metrics
from services.worker.engine_thread import ContinuousResult, EngineThread, finished_result, resolve
from services.worker.engine import (
    BatchCancelled,
    BatchOutOfMemory,
    BatchRejected,
    EngineItem,
    StaticBatchEngine,
    is_out_of_memory,
)
from services.worker.paged.engine import EngineStats, PagedEngine, RequestResult
from services.worker.paged.decode_step import PagedDecoder, PagedModelConfig, PagedWeights
from services.worker.paged.runner import DEFAULT_MIXED_GRAPH_TOKENS, ModelRunner
from services.worker.paged.scheduler import SchedulerConfig

log = logging.getLogger(__name__)

# Trace replay (benchmarks on random weights) sends the recorded output length as max_new_tokens.
# The engine ends the request there, but admits it as a client's request of this many (the KV
# the old continuous rows reserved): else every admission would plan with the true length.
REPLAY_ADMISSION_TOKENS = 1024


@dataclass
class _Pending:
    item: EngineItem
    future: Future
    submitted_s: float
    key: int = 0  # the engine's id for it: unique even when a requeued lease brings a request id back


def build_paged_engine(hf_engine: StaticBatchEngine, config: SchedulerConfig, *, block_tokens: int = 16,
                       cpu_kv_budget_bytes: int, cuda_reserve_bytes: int, use_cuda_graphs: bool = True,
                       mixed_graphs: bool = True, overlap: bool = False) -> PagedEngine:
    """A PagedEngine over `hf_engine`'s model weights, shared (its tokenizer and stop tokens stay
    there). The KV pool takes `cpu_kv_budget_bytes` on a CPU; on CUDA what is free once q/k/v and
    gate/up are fused, less `cuda_reserve_bytes` (activations of a step, allocator slack).
    mixed_graphs: with use_cuda_graphs, steps with prefill chunks are captured too (else eager).
    overlap: PagedEngine's (step N+1 launched before step N is read)."""
    model = hf_engine.model
    weights = PagedWeights.from_hf(model, share=True)  # the model's forward still works (calibration runs it)
    if hf_engine.device.type == "cuda":
        kv_bytes = torch.cuda.mem_get_info(hf_engine.device)[0] - cuda_reserve_bytes
    else:
        kv_bytes = cpu_kv_budget_bytes
    num_blocks = kv_bytes // (hf_engine.kv_bytes_per_token * block_tokens)
    if num_blocks < 1:
        raise ValueError(f"{kv_bytes} bytes hold no KV block of {block_tokens} tokens "
                         f"({hf_engine.kv_bytes_per_token} bytes a token)")
    decoder = PagedDecoder(PagedModelConfig.from_hf(model.config), weights, num_blocks, block_tokens)
    runner = ModelRunner(decoder, use_cuda_graphs=use_cuda_graphs,
                         max_model_tokens=min(hf_engine.max_context_tokens, num_blocks * block_tokens),
                         max_graph_chunks=config.max_running,
                         mixed_graph_tokens=DEFAULT_MIXED_GRAPH_TOKENS if mixed_graphs else ())
    return PagedEngine.build(runner, config, hf_engine.stop_ids(stop_at_eos=not hf_engine.trace_replay),
                             overlap=overlap)


class PagedBatcher(EngineThread):
    """Keeps the paged engine stepping; `submit` from any thread, results arrive as futures."""

    def __init__(self, hf_engine: StaticBatchEngine, engine: PagedEngine) -> None:
        super().__init__("paged engine")
        self.hf_engine, self.engine = hf_engine, engine
        self.slots = engine.scheduler.config.max_running  # requests the loop keeps in hand
        self.capacity_tokens = engine.scheduler.pool.num_blocks * engine.scheduler.pool.block_tokens
        engine.on_tokens = self._stream
        self._submitted: deque[_Pending] = deque()  # guarded by _cond
        self._num_in_hand = 0  # guarded by _cond: submitted and not yet resolved
        self._in_engine: dict[int, _Pending] = {}  # engine thread only
        self._keys = itertools.count()
        # engine thread: the scheduler's counts last exported
        self._num_preemptions = self._num_recomputed_tokens = self._num_draft_tokens = self._num_accepted_tokens = 0
        self._exported_stats = EngineStats()  # engine thread: the engine's stats as last exported

    # ---- any thread ----------------------------------------------------------------------------
    def _enqueue(self, item: EngineItem, future: Future, submitted_s: float) -> None:
        self._submitted.append(_Pending(item, future, submitted_s))
        self._num_in_hand += 1

    def free_slots(self) -> int:
        with self._cond:
            return max(0, self.slots - self._num_in_hand)

    def warm_up(self, max_attend_tokens: int = 0) -> None:
        """Before start(): capture the decode graphs of every row bucket and the mixed graphs of every
        token bucket up to the token budget (CUDA only)."""
        started_s = time.monotonic()
        runner = self.engine.runner
        # every row bucket: steps of decode rows plus short prefills run as rows of the larger ones
        if captured := runner.warm_up(runner.graph_rows[-1], self.engine.scheduler.config.token_budget):
            log.info("paged engine: captured %d step graphs (%d mixed) in %.1f s", captured,
                     runner.num_mixed_graph_captures, time.monotonic() - started_s)

    # ---- the engine thread ---------------------------------------------------------------------
    def _serve(self) -> None:
        while (submitted := self._next_submitted()) is not None:
            for pending in submitted:
                self._add(pending)
            self._drop_cancelled()
            if self.engine.has_unfinished:
                self._step_or_fail()

    def _next_submitted(self) -> list[_Pending] | None:
        """The requests submitted since the last turn; blocks while there is no work at all; None
        once stopping (and, without cancel, drained)."""
        with self._cond:
            if not self._wait_for_work(lambda: not self._submitted and not self.engine.has_unfinished):
                return None
            submitted, self._submitted = list(self._submitted), deque()
        return submitted

    def _add(self, pending: _Pending) -> None:
        item = pending.item
        try:
            if pending.future.cancelled():
                raise BatchCancelled("cancelled before it started")
            if item.max_new_tokens < 1:
                raise BatchRejected(f"max_new_tokens must be >= 1, got {item.max_new_tokens}")
            prompt = self.hf_engine.encode([item.prompt])[0] or [self.hf_engine.eos_token_ids[0]]
            if len(prompt) + item.max_new_tokens > self.hf_engine.max_context_tokens:
                raise BatchRejected(f"prompt + max_new_tokens = {len(prompt) + item.max_new_tokens} tokens exceeds "
                                    f"the model's context of {self.hf_engine.max_context_tokens}")
            pending.key = next(self._keys)
            max_new_tokens, replay_tokens = item.max_new_tokens, 0
            if self.hf_engine.trace_replay:  # the recorded length ends it; admission must not see it
                replay_tokens = item.max_new_tokens
                max_new_tokens = max(replay_tokens, min(REPLAY_ADMISSION_TOKENS,
                                                        self.hf_engine.max_context_tokens - len(prompt),
                                                        self.capacity_tokens - len(prompt)))
            try:
                self.engine.add_request(pending.key, prompt, max_new_tokens, item.predicted_tokens,
                                        replay_tokens=replay_tokens)
            except ValueError as error:  # longer than the KV pool
                raise BatchRejected(str(error)) from error
        except Exception as error:  # one request's failure must not stop the others
            if not isinstance(error, (BatchRejected, BatchCancelled)):
                log.exception("request %s failed to join", item.request_id)
            self._resolve(pending, error=error)
            return
        self._in_engine[pending.key] = pending

    def _drop_cancelled(self) -> None:
        for key, pending in list(self._in_engine.items()):
            if pending.future.cancelled():
                log.info("request %s cancelled: its blocks free", pending.item.request_id)
                self.engine.abort(key)
                self._resolve(self._in_engine.pop(key))

    def _step_or_fail(self) -> None:
        started_s = time.perf_counter()
        try:
            finished = self.engine.step()
        except Exception as error:  # fail the requests in hand, keep serving
            log.exception("paged engine step failed: failing its %d requests", len(self._in_engine))
            if is_out_of_memory(error):
                error = BatchOutOfMemory(f"out of memory in a paged step of {len(self._in_engine)} requests: {error}")
            for key in list(self._in_engine):
                self.engine.abort(key)
                self._resolve(self._in_engine.pop(key), error=error)
            return
        self._count(time.perf_counter() - started_s)
        for result in finished:
            pending = self._in_engine.pop(result.request_id)
            self._resolve(pending, self._result(pending, result))

    def _count(self, step_s: float) -> None:
        scheduler = self.engine.scheduler
        metrics.CONTINUOUS_STEPS.inc()
        metrics.CONTINUOUS_STEP_SECONDS.inc(step_s)
        metrics.CONTINUOUS_ACTIVE_ROW_STEPS.inc(len(scheduler.running))
        metrics.PAGED_PREEMPTIONS.inc(scheduler.num_preemptions - self._num_preemptions)
        metrics.PAGED_RECOMPUTED_TOKENS.inc(scheduler.num_recomputed_tokens - self._num_recomputed_tokens)
        self._num_preemptions, self._num_recomputed_tokens = scheduler.num_preemptions, scheduler.num_recomputed_tokens
        metrics.PAGED_DRAFT_TOKENS.inc(scheduler.num_draft_tokens - self._num_draft_tokens)
        metrics.PAGED_ACCEPTED_DRAFT_TOKENS.inc(scheduler.num_accepted_tokens - self._num_accepted_tokens)
        self._num_draft_tokens, self._num_accepted_tokens = scheduler.num_draft_tokens, scheduler.num_accepted_tokens
        stats, exported = self.engine.stats, self._exported_stats
        metrics.PAGED_DECODE_ONLY_STEPS.inc(stats.decode_only_steps - exported.decode_only_steps)
        metrics.PAGED_DECODE_ONLY_STEP_SECONDS.inc(stats.decode_only_step_s - exported.decode_only_step_s)
        metrics.PAGED_BATCHED_TOKENS.inc(stats.batched_tokens - exported.batched_tokens)
        self._exported_stats = replace(stats)

    def _stream(self, kept: dict[int, list[int]]) -> None:
        sink = self.hf_engine.token_sink
        if sink is None:
            return
        new_tokens = {p.item.request_id: tokens for key, tokens in kept.items()
                      if (p := self._in_engine.get(key)) is not None and p.item.is_streamed}
        if new_tokens:
            sink.add_tokens(new_tokens)

    def _result(self, pending: _Pending, result: RequestResult) -> ContinuousResult:
        if result.num_preemptions:
            log.info("request %s: %d preemptions, %d tokens recomputed", pending.item.request_id,
                     result.num_preemptions, result.num_recomputed_tokens)
        return finished_result(self.hf_engine.tokenizer, pending.item.request_id, result.output_ids,
                               submitted_s=pending.submitted_s, queued_s=result.queued_s,
                               total_tokens=len(result.output_ids))

    def _resolve(self, pending: _Pending, result: ContinuousResult | None = None,
                 error: BaseException | None = None) -> None:
        with self._cond:
            self._num_in_hand -= 1
        resolve(pending.future, result, error)
        self._notify_slot_freed()

    def _fail_all(self, error: BaseException) -> None:
        for key in list(self._in_engine):
            self.engine.abort(key)
            self._resolve(self._in_engine.pop(key), error=error)
        with self._cond:
            submitted, self._submitted = list(self._submitted), deque()
        for pending in submitted:
            self._resolve(pending, error=error)
