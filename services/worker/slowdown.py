"""Test hook: a batch runner that makes every batch take `factor` times as long as it ran.

It stands for a change of batch-time behaviour (a slower device, a noisy neighbour) so that the
trainer's estimator retraining can be shown end to end; `MAGNUS_WORKER_SLOWDOWN_FACTOR` turns it on.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import replace

from services.worker.engine import BatchCancelled, BatchOutput, EngineItem
from services.worker.puller import BatchRunner


class SlowedRunner:
    """Runs the batch, then waits (factor - 1) x its run time; `run_s` reports the whole wall time."""

    def __init__(self, runner: BatchRunner, factor: float) -> None:
        if factor < 1.0:
            raise ValueError(f"slowdown factor must be >= 1, got {factor}")
        self.runner = runner
        self.factor = factor

    def run(self, items: Sequence[EngineItem], cancel: threading.Event | None = None) -> BatchOutput:
        started_s = time.monotonic()
        output = self.runner.run(items, cancel)
        extra_s = (self.factor - 1.0) * output.run_s
        # Waiting on the cancel event keeps a cancelled batch from sleeping out its delay.
        if (cancel or threading.Event()).wait(extra_s):
            raise BatchCancelled("batch cancelled before it finished")
        return replace(output, run_s=time.monotonic() - started_s)


def slow_down(runner: BatchRunner, factor: float) -> BatchRunner:
    """`runner` itself when `factor` is 1 (the default: no wrapper on the serving path)."""
    return runner if factor == 1.0 else SlowedRunner(runner, factor)
