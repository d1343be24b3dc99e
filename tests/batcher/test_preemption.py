"""Straggler preemption in the scheduler: a cut request is requeued as a continuation and answered once."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime

from services.batcher.domain import BatchReport, GenerationInput, ItemOutput, Lease, PendingRequest, Prediction, WorkerInfo
from services.batcher.policy.config import make_policy
from services.batcher.scheduler import Clock, Scheduler, SchedulerLimits
from services.batcher.servicer import lease_to_proto

CLOCK = Clock(monotonic_s=time.monotonic, wall=lambda: datetime.now(UTC))


class NullLogSink:
    def __init__(self) -> None:
        self.requests: list[dict] = []

    def add_request(self, row) -> None:
        self.requests.append(row)

    def add_batch(self, row) -> None: ...
    def add_batch_time_sample(self, row) -> None: ...


def request(i: int, predicted: int, loop: asyncio.AbstractEventLoop) -> PendingRequest:
    return PendingRequest(
        request_id=f"r{i}", generation=GenerationInput("do", f"input {i}", 400, f"c{i}", "t"),
        prediction=Prediction(input_tokens=20, predicted_tokens=predicted, model_version=1, is_fallback=False),
        prompt=f"prompt {i}", arrival_s=time.monotonic(), queued_at=datetime.now(UTC), future=loop.create_future(),
    )


def lease_of(scheduler: Scheduler) -> Lease:
    pulled = scheduler.pull("w")
    assert isinstance(pulled, Lease)
    return pulled


def test_a_cut_request_continues_in_a_later_batch_and_is_answered_once():
    loop = asyncio.new_event_loop()
    try:
        sink = NullLogSink()
        policy = make_policy("magnus_pack", phi_token_reads=1e4, fixed_batch_size=8, max_batch_size=None)
        scheduler = Scheduler(policy, SchedulerLimits(preempt_share=0.25), CLOCK, sink)
        scheduler.register(WorkerInfo("w", 1, 2**40, 0, "m", "cpu", time.monotonic()))
        requests = [request(i, 10, loop) for i in range(8)]
        for r in requests:
            scheduler.admit(r)
        first = lease_of(scheduler)
        assert first.batch.size == 8 and first.preempt_max_rows == 2  # 25 % of 8 rows
        assert lease_to_proto(first).preempt_max_rows == 2
        # r0 was under-predicted: the worker cut it after 16 tokens
        outputs = [ItemOutput(r.request_id, "done", 10) for r in first.items if r.request_id != "r0"]
        outputs.append(ItemOutput("r0", "partial ", 16, is_preempted=True))
        assert scheduler.complete("w", first.batch.batch_id, BatchReport(outputs, 1.0, 86, 128))
        assert not requests[0].future.done() and all(r.future.done() for r in requests[1:])
        assert "r0" in scheduler.pending and len(sink.requests) == 7

        second = lease_of(scheduler)  # the continuation: prompt + output so far, 16 tokens fewer to go
        item = lease_to_proto(second).items[0]
        assert (item.prompt, item.max_new_tokens, item.input_tokens) == ("prompt 0partial ", 384, 36)
        assert second.batch.gen_tokens_max == 16  # planned to generate as much again
        assert second.preempt_max_rows == 0  # a single row: nothing to free by cutting it
        scheduler.complete("w", second.batch.batch_id, BatchReport([ItemOutput("r0", "rest", 30)], 1.0, 30, 30))
        result = requests[0].future.result()
        assert (result.text, result.generated_tokens) == ("partial rest", 46)
        assert result.started_at == requests[0].started_at  # its first batch's start
        assert len(sink.requests) == 8 and "r0" not in scheduler.pending
    finally:
        loop.close()


def test_preemption_is_off_by_default_and_for_plans_without_predictions():
    loop = asyncio.new_event_loop()
    try:
        for name, share in (("magnus_pack", 0.0), ("vs", 0.5), ("oracle", 0.5)):
            policy = make_policy(name, phi_token_reads=1e4, fixed_batch_size=8, max_batch_size=None)
            scheduler = Scheduler(policy, SchedulerLimits(preempt_share=share), CLOCK, NullLogSink())
            scheduler.register(WorkerInfo("w", 1, 2**40, 0, "m", "cpu", time.monotonic()))
            for i in range(8):
                scheduler.admit(request(i, 10, loop))
            assert lease_of(scheduler).preempt_max_rows == 0, name
    finally:
        loop.close()
