"""Test hook: a batch runner whose batches take longer than the engine needs.

It stands for a change of batch-time behaviour (a slower device, a noisy neighbour) so that the
trainer's estimator retraining can be shown end to end. `MAGNUS_WORKER_SLOWDOWN_FACTOR` makes a
batch take factor x its run time; `MAGNUS_WORKER_SLOWDOWN_STEP_S` adds that many seconds per decode
step (the whole delay is waited after the batch: its total time is what the batcher sees).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import replace

from services.worker.engine import BatchCancelled, BatchOutput, EngineItem
from services.worker.preemption import Preemption
from services.worker.puller import BatchRunner


class SlowedRunner:
    """Runs the batch, then waits (factor - 1) x run time + steps x step_s; `run_s` is the whole wall time."""

    def __init__(self, runner: BatchRunner, factor: float = 1.0, step_s: float = 0.0) -> None:
        if factor < 1.0:
            raise ValueError(f"slowdown factor must be >= 1, got {factor}")
        if step_s < 0.0:
            raise ValueError(f"slowdown per step must be >= 0 s, got {step_s}")
        self.runner = runner
        self.factor = factor
        self.step_s = step_s

    def run(
        self, items: Sequence[EngineItem], cancel: threading.Event | None = None, preemption: Preemption | None = None
    ) -> BatchOutput:
        started_s = time.monotonic()
        output = self.runner.run(items, cancel, preemption)
        extra_s = (self.factor - 1.0) * output.run_s + output.steps * self.step_s
        # Waiting on the cancel event keeps a cancelled batch from sleeping out its delay.
        if (cancel or threading.Event()).wait(extra_s):
            raise BatchCancelled("batch cancelled before it finished")
        return replace(output, run_s=time.monotonic() - started_s)


def slow_down(runner: BatchRunner, factor: float = 1.0, step_s: float = 0.0) -> BatchRunner:
    """`runner` itself when there is no slowdown (the default: no wrapper on the serving path)."""
    return runner if factor == 1.0 and step_s == 0.0 else SlowedRunner(runner, factor, step_s)
