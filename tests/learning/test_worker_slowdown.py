"""The worker's slowdown hook (MAGNUS_WORKER_SLOWDOWN_FACTOR) used to change batch-time behaviour."""

from __future__ import annotations

import threading
import time

import pytest

from services.worker.engine import BatchCancelled, BatchOutput, EngineItem, ItemOutput
from services.worker.slowdown import SlowedRunner, slow_down

RUN_S = 0.05


class FakeEngine:
    def run(self, items, cancel=None, preemption=None) -> BatchOutput:
        time.sleep(RUN_S)
        outputs = [ItemOutput(item.request_id, "x", 1) for item in items]
        return BatchOutput(items=outputs, valid_tokens=len(items), total_tokens=len(items), steps=1, run_s=RUN_S)


def test_factor_one_is_the_engine_itself() -> None:
    engine = FakeEngine()
    assert slow_down(engine, 1.0) is engine


def test_slowed_batch_takes_factor_times_and_reports_it() -> None:
    runner = slow_down(FakeEngine(), 4.0)
    started_s = time.monotonic()
    output = runner.run([EngineItem("r1", "p", 1)])
    wall_s = time.monotonic() - started_s
    assert 4 * RUN_S <= output.run_s <= wall_s + 1e-6
    assert [item.request_id for item in output.items] == ["r1"]


def test_step_delay_adds_seconds_per_decode_step() -> None:
    output = SlowedRunner(FakeEngine(), step_s=0.1).run([EngineItem("r1", "p", 1)])  # FakeEngine: 1 step
    assert RUN_S + 0.1 <= output.run_s < RUN_S + 0.1 + 1.0
    engine = FakeEngine()
    assert slow_down(engine, 1.0, 0.0) is engine and isinstance(slow_down(engine, 1.0, 0.1), SlowedRunner)


def test_cancel_ends_the_wait_early() -> None:
    cancel = threading.Event()
    runner = SlowedRunner(FakeEngine(), 200.0)  # a 10 s wait if not cancelled
    threading.Timer(0.1, cancel.set).start()
    started_s = time.monotonic()
    with pytest.raises(BatchCancelled):
        runner.run([EngineItem("r1", "p", 1)], cancel)
    assert time.monotonic() - started_s < 2.0


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError, match=">= 1"):
        SlowedRunner(FakeEngine(), 0.5)
    with pytest.raises(ValueError, match=">= 0 s"):
        SlowedRunner(FakeEngine(), step_s=-1.0)
