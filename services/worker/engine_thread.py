"""What the two continuous engines share: `ContinuousBatcher` (continuous.py, rows on the static
backend) and `PagedBatcher` (paged/serving.py, the paged engine).

Each keeps one daemon thread that owns the engine and the device; other threads only submit work,
read counts and stop it. `EngineThread` is that thread's life (start, `submit` from any thread, a
loop that waits for work, stop drained or cancelled); `resolve` and `finished_result` are how a
request's future is answered.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Protocol

import torch

from services.worker.engine import BatchCancelled, EngineItem, ItemOutput


@dataclass(frozen=True)
class ContinuousResult:
    output: ItemOutput
    run_s: float  # submit to finish, seconds
    queued_s: float  # submit to joining a row, seconds
    total_tokens: int  # decode steps the request held a row = output.generated_tokens


class _Decoder(Protocol):
    def decode(self, token_ids: Sequence[int], *, skip_special_tokens: bool) -> str: ...


def finished_result(tokenizer: _Decoder, request_id: str, generated: Sequence[int], *, submitted_s: float,
                    queued_s: float, total_tokens: int) -> ContinuousResult:
    """A finished request's answer, as of now: its text, and run_s from `submitted_s` (monotonic s)."""
    text = tokenizer.decode(generated, skip_special_tokens=True)
    return ContinuousResult(
        output=ItemOutput(request_id, text, len(generated)),
        run_s=time.monotonic() - submitted_s,
        queued_s=queued_s,
        total_tokens=total_tokens,
    )


def resolve(future: Future, result: ContinuousResult | None = None, error: BaseException | None = None) -> None:
    """Complete `future` unless its caller cancelled it."""
    if not future.set_running_or_notify_cancel():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


class EngineThread:
    """The engine thread's life. A subclass gives `_serve` (its turns, returning once `_wait_for_work`
    says stop) and `_fail_all` (answer every request in hand with an error)."""

    def __init__(self, name: str) -> None:
        self.name = name  # names the thread and the errors of requests it never ran
        # Called on the engine thread whenever free_slots() may have grown; must not block.
        self.on_slot_freed: Callable[[], None] | None = None
        self._cond = threading.Condition()
        self._is_stopping = False  # guarded by _cond
        self._is_cancelling = False  # guarded by _cond
        self._thread: threading.Thread | None = None

    def submit(self, item: EngineItem) -> Future[ContinuousResult]:
        """Hand `item` to the engine thread. Cancel the future to drop the request (what it holds frees)."""
        future: Future[ContinuousResult] = Future()
        with self._cond:
            if self._is_stopping:
                future.set_exception(BatchCancelled(f"{self.name} is stopping"))
                return future
            self._enqueue(item, future, time.monotonic())
            self._cond.notify()
        return future

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=self.name.replace(" ", "-"), daemon=True)
        self._thread.start()

    def stop(self, cancel: bool = False, timeout_s: float | None = None) -> None:
        """End the thread: after every submitted request finished, or at once failing them with
        BatchCancelled (cancel=True). Blocks up to `timeout_s` for the thread."""
        with self._cond:
            self._is_stopping = True
            self._is_cancelling = self._is_cancelling or cancel
            self._cond.notify_all()
        if self._thread is None:  # never started: nothing will run what waits
            self._fail_all(BatchCancelled(f"{self.name} stopped before it started"))
        else:
            self._thread.join(timeout_s)

    def _run(self) -> None:
        with torch.inference_mode():
            self._serve()
        self._fail_all(BatchCancelled(f"{self.name} stopped before the request finished"))

    def _wait_for_work(self, is_idle: Callable[[], bool]) -> bool:
        """Under _cond: block while `is_idle()`; False once the thread should end (cancelled, or
        stopping with nothing left), else True with work to do."""
        while True:
            idle = is_idle()
            if self._is_cancelling or (self._is_stopping and idle):
                return False
            if not idle:
                return True
            self._cond.wait()

    def _notify_slot_freed(self) -> None:
        callback = self.on_slot_freed
        if callback is not None:
            callback()

    def _enqueue(self, item: EngineItem, future: Future, submitted_s: float) -> None:
        """Under _cond: keep `item` (submitted at `submitted_s`, monotonic s) for the engine thread."""
        raise NotImplementedError

    def _serve(self) -> None:
        raise NotImplementedError

    def _fail_all(self, error: BaseException) -> None:
        raise NotImplementedError
