"""FCFS continuous batching on the static backend's KV pool and decode step (the paper's CCB).

`slots` rows decode together, one step at a time. A request joins a free row as soon as there is
one and leaves at its EOS or max_new_tokens, so no row idles until the longest one ends as in
static batching. Joiners are prefilled together, left-padded, into their rows' shares of the pool:
a prefill costs about the same for one prompt as for a few (it reads every weight once), so while
the batch runs nearly full a joiner waits a few steps (at most JOIN_DEFER_MAX_STEPS) until
`join_group_rows` rows are free, instead of paying one prefill per request. Each row writes its K/V at its
own cache position (`DecodeState.is_ragged`); the step is the static backend's, replayed on a GPU
as a CUDA graph per (slots, attention bucket of the longest active row).

A request too long for a row (prompt + max_new_tokens above Theta / slots) but within the pool runs
alone: joins stop, the rows drain, and it decodes as a static batch of one over the whole pool
before joins resume. So slots can be sized for the requests a workload has (many short rows, which
a step runs at nearly the cost of few) without refusing the rare long one.

One daemon thread owns the device and the rows; other threads only submit items and read counts.
One ContinuousBatcher per engine: it owns the pool while it runs.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch

from services.worker.engine import (
    BatchOutOfMemory,
    BatchRejected,
    EngineItem,
    StaticBatchEngine,
    is_out_of_memory,
)
from services.worker import metrics
from services.worker.engine_thread import ContinuousResult, EngineThread, finished_result, resolve
from services.worker.fast_decoder import DecodeState
from services.worker.continuous_plan import (
    JOIN_DEFER_MAX_STEPS,
    graphed_prefill_shapes,
    join_group_rows,
    prefill_groups,
    prefill_shape,
    step_sizes,
)
from services.worker.static_backend import PREFILL_CHUNK_TOKENS
from services.worker.token_stream import RowStream

log = logging.getLogger(__name__)

STATS_LOG_EVERY_S = 10.0  # the decode thread's time split, logged while it works
def _first_rows(state: DecodeState, rows: int) -> DecodeState:
    """The first `rows` rows of `state`, as views (fixed addresses: graphs replay on them)."""
    return DecodeState(
        tokens=state.tokens[:rows],
        positions=state.positions[:rows],
        write_index=state.write_index[:rows],
        mask=state.mask[:rows],
        k_views=[k[:rows] for k in state.k_views],
        v_views=[v[:rows] for v in state.v_views],
        is_ragged=state.is_ragged,
    )


@dataclass
class _Stats:
    """The decode thread's time since the last log line: steps, prefills and the rest (host work)."""

    started_s: float = field(default_factory=time.monotonic)
    steps: int = 0
    step_s: float = 0.0
    active_row_steps: int = 0
    attended_tokens: int = 0  # per step, summed
    prefills: int = 0
    prefill_rows: int = 0
    prefill_s: float = 0.0

    def line(self, slots: int) -> str:
        wall_s = time.monotonic() - self.started_s
        steps, prefills = max(1, self.steps), max(1, self.prefills)
        return (f"continuous, last {wall_s:.1f} s: {self.steps} steps of {1e3 * self.step_s / steps:.2f} ms "
                f"({self.active_row_steps / steps:.1f} of {slots} rows running, attending "
                f"{self.attended_tokens / steps:.0f} tokens), {self.prefills} prefills of "
                f"{self.prefill_rows / prefills:.1f} rows and {1e3 * self.prefill_s / prefills:.1f} ms, "
                f"{max(0.0, wall_s - self.step_s - self.prefill_s):.1f} s in neither (host work or idle)")


@dataclass
class _Pending:
    item: EngineItem
    future: Future
    submitted_s: float


@dataclass
class _Long:
    """A joiner too long for a row, waiting for the rows to drain (it keeps its reserved slot)."""

    pending: _Pending
    prompt: list[int]


@dataclass
class _Row:
    pending: _Pending
    prefilled_tokens: int  # cache positions the (left-padded) prefill wrote
    joined_s: float
    generated: list[int] = field(default_factory=list)

    @property
    def attend_tokens(self) -> int:
        """Cache positions the next step attends: the prompt, then every generated token but the last."""
        return self.prefilled_tokens + len(self.generated)


class ContinuousBatcher(EngineThread):
    """Keeps up to `slots` requests decoding; `submit` from any thread, results arrive as futures."""

    def __init__(self, engine: StaticBatchEngine, slots: int) -> None:
        super().__init__("continuous batcher")
        if engine.static is None:
            raise ValueError("continuous batching needs the static backend (backend='static', a Llama-family model)")
        if slots < 1:
            raise ValueError(f"slots must be >= 1, got {slots}")
        self.engine = engine
        self.slots = slots
        self.row_capacity_tokens = engine.static.row_capacity_tokens(slots)
        if self.row_capacity_tokens < 2:
            raise ValueError(
                f"{slots} slots leave {self.row_capacity_tokens} tokens of KV per row "
                f"(pool: {engine.static.capacity_tokens} tokens); a request needs at least 2"
            )
        self._stop_ids = engine.stop_ids(stop_at_eos=not engine.trace_replay)
        self._state = engine.static.state_for(slots, is_ragged=True)
        self._step_states = {rows: self._state if rows == slots else _first_rows(self._state, rows)
                             for rows in step_sizes(slots, engine.static.batch_bucket_rows)}
        device = engine.static.decoder.device
        # 1 for rows in use: idle rows are reset to cache position 0 before every step so that their
        # (ignored) writes and rope lookups stay in range
        self._is_active = torch.zeros(slots, dtype=torch.long, device=device)
        self._rows: list[_Row | None] = [None] * slots  # engine thread only
        self._long: deque[_Long] = deque()  # engine thread only: joiners that run alone once rows drain
        self._waiting: deque[_Pending] = deque()  # guarded by _cond
        self._num_active = 0  # guarded by _cond: rows in use or being joined
        self._join_group_rows = join_group_rows(slots)
        self._deferred_steps = 0  # engine thread only: steps joiners have waited for company
        self._stats = _Stats()  # engine thread only

    # ---- any thread ---------------------------------------------------------------------------

    def _enqueue(self, item: EngineItem, future: Future, submitted_s: float) -> None:
        """`item` waits for the next free row."""
        self._waiting.append(_Pending(item, future, submitted_s))

    def free_slots(self) -> int:
        """Rows that neither run a request nor are promised to a submitted one."""
        with self._cond:
            return max(0, self.slots - self._num_active - len(self._waiting))

    def warm_up(self, max_attend_tokens: int) -> None:
        """Before start(): compile the step for `slots` rows and capture its graphs up to
        max_attend_tokens, and the joiner prefills of every graphed shape a row holds (CUDA only),
        so that no request waits for that."""
        started_s = time.monotonic()
        static = self.engine.static
        captured = sum(static.capture_attention_buckets(state, rows, max_attend_tokens)
                       for rows, state in self._step_states.items())
        prefills = static.capture_prefill_shapes(self._state, graphed_prefill_shapes(self.row_capacity_tokens))
        if captured or prefills:
            log.info("warmed steps of %s rows: %d graphs up to %d attended tokens, and %d joiner prefill graphs, "
                     "in %.1f s", sorted(self._step_states), captured, max_attend_tokens, prefills,
                     time.monotonic() - started_s)

    # ---- the engine thread --------------------------------------------------------------------

    def _serve(self) -> None:
        while (joiners := self._next_joiners()) is not None:
            self._join(joiners)
            self._drop_cancelled_rows()
            if any(row is not None for row in self._rows):
                self._step_or_fail()
            elif self._long:
                self._run_long(self._long.popleft())

    def _next_joiners(self) -> list[tuple[int, _Pending]] | None:
        """Waiting requests paired with free rows (their rows reserved); blocks while there is no
        work; None once stopping (and, without cancel, drained)."""
        with self._cond:
            if not self._wait_for_work(lambda: not self._waiting and self._num_active == 0):
                return None
            if self._long:
                return []  # no joins until the rows drained and the long ones ran
            free = [slot for slot, row in enumerate(self._rows) if row is None]
            is_running = len(free) < self.slots
            if is_running and len(free) < self._join_group_rows and self._deferred_steps < JOIN_DEFER_MAX_STEPS:
                self._deferred_steps += bool(self._waiting)
                return []  # step on; more rows free soon and share the prefill
            self._deferred_steps = 0
            joiners: list[tuple[int, _Pending]] = []
            num_dropped = 0
            while self._waiting and len(joiners) < len(free):
                pending = self._waiting.popleft()
                if pending.future.cancelled():
                    num_dropped += 1
                else:
                    joiners.append((free[len(joiners)], pending))
            self._num_active += len(joiners)
        if num_dropped:
            self._notify_slot_freed()
        return joiners

    def _join(self, joiners: list[tuple[int, _Pending]]) -> None:
        """Prefill the joiners into their reserved rows, a group at a time; a request that cannot run
        fails alone."""
        ready: list[tuple[int, _Pending, list[int]]] = []
        for slot, pending in joiners:
            try:
                prompt = self._validated_prompt(pending.item)
                if len(prompt) + pending.item.max_new_tokens > self.row_capacity_tokens:
                    self._long.append(_Long(pending, prompt))
                else:
                    ready.append((slot, pending, prompt))
            except (BatchRejected, BatchOutOfMemory) as error:
                self._fail_joiner(pending, error)
            except Exception as error:  # one request's failure must not stop the others
                log.exception("request %s failed to join", pending.item.request_id)
                self._fail_joiner(pending, error, is_logged=True)
        groups = prefill_groups([len(prompt) for _, _, prompt in ready],
                                [pending.item.max_new_tokens for _, pending, _ in ready],
                                self.row_capacity_tokens, PREFILL_CHUNK_TOKENS)
        for group in groups:
            self._join_group([ready[i] for i in group])

    def _join_group(self, group: list[tuple[int, _Pending, list[int]]]) -> None:
        """One prefill for the group; out of memory, each member is retried alone (split and retry)."""
        started_s = time.perf_counter()
        try:
            firsts, prefilled_tokens = self.prefill([slot for slot, _, _ in group], [prompt for _, _, prompt in group],
                                                     [pending.item.max_new_tokens for _, pending, _ in group])
        except BatchOutOfMemory as error:
            if len(group) > 1:
                for member in group:
                    self._join_group([member])
                return
            self._fail_joiner(group[0][1], error)
            return
        except Exception as error:  # one group's failure must not stop the others
            log.exception("requests %s failed to join", [pending.item.request_id for _, pending, _ in group])
            for _, pending, _ in group:
                self._fail_joiner(pending, error, is_logged=True)
            return
        prefill_s = time.perf_counter() - started_s
        self._stats.prefills += 1
        self._stats.prefill_rows += len(group)
        self._stats.prefill_s += prefill_s
        metrics.CONTINUOUS_PREFILLS.inc()
        metrics.CONTINUOUS_PREFILL_ROWS.inc(len(group))
        metrics.CONTINUOUS_PREFILL_SECONDS.inc(prefill_s)
        joined_s = time.monotonic()
        streamed: dict[str, list[int]] = {}
        for (slot, pending, _), first in zip(group, firsts, strict=True):
            self._rows[slot] = row = _Row(pending, prefilled_tokens, joined_s, [first])
            if pending.item.is_streamed:
                streamed[pending.item.request_id] = [first]
            if self._is_finished(row):
                self._finish(slot)
        self._stream(streamed)

    def _fail_joiner(self, pending: _Pending, error: BaseException, is_logged: bool = False) -> None:
        if not is_logged:
            log.warning("request %s not run: %s", pending.item.request_id, error)
        self._release_row()
        resolve(pending.future, error=error)

    def _validated_prompt(self, item: EngineItem) -> list[int]:
        if item.max_new_tokens < 1:
            raise BatchRejected(f"max_new_tokens must be >= 1, got {item.max_new_tokens}")
        # an empty prompt becomes [EOS], as in StaticBatchEngine.run_ids
        prompt = self.engine.encode([item.prompt])[0] or [self.engine.eos_token_ids[0]]
        needed_tokens = len(prompt) + item.max_new_tokens
        if needed_tokens > self.engine.static.capacity_tokens:
            raise BatchRejected(
                f"prompt {len(prompt)} + max_new_tokens {item.max_new_tokens} = {needed_tokens} tokens exceeds "
                f"the KV pool of {self.engine.static.capacity_tokens} tokens"
            )
        if needed_tokens > self.engine.max_context_tokens:
            raise BatchRejected(
                f"prompt + max_new_tokens = {needed_tokens} tokens exceeds the model's context "
                f"of {self.engine.max_context_tokens}"
            )
        self.engine.raise_if_simulated_oom(1, len(prompt), item.max_new_tokens)
        return prompt

    def prefill(self, slots: list[int], prompts: list[list[int]], max_new_tokens: list[int]) -> tuple[list[int], int]:
        """Prefill `prompts`, left-padded, into rows `slots` and arm those rows for decoding.
        Returns each one's first token (one host sync) and the cache positions written."""
        state, static = self._state, self.engine.static
        device = static.decoder.device
        shape = prefill_shape([len(p) for p in prompts], max_new_tokens, self.row_capacity_tokens)
        prompt_tokens = shape.tokens
        # copies of the last joiner pad the group to a captured shape: they write the same K/V to its row
        members = [*range(len(prompts))] + [len(prompts) - 1] * (shape.rows - len(prompts))
        tokens = torch.full((shape.rows, prompt_tokens), self.engine.pad_token_id, dtype=torch.long)
        for i, member in enumerate(members):
            prompt = prompts[member]
            tokens[i, prompt_tokens - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
        padded_pad_tokens = torch.tensor([prompt_tokens - len(prompts[m]) for m in members], dtype=torch.long)
        padded_row_ids = torch.tensor([slots[m] for m in members], dtype=torch.long)
        tokens, padded_pad_tokens, padded_row_ids = (t.to(device) for t in (tokens, padded_pad_tokens, padded_row_ids))
        rows, pad_tokens = padded_row_ids[:len(prompts)], padded_pad_tokens[:len(prompts)]
        try:
            first = static.prefill_rows(state, tokens, padded_pad_tokens, padded_row_ids,
                                        use_graph=shape.is_graphed)[:len(prompts)]
        except (torch.OutOfMemoryError, RuntimeError) as error:
            if not is_out_of_memory(error):
                raise
            self.engine.free_memory()
            raise BatchOutOfMemory(
                f"out of memory prefilling {len(prompts)} x {prompt_tokens} prompt tokens: {error}"
            ) from error
        state.tokens[rows] = first
        state.positions[rows] = prompt_tokens - pad_tokens  # rope: each prompt from position 0
        state.write_index[rows] = prompt_tokens  # cache: every row of the group writes on at the same place
        visible = torch.arange(state.mask.shape[-1], device=device)[None, :]
        visible = (visible >= pad_tokens[:, None]) & (visible < prompt_tokens)
        mask = torch.full((len(prompts), state.mask.shape[-1]), float("-inf"), dtype=state.mask.dtype, device=device)
        state.mask[rows] = mask.masked_fill_(visible, 0.0)[:, None, None, :]
        self._is_active[rows] = 1
        return first.tolist(), prompt_tokens

    def _run_long(self, long: _Long) -> None:
        """Run a too-long-for-a-row request as a static batch of one; the rows are all free, so it
        may use the whole pool (their K/V is rewritten by their next prefill)."""
        pending, item = long.pending, long.pending.item
        if pending.future.cancelled():
            self._release_row()
            return
        started_s = time.monotonic()
        log.info("request %s (%d + %d tokens) is longer than a row of %d: running alone", item.request_id,
                 len(long.prompt), item.max_new_tokens, self.row_capacity_tokens)
        try:
            stop_at_eos = not self.engine.trace_replay
            row_stream = RowStream.maybe(self.engine.token_sink, [item.request_id if item.is_streamed else None],
                                         [item.max_new_tokens], self.engine.stop_ids(stop_at_eos))
            ids = self.engine.run_ids([long.prompt], [item.max_new_tokens], stop_at_eos=stop_at_eos,
                                      row_stream=row_stream)
        except (BatchRejected, BatchOutOfMemory) as error:
            self._fail_joiner(pending, error)
            return
        except Exception as error:  # one request's failure must not stop the others
            log.exception("request %s failed running alone", item.request_id)
            self._fail_joiner(pending, error, is_logged=True)
            return
        metrics.CONTINUOUS_LONG_RUNS.inc()
        result = self._result(pending, ids.generated_ids[0], started_s, total_tokens=ids.steps)
        self._release_row()
        resolve(pending.future, result)

    def _step_or_fail(self) -> None:
        try:
            self._step()
        except Exception as error:  # fail the rows in hand, keep serving
            active = [slot for slot, row in enumerate(self._rows) if row is not None]
            log.exception("continuous decode step failed: failing its %d requests", len(active))
            if is_out_of_memory(error):
                self.engine.free_memory()
                error = BatchOutOfMemory(f"out of memory in a decode step of {len(active)} rows: {error}")
            for slot in active:
                self._free_row(slot, error=error)

    def _step(self) -> None:
        state = self._state
        started_s = time.perf_counter()
        state.positions.mul_(self._is_active)
        state.write_index.mul_(self._is_active)
        active = [row.attend_tokens for row in self._rows if row is not None]
        attend_tokens = max(active)
        highest = max(slot for slot, row in enumerate(self._rows) if row is not None)
        rows = next(rows for rows in self._step_states if rows > highest)  # sizes ascend; slots is last
        self.engine.static.decode_step(self._step_states[rows], rows, attend_tokens)
        tokens = state.tokens.tolist()  # the one host sync per step
        self._count_step(time.perf_counter() - started_s, len(active), attend_tokens)
        streamed: dict[str, list[int]] = {}
        for slot, row in enumerate(self._rows):
            if row is not None:
                row.generated.append(tokens[slot])
                if row.pending.item.is_streamed:
                    streamed[row.pending.item.request_id] = [tokens[slot]]
                if self._is_finished(row):
                    self._finish(slot)
        self._stream(streamed)

    def _stream(self, new_tokens: dict[str, list[int]]) -> None:
        """Hand the streamed rows' new tokens to the engine's sink (once per step: a dict, one lock)."""
        sink = self.engine.token_sink
        if new_tokens and sink is not None:
            sink.add_tokens(new_tokens)

    def _count_step(self, step_s: float, active_rows: int, attend_tokens: int) -> None:
        stats = self._stats
        stats.steps += 1
        stats.step_s += step_s
        stats.active_row_steps += active_rows
        stats.attended_tokens += attend_tokens
        metrics.CONTINUOUS_STEPS.inc()
        metrics.CONTINUOUS_STEP_SECONDS.inc(step_s)
        metrics.CONTINUOUS_ACTIVE_ROW_STEPS.inc(active_rows)
        if time.monotonic() - stats.started_s >= STATS_LOG_EVERY_S:
            log.info("%s", stats.line(self.slots))
            self._stats = _Stats()

    def _is_finished(self, row: _Row) -> bool:
        return len(row.generated) >= row.pending.item.max_new_tokens or row.generated[-1] in self._stop_ids

    def _finish(self, slot: int) -> None:
        row = self._rows[slot]
        self._free_row(slot, result=self._result(row.pending, row.generated, row.joined_s, len(row.generated)))

    def _result(self, pending: _Pending, generated: list[int], started_s: float, total_tokens: int) -> ContinuousResult:
        """What a finished request answers, as of now; started_s = when it joined a row or began alone."""
        return finished_result(self.engine.tokenizer, pending.item.request_id, generated,
                               submitted_s=pending.submitted_s, queued_s=started_s - pending.submitted_s,
                               total_tokens=total_tokens)

    def _drop_cancelled_rows(self) -> None:
        for slot, row in enumerate(self._rows):
            if row is not None and row.pending.future.cancelled():
                log.info("request %s cancelled: its row frees", row.pending.item.request_id)
                self._free_row(slot)

    def _free_row(self, slot: int, result: ContinuousResult | None = None, error: BaseException | None = None) -> None:
        row = self._rows[slot]
        self._rows[slot] = None
        self._is_active[slot] = 0
        self._release_row()
        resolve(row.pending.future, result, error)

    def _release_row(self) -> None:
        with self._cond:
            self._num_active -= 1
        self._notify_slot_freed()

    def _fail_all(self, error: BaseException) -> None:
        for slot, row in enumerate(self._rows):
            if row is not None:
                self._free_row(slot, error=error)
        while self._long:
            self._fail_joiner(self._long.popleft().pending, error, is_logged=True)
        with self._cond:
            waiting, self._waiting = list(self._waiting), deque()
        for pending in waiting:
            resolve(pending.future, error=error)
