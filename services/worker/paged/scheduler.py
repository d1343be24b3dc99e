"""What each step of the paged continuous engine computes: admission, chunked prefill, preemption (issue 23).

Pure: plain data in, a plan out, no device and no clock (steps count time), as vLLM v1's scheduler.
One step's plan spends a token budget: first one token for every running request that decodes, then
chunks of running requests still prefilling, then chunks of requests it admits (Sarathi-Serve's
stall-free batching: a joiner never stops the running rows, a long prompt takes several steps).

Block rule: the pool holds a slot for every token a running request knows (its prompt and every
token generated so far), allocated whole at admission and one block at a time as it decodes.
- Admission (`Admission`): GREEDY admits while the free blocks hold the request's known tokens
  (vLLM's rule). PREDICTED admits only while the pool is predicted to hold every running request
  and the joiner at every future step (`projection.peak_blocks`): each grows a token a step until its
  predicted output x `margin` and then frees its blocks, so what must fit is the peak of that
  projection, not the sum of final sizes (S3's reservation of whole predicted lengths, which
  admits fewer: the requests do not all reach their ends at once). With predictions that are
  never short, nothing is preempted. Admission is in strict order (no request overtakes the
  head): nothing starves.
- Order among waiting requests (`WaitOrder`): FCFS keeps the order they came in (the batcher's
  lease order); HRRN takes the highest (waited steps + predicted steps) / predicted steps first,
  which ages every request. HRRN_TAIL first takes, longest first, every request whose predicted
  work is at least the steps the waiting queue needs to drain (its predicted work over
  max_running rows), then HRRN's order: under HRRN alone the longest requests of a burst start
  last and end long after the rest (a burst's end, and its p99, are theirs). Preempted requests
  resume before any waiting one.
- Preemption (`PreemptRule`): when the running requests' next tokens need more blocks than are
  free, a running request is preempted, its blocks freed: MOST_WORK_LEFT picks the one with the
  most predicted output left (it would hold its blocks longest; the youngest among equals),
  YOUNGEST the one admitted last (vLLM's). It resumes by recompute: its prompt and the tokens it
  generated are prefilled again. Preemptions and recomputed tokens are counted.
- Drafts (`draft_tokens`, off by default; speculation.py): while at most `draft_max_rows` requests run,
  a decoding request whose tokens are all known drafts up to that many tokens by prompt lookup; its
  chunk is its last token and the drafts, every position sampled, and `resolve` keeps the drafts the
  model agrees with plus its next token, giving back the slots of the others. Drafts take slots only
  from free blocks (never preempting),
  never run past the request's length, and a chunk with drafts must be resolved before the next step
  is planned (its request's position is known only then: the engine reads such a step first).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

from services.core.tail_guard import outlasts_drain
from services.worker.paged.projection import BlockProjection
from services.worker.paged.request import (  # noqa: F401 - re-exported: callers import these from here
    FINISH_REASONS,
    PENDING_TOKEN,
    Admission,
    FinishReason,
    PreemptRule,
    Request,
    RequestId,
    RequestStatus,
    ScheduledChunk,
    SchedulerConfig,
    StepPlan,
    WaitOrder,
)
from services.worker.paged.speculation import MISSES_BEFORE_REST, REST_TOKENS, NgramIndex, accepted_tokens

if TYPE_CHECKING:  # bookkeeping only: the scheduler itself needs no torch
    from services.worker.paged.kv_blocks import BlockPool


class Scheduler:
    """Owns the waiting, preempted and running requests and their blocks in `pool`."""

    def __init__(self, config: SchedulerConfig, pool: BlockPool, stop_ids: Iterable[int] = ()) -> None:
        self.config = config
        self.pool = pool
        self.stop_ids = frozenset(stop_ids)
        self.waiting: deque[Request] = deque()
        self.preempted: deque[Request] = deque()
        self.running: list[Request] = []
        self.requests: dict[RequestId, Request] = {}  # unfinished ones
        self.num_steps = 0
        self.num_preemptions = 0
        self.num_recomputed_tokens = 0
        self.max_running_seen = 0
        self.num_draft_tokens = 0
        self.num_accepted_tokens = 0
        # the tokens the last `resolve` kept, by request id (the engine streams them)
        self.resolved: dict[RequestId, list[int]] = {}
        self._num_admitted = 0
        self._work_steps: dict[RequestId, int] = {}  # HRRN's denominator, of each waiting request (fixed)
        # requests that reached their length at commit (no longer running), with the status they end in
        self._ending: dict[RequestId, RequestStatus] = {}

    # ---- requests in and out -------------------------------------------------------------------
    def add(self, request: Request) -> None:
        """Queue a new request. ValueError if it could never run (longer than the whole pool)."""
        if request.request_id in self.requests:
            raise ValueError(f"request {request.request_id!r} is already scheduled")
        if not request.prompt_ids or request.max_new_tokens < 1:
            raise ValueError("a request needs a prompt of >= 1 token and max_new_tokens >= 1")
        capacity_tokens = self.pool.num_blocks * self.pool.block_tokens
        if len(request.prompt_ids) + request.max_new_tokens > capacity_tokens:
            raise ValueError(f"prompt {len(request.prompt_ids)} + max_new_tokens {request.max_new_tokens} tokens "
                             f"exceed the KV pool of {capacity_tokens} tokens")
        request.status, request.arrival_step = RequestStatus.WAITING, self.num_steps
        self.requests[request.request_id] = request
        self.waiting.append(request)
        self._work_steps[request.request_id] = self._predicted_work_steps(request)

    def abort(self, request_id: RequestId) -> Request | None:
        """Drop an unfinished request wherever it is, freeing its blocks; None if unknown or finished."""
        request = self.requests.pop(request_id, None)
        if request is None:
            return None
        for queue in (self.waiting, self.preempted):
            if request in queue:
                queue.remove(request)
        self._work_steps.pop(request_id, None)
        if request in self.running:
            self.running.remove(request)
            self.pool.free(request_id)
        elif self._ending.pop(request_id, None) is not None:  # ended at commit, holds its blocks until resolve
            self.pool.free(request_id)
        request.status = RequestStatus.FINISHED_ABORTED
        return request

    @property
    def has_unfinished(self) -> bool:
        return bool(self.requests)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting) + len(self.preempted)

    @property
    def drafts_next_step(self) -> bool:
        """The next plan may hold drafts: the step before it must be resolved first. Not while more
        than draft_max_rows run, nor while every running request rests (speculation.py)."""
        return (self.config.draft_tokens > 0 and len(self.running) <= self.config.draft_max_rows
                and any(len(r.output_ids) >= r.draft_rest_until for r in self.running))

    # ---- one step ------------------------------------------------------------------------------
    def schedule(self) -> StepPlan:
        """Plan the next step (see the module docstring); applies its block changes to the pool."""
        self.num_steps += 1
        preempted = self._make_room_for_running()
        budget = self.config.token_budget
        chunks, prefilling = [], []
        for request in self.running:
            uncomputed = request.num_tokens - request.num_computed_tokens
            if uncomputed == 1:
                chunks.append(self._decode_chunk(request))
            elif uncomputed > 1:
                prefilling.append(request)
        budget -= len(chunks)
        num_drafts = 0
        if self.drafts_next_step and chunks and budget:
            num_drafts = self._add_drafts(chunks, budget)
            budget -= num_drafts
        for request in prefilling:
            if budget == 0:
                break
            chunks.append(self._chunk(request, budget))
            budget -= len(chunks[-1].token_ids)
        # no admission in a step that preempted (as vLLM v1): the pool just proved too small for
        # the running requests, and a victim resumed at once would only be preempted again
        projection = None  # of the running requests' block use, made on the first predicted check
        static = self.config.static_batches
        admits = not preempted and not (static and (self.running or self.preempted))
        # the loop's own first check, made before ordering every waiting request for nothing
        admits = admits and (budget > 0 or static) and len(self.running) < self.config.max_running
        for request in self._admission_order() if admits else ():
            if (budget == 0 and not static) or len(self.running) >= self.config.max_running:
                break
            if self.config.admission is Admission.GREEDY:
                if not self.pool.can_allocate(request.num_tokens):
                    break  # strict order: nothing overtakes the head
            else:
                projection = projection or self._projection()
                holding = self._predicted_holding(request, request.num_tokens)
                if projection.peak_with(*holding) > self.pool.num_blocks:
                    break
                projection.add(*holding)
            self._admit(request)
            if budget:  # a static batch's members past the budget start prefilling in later steps
                chunks.append(self._chunk(request, budget))
                budget -= len(chunks[-1].token_ids)
        self.max_running_seen = max(self.max_running_seen, len(self.running))
        return StepPlan(tuple(chunks), tuple(preempted), self.config.token_budget - budget, num_drafts)

    def update(self, plan: StepPlan, sampled: Mapping[RequestId, int]) -> list[Request]:
        """Apply a step's results: its chunks are cached, each sampled chunk's request gets its token
        (sampled[request_id]). Returns the requests that finished (their blocks freed)."""
        self.commit(plan)
        return self.resolve(plan, sampled)

    def commit(self, plan: StepPlan) -> None:
        """The step of `plan` is running: its chunks count as cached and each sampled chunk's request
        holds a PENDING_TOKEN for the token the step samples, so the next step can be planned before
        this one's tokens are read (`resolve` puts them in). A request that reaches its length here
        (max_new_tokens, or replay_tokens) stops running now; its result waits for `resolve`."""
        requests, running = self.requests, RequestStatus.RUNNING
        for chunk in plan.chunks:
            request = requests.get(chunk.request_id)
            if request is None or request.status != running:
                continue  # aborted
            request.num_computed_tokens += len(chunk.token_ids) - chunk.num_drafts  # drafts count at resolve
            if not chunk.is_sampled:
                continue
            request.output_ids.append(PENDING_TOKEN)
            request.num_pending_tokens += 1
            ending = request.length_end
            if ending is not None:
                self._ending[request.request_id] = ending
                self.running.remove(request)  # planned no further; its blocks stay until resolve

    def resolve(self, plan: StepPlan, sampled: Mapping[RequestId, int]) -> list[Request]:
        """The tokens of `plan`'s step (committed, and resolved in step order): each replaces its
        request's oldest PENDING_TOKEN. Returns the requests that finished (their blocks freed): those
        that reached their length at commit, and those that sampled a stop token; a step planned
        meanwhile may have run such a request one token further, which is dropped."""
        finished = []
        requests, stop_ids = self.requests, self.stop_ids
        self.resolved = resolved = {}
        for chunk in plan.chunks:
            request = requests.get(chunk.request_id)
            if request is None or not chunk.is_sampled or request.num_pending_tokens == 0:
                continue  # aborted, or finished by an earlier token
            output_ids = request.output_ids
            at = len(output_ids) - request.num_pending_tokens
            if chunk.num_drafts:
                if not self._resolve_drafts(request, chunk, sampled[chunk.request_id], at):
                    continue
                finished.append(request)
                continue
            token = sampled[chunk.request_id]
            output_ids[at] = token
            resolved[chunk.request_id] = [token]
            request.num_pending_tokens -= 1
            if token in stop_ids:
                del output_ids[at + 1:]
                request.num_pending_tokens = 0
                self._finish(request, RequestStatus.FINISHED_STOPPED)
            elif request.num_pending_tokens == 0 and request.request_id in self._ending:  # its last token
                self._finish(request, self._ending[request.request_id])
            else:
                continue
            finished.append(request)
        return finished

    def _resolve_drafts(self, request: Request, chunk: ScheduledChunk, sampled: tuple[int, ...], at: int) -> bool:
        """Keep the drafts the model agreed with and its next token (its only pending one, at `at`);
        True if that ended the request (a stop token, or its length)."""
        kept = accepted_tokens(chunk.token_ids[-chunk.num_drafts:], sampled)
        stop = next((i for i, token in enumerate(kept) if token in self.stop_ids), None)
        if stop is not None:
            kept = kept[:stop + 1]
        request.num_computed_tokens += len(kept) - 1  # the drafts kept: their K/V is the model's own
        request.num_accepted_tokens += len(kept) - 1
        self.num_accepted_tokens += len(kept) - 1
        _note_attempt(request, len(kept) - 1)
        request.output_ids[at:] = kept
        request.num_pending_tokens = 0
        self.resolved[request.request_id] = kept
        # the slots of drafts it did not keep go back (its newest token keeps the slot it will be written to)
        self.pool.truncate(request.request_id, min(request.num_tokens, self.pool.num_tokens(request.request_id)))
        ending = RequestStatus.FINISHED_STOPPED if stop is not None else request.length_end
        if ending is None:
            return False
        self._finish(request, ending)
        return True

    def _add_drafts(self, chunks: list[ScheduledChunk], budget: int) -> int:
        """Give the decode chunks (all of `chunks` now) drafts within `budget` tokens and the free blocks;
        returns the drafts added. A request drafts only when all its tokens are known and at least two
        more fit its length (the chunk's own token and one draft)."""
        pool, max_drafts, added = self.pool, self.config.draft_tokens, 0
        for i, chunk in enumerate(chunks):
            request = self.requests[chunk.request_id]
            room = min(max_drafts, budget - added, request.output_limit - len(request.output_ids) - 1)
            if request.num_pending_tokens or room < 1 or len(request.output_ids) < request.draft_rest_until:
                continue
            index = request.ngram_index
            if index is None:
                index = request.ngram_index = NgramIndex()
            index.extend(request.tokens(len(index), request.num_tokens))
            drafts = index.propose(room)
            if not drafts:
                _note_attempt(request, 0)
                continue
            needed = request.num_tokens + len(drafts) - pool.num_tokens(request.request_id)  # > 0 unless held
            if needed > 0:
                if not pool.can_extend(request.request_id, needed):
                    continue
                pool.extend(request.request_id, needed)
            chunks[i] = ScheduledChunk(request.request_id, chunk.token_ids + drafts, chunk.start_position,
                                       pool.block_table(request.request_id), is_sampled=True, num_drafts=len(drafts))
            request.num_draft_tokens += len(drafts)
            added += len(drafts)
        self.num_draft_tokens += added
        return added

    # ---- internals -----------------------------------------------------------------------------
    def _make_room_for_running(self) -> list[RequestId]:
        """Give every running request slots for its known tokens (a decoder's new one), preempting
        by the rule while the free blocks fall short (check, then act)."""
        pool = self.pool
        held = pool.num_tokens
        # per request id, its known tokens without a slot yet (1 after a decoded token), where any
        growing = {}
        for request in self.running:
            uncached = request.num_tokens - held(request.request_id)
            if uncached:
                growing[request.request_id] = uncached
        needed = pool.blocks_to_extend(growing)
        preempted = []
        while needed > pool.num_free_blocks:
            victim = self._victim()
            if victim.request_id in growing:
                needed -= pool.blocks_to_grow(victim.request_id, growing.pop(victim.request_id))
            self._preempt(victim)
            preempted.append(victim.request_id)
        pool.extend_all(growing)
        return preempted

    def _victim(self) -> Request:
        if self.config.preempt_rule is PreemptRule.YOUNGEST:
            return max(self.running, key=lambda r: r.admitted_order)
        return max(self.running, key=lambda r: (r.predicted_output_left, r.admitted_order))

    def _preempt(self, request: Request) -> None:
        self.running.remove(request)
        self.pool.preempt(request.request_id)
        request.num_recomputed_tokens += request.num_computed_tokens
        self.num_recomputed_tokens += request.num_computed_tokens
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        self.num_preemptions += 1
        request.status = RequestStatus.PREEMPTED
        self.preempted.append(request)

    def _admission_order(self) -> list[Request]:
        if self.config.order is WaitOrder.FCFS:
            waiting = list(self.waiting)
        else:
            # the response ratio, (waited + predicted work) / predicted work in steps, of each
            # (a step orders every waiting request: a comprehension, not a method call each)
            now_steps, work_steps = self.num_steps, self._work_steps
            waiting = list(self.waiting)
            ratios = [(now_steps - r.arrival_step + work_steps[r.request_id]) / work_steps[r.request_id]
                      for r in waiting]
            order = sorted(range(len(ratios)), key=ratios.__getitem__, reverse=True)  # stable: ties stay FCFS
            waiting = [waiting[i] for i in order]
            if self.config.order is WaitOrder.HRRN_TAIL:
                waiting = tail_first(waiting, [work_steps[r.request_id] for r in waiting], self.config.max_running)
        return [*self.preempted, *waiting]

    def _predicted_work_steps(self, request: Request) -> int:
        """HRRN's predicted work of a request, in steps: a decode step per output token, and the
        prompt's chunks."""
        return request.predicted_output_tokens + math.ceil(len(request.prompt_ids) / self.config.token_budget)

    def _predicted_holding(self, request: Request, tokens: int) -> tuple[int, int]:
        """(tokens held now, steps it is predicted to grow on)."""
        return tokens, request.predicted_total_tokens(self.config.margin) - request.num_tokens

    def _projection(self) -> BlockProjection:
        margin, held = self.config.margin, self.pool.num_tokens
        # `_predicted_holding` of every running request, inlined: hundreds a step that admits
        holding = [(held(r.request_id), r.predicted_total_tokens(margin) - r.num_tokens) for r in self.running]
        # ending requests (overlap: ended at commit, freed at resolve) hold their blocks one step more
        holding += [(held(request_id), 0) for request_id in self._ending]
        return BlockProjection(holding, self.pool.block_tokens)

    def _admit(self, request: Request) -> None:
        queue = self.preempted if request.status == RequestStatus.PREEMPTED else self.waiting
        queue.remove(request)
        self._work_steps.pop(request.request_id, None)
        self.pool.allocate(request.request_id, request.num_tokens)
        self._num_admitted += 1
        request.admitted_order = self._num_admitted
        request.status = RequestStatus.RUNNING
        self.running.append(request)

    def _decode_chunk(self, request: Request) -> ScheduledChunk:
        """`_chunk(request, 1)` of a request with one token left to compute, its last known one."""
        token = request.output_ids[-1] if request.output_ids else request.prompt_ids[-1]
        return ScheduledChunk(request.request_id, (token,), request.num_computed_tokens,
                              self.pool.block_table(request.request_id), is_sampled=True)

    def _chunk(self, request: Request, max_tokens: int) -> ScheduledChunk:
        start = request.num_computed_tokens
        end = min(request.num_tokens, start + max_tokens)
        return ScheduledChunk(request.request_id, request.tokens(start, end), start,
                              self.pool.block_table(request.request_id), is_sampled=end == request.num_tokens)

    def _finish(self, request: Request, status: RequestStatus) -> None:
        """End a running, ending (taken out of `running` at commit) or preempted request; free what it holds."""
        if request.status == RequestStatus.PREEMPTED:
            self.preempted.remove(request)  # holds no blocks
        else:
            if request in self.running:  # not an ending one: those left `running` at commit
                self.running.remove(request)
            self.pool.free(request.request_id)
        self._ending.pop(request.request_id, None)
        request.status = status
        del self.requests[request.request_id]


def tail_first(waiting: list[Request], work_steps: list[int], rows: int) -> list[Request]:
    """`waiting` (in HRRN order) with the requests whose predicted work (steps) outlasts the queue's drain
    over `rows` (services.core.tail_guard) moved to the front, longest first; the others keep their order."""
    is_tail = outlasts_drain(work_steps, rows).tolist()
    tail = sorted((i for i in range(len(waiting)) if is_tail[i]), key=lambda i: -work_steps[i])  # stable
    return [waiting[i] for i in tail] + [r for r, tailing in zip(waiting, is_tail, strict=True) if not tailing]


def _note_attempt(request: Request, kept_drafts: int) -> None:
    """Count a drafting attempt: one that kept nothing is a miss, and MISSES_BEFORE_REST in a row make the
    request rest for REST_TOKENS output tokens (speculation.py)."""
    request.num_draft_misses = 0 if kept_drafts else request.num_draft_misses + 1
    if request.num_draft_misses >= MISSES_BEFORE_REST:
        request.num_draft_misses = 0
        request.draft_rest_until = len(request.output_ids) + REST_TOKENS
