"""FCFS continuous batching on the static backend's KV pool and decode step (the paper's CCB).

`slots` rows decode together, one step at a time. A request joins a free row as soon as there is
one (prefilled alone into that row's share of the pool) and leaves at its EOS or max_new_tokens,
so no row idles until the longest one ends as in static batching. Each row writes its K/V at its
own cache position (`DecodeState.is_ragged`); the step is the static backend's, replayed on a GPU
as a CUDA graph per (slots, attention bucket of the longest active row).

One daemon thread owns the device and the rows; other threads only submit items and read counts.
One ContinuousBatcher per engine: it owns the pool while it runs.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch

from services.worker.engine import (
    BatchCancelled,
    BatchOutOfMemory,
    BatchRejected,
    EngineItem,
    ItemOutput,
    StaticBatchEngine,
    is_out_of_memory,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ContinuousResult:
    output: ItemOutput
    run_s: float  # submit to finish, seconds
    queued_s: float  # submit to joining a row, seconds
    total_tokens: int  # decode steps the request held a row = output.generated_tokens


@dataclass
class _Pending:
    item: EngineItem
    future: Future
    submitted_s: float


@dataclass
class _Row:
    pending: _Pending
    prompt_tokens: int
    joined_s: float
    generated: list[int] = field(default_factory=list)

    @property
    def attend_tokens(self) -> int:
        """Cache positions the next step attends: the prompt, then every generated token but the last."""
        return self.prompt_tokens + len(self.generated)


class ContinuousBatcher:
    """Keeps up to `slots` requests decoding; `submit` from any thread, results arrive as futures."""

    def __init__(self, engine: StaticBatchEngine, slots: int) -> None:
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
        # Called on the engine thread whenever free_slots() may have grown; must not block.
        self.on_slot_freed: Callable[[], None] | None = None
        self._stop_ids = engine.stop_ids(stop_at_eos=not engine.trace_replay)
        self._state = engine.static._state_for(slots, is_ragged=True)
        device = engine.static.decoder.device
        # 1 for rows in use: idle rows are reset to cache position 0 before every step so that their
        # (ignored) writes and rope lookups stay in range
        self._is_active = torch.zeros(slots, dtype=torch.long, device=device)
        self._rows: list[_Row | None] = [None] * slots  # engine thread only
        self._cond = threading.Condition()
        self._waiting: deque[_Pending] = deque()  # guarded by _cond
        self._num_active = 0  # guarded by _cond: rows in use or being joined
        self._is_stopping = False  # guarded by _cond
        self._is_cancelling = False  # guarded by _cond
        self._thread: threading.Thread | None = None

    # ---- any thread ---------------------------------------------------------------------------

    def submit(self, item: EngineItem) -> Future[ContinuousResult]:
        """Queue `item` for the next free row. Cancel the future to drop the request (its row frees)."""
        future: Future[ContinuousResult] = Future()
        with self._cond:
            if self._is_stopping:
                future.set_exception(BatchCancelled("continuous batcher is stopping"))
                return future
            self._waiting.append(_Pending(item, future, time.monotonic()))
            self._cond.notify()
        return future

    def free_slots(self) -> int:
        """Rows that neither run a request nor are promised to a submitted one."""
        with self._cond:
            return max(0, self.slots - self._num_active - len(self._waiting))

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="continuous-batcher", daemon=True)
        self._thread.start()

    def stop(self, cancel: bool = False, timeout_s: float | None = None) -> None:
        """End the step loop: after every submitted request finished, or at once failing them with
        BatchCancelled (cancel=True). Blocks up to `timeout_s` for the thread."""
        with self._cond:
            self._is_stopping = True
            self._is_cancelling = self._is_cancelling or cancel
            self._cond.notify_all()
        if self._thread is None:  # never started: nothing will run what waits
            self._fail_all(BatchCancelled("continuous batcher stopped before it started"))
        else:
            self._thread.join(timeout_s)

    # ---- the engine thread --------------------------------------------------------------------

    def _run(self) -> None:
        with torch.inference_mode():
            while (joiners := self._next_joiners()) is not None:
                for slot, pending in joiners:
                    self._join(slot, pending)
                self._drop_cancelled_rows()
                if any(row is not None for row in self._rows):
                    self._step_or_fail()
        self._fail_all(BatchCancelled("continuous batcher stopped before the request finished"))

    def _next_joiners(self) -> list[tuple[int, _Pending]] | None:
        """Waiting requests paired with free rows (their rows reserved); blocks while there is no
        work; None once stopping (and, without cancel, drained)."""
        with self._cond:
            while True:
                is_idle = not self._waiting and self._num_active == 0
                if self._is_cancelling or (self._is_stopping and is_idle):
                    return None
                if not is_idle:
                    break
                self._cond.wait()
            free = [slot for slot, row in enumerate(self._rows) if row is None]
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

    def _join(self, slot: int, pending: _Pending) -> None:
        """Prefill `pending` into its reserved row; a request that cannot run fails alone."""
        request_id = pending.item.request_id
        try:
            prompt = self._validated_prompt(pending.item)
            first = self._prefill(slot, prompt)
        except (BatchRejected, BatchOutOfMemory) as error:
            log.warning("request %s not run: %s", request_id, error)
            failure: BaseException = error
        except Exception as error:  # one request's failure must not stop the others
            log.exception("request %s failed to join", request_id)
            failure = error
        else:
            self._rows[slot] = row = _Row(pending, len(prompt), time.monotonic(), [first])
            if self._is_finished(row):
                self._finish(slot)
            return
        self._release_row()
        _resolve(pending.future, error=failure)

    def _validated_prompt(self, item: EngineItem) -> list[int]:
        if item.max_new_tokens < 1:
            raise BatchRejected(f"max_new_tokens must be >= 1, got {item.max_new_tokens}")
        # an empty prompt becomes [EOS], as in StaticBatchEngine.run_ids
        prompt = self.engine.encode([item.prompt])[0] or [self.engine.eos_token_ids[0]]
        needed_tokens = len(prompt) + item.max_new_tokens
        if needed_tokens > self.row_capacity_tokens:
            raise BatchRejected(
                f"prompt {len(prompt)} + max_new_tokens {item.max_new_tokens} = {needed_tokens} tokens exceeds "
                f"a row's KV capacity of {self.row_capacity_tokens} tokens ({self.slots} slots)"
            )
        if needed_tokens > self.engine.max_context_tokens:
            raise BatchRejected(
                f"prompt + max_new_tokens = {needed_tokens} tokens exceeds the model's context "
                f"of {self.engine.max_context_tokens}"
            )
        self.engine._maybe_simulate_oom(1, len(prompt), item.max_new_tokens)
        return prompt

    def _prefill(self, slot: int, prompt: list[int]) -> int:
        """Prefill `prompt` into row `slot`, arm the row for decoding; its first token (host sync)."""
        state, decoder = self._state, self.engine.static.decoder
        prompt_tokens = len(prompt)
        try:
            first = decoder.prefill(
                torch.tensor([prompt], dtype=torch.long, device=decoder.device),
                torch.zeros(1, dtype=torch.long, device=decoder.device),
                [k[slot : slot + 1] for k in state.k_views],
                [v[slot : slot + 1] for v in state.v_views],
            )
        except (torch.OutOfMemoryError, RuntimeError) as error:
            if not is_out_of_memory(error):
                raise
            self.engine._free_memory()
            raise BatchOutOfMemory(f"out of memory prefilling {prompt_tokens} prompt tokens: {error}") from error
        state.tokens[slot : slot + 1].copy_(first)
        state.positions[slot] = prompt_tokens
        state.write_index[slot] = prompt_tokens
        state.mask[slot].fill_(float("-inf"))
        state.mask[slot, ..., :prompt_tokens] = 0.0
        self._is_active[slot] = 1
        return int(first[0])

    def _step_or_fail(self) -> None:
        try:
            self._step()
        except Exception as error:  # fail the rows in hand, keep serving
            active = [slot for slot, row in enumerate(self._rows) if row is not None]
            log.exception("continuous decode step failed: failing its %d requests", len(active))
            if is_out_of_memory(error):
                self.engine._free_memory()
                error = BatchOutOfMemory(f"out of memory in a decode step of {len(active)} rows: {error}")
            for slot in active:
                self._free_row(slot, error=error)

    def _step(self) -> None:
        state = self._state
        state.positions.mul_(self._is_active)
        state.write_index.mul_(self._is_active)
        attend_tokens = max(row.attend_tokens for row in self._rows if row is not None)
        self.engine.static._step(state, self.slots, attend_tokens)
        tokens = state.tokens.tolist()  # the one host sync per step
        for slot, row in enumerate(self._rows):
            if row is not None:
                row.generated.append(tokens[slot])
                if self._is_finished(row):
                    self._finish(slot)

    def _is_finished(self, row: _Row) -> bool:
        return len(row.generated) >= row.pending.item.max_new_tokens or row.generated[-1] in self._stop_ids

    def _finish(self, slot: int) -> None:
        row = self._rows[slot]
        finished_s = time.monotonic()
        text = self.engine.tokenizer.decode(row.generated, skip_special_tokens=True)
        result = ContinuousResult(
            output=ItemOutput(row.pending.item.request_id, text, len(row.generated)),
            run_s=finished_s - row.pending.submitted_s,
            queued_s=row.joined_s - row.pending.submitted_s,
            total_tokens=len(row.generated),
        )
        self._free_row(slot, result=result)

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
        _resolve(row.pending.future, result, error)

    def _release_row(self) -> None:
        with self._cond:
            self._num_active -= 1
        self._notify_slot_freed()

    def _notify_slot_freed(self) -> None:
        callback = self.on_slot_freed
        if callback is not None:
            callback()

    def _fail_all(self, error: BaseException) -> None:
        for slot, row in enumerate(self._rows):
            if row is not None:
                self._free_row(slot, error=error)
        with self._cond:
            waiting, self._waiting = list(self._waiting), deque()
        for pending in waiting:
            _resolve(pending.future, error=error)


def _resolve(future: Future, result: ContinuousResult | None = None, error: BaseException | None = None) -> None:
    """Complete `future` unless its caller cancelled it."""
    if not future.set_running_or_notify_cancel():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)
