"""CompletionSender over real gRPC against the fake WorkerQueueService: reports that finish while a call
is in flight go together in the next one; an older batcher gets one CompleteBatch per report."""

from __future__ import annotations

import asyncio

import grpc
import pytest
import pytest_asyncio

from magnus.v1 import worker_queue_pb2 as pb
from magnus.v1 import worker_queue_pb2_grpc as pb_grpc
from services.worker.completions import CompletionSender
from tests.worker.test_worker_loop import FAST, FakeQueue, start_fake

pytestmark = pytest.mark.asyncio


class GatedQueue(FakeQueue):
    """Holds its first CompleteBatches call until `release` is set."""

    def __init__(self, has_batch_rpcs: bool) -> None:
        super().__init__(has_batch_rpcs=has_batch_rpcs)
        self.release = asyncio.Event()
        self.first_call_arrived = asyncio.Event()

    async def CompleteBatches(self, request, context):
        if not self.first_call_arrived.is_set():
            self.first_call_arrived.set()
            await self.release.wait()
        return await super().CompleteBatches(request, context)


@pytest_asyncio.fixture(params=[True, False], ids=["batch RPCs", "older batcher"])
async def gated(request):
    queue = GatedQueue(has_batch_rpcs=request.param)
    server, port = await start_fake(queue)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    yield queue, pb_grpc.WorkerQueueServiceStub(channel)
    await channel.close()
    await server.stop(0)


def report(batch_id: str) -> pb.CompleteBatchRequest:
    return pb.CompleteBatchRequest(worker_id="w1", batch_id=batch_id, results=[pb.ItemResult(request_id=batch_id)])


async def test_reports_queued_during_a_call_go_together_in_the_next(gated):
    queue, stub = gated
    sender = CompletionSender(stub, "w1", FAST)
    first = asyncio.ensure_future(sender.send(report("a"), lease_s=5.0))
    await asyncio.wait_for(queue.first_call_arrived.wait(), 10)
    later = [asyncio.ensure_future(sender.send(report(b), lease_s=5.0)) for b in "bcd"]
    await asyncio.sleep(0.05)  # let them queue behind the call in flight
    queue.release.set()
    assert await asyncio.wait_for(asyncio.gather(first, *later), 10) == [True] * 4
    delivered = [queue.reports.get_nowait()[1].batch_id for _ in range(queue.reports.qsize())]
    assert sorted(delivered) == ["a", "b", "c", "d"]
    batched = [len(r.completions) for n, r in queue.calls if n == "CompleteBatches"]
    singles = [r.batch_id for n, r in queue.calls if n == "CompleteBatch"]
    if queue.has_batch_rpcs:
        assert batched == [1, 3] and singles == [] and sender.num_calls == 2
    else:  # UNIMPLEMENTED once, then one CompleteBatch per report, and never CompleteBatches again
        assert batched == [1] and sorted(singles) == ["a", "b", "c", "d"]
        assert await sender.send(report("e"), lease_s=5.0) is True
        assert [n for n, _ in queue.calls].count("CompleteBatches") == 1
    await sender.close()


async def test_a_batcher_that_stays_away_gets_none_after_the_lease_not_a_hang():
    queue = FakeQueue(has_batch_rpcs=True)
    server, port = await start_fake(queue)
    await server.stop(0)  # nothing listens any more: every call is UNAVAILABLE
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        sender = CompletionSender(pb_grpc.WorkerQueueServiceStub(channel), "w1", FAST)
        assert await asyncio.wait_for(sender.send(report("a"), lease_s=0.5), 10) is None
        await sender.close()


async def test_closing_answers_the_report_in_flight_and_the_queued_ones(gated):
    queue, stub = gated
    sender = CompletionSender(stub, "w1", FAST)
    in_flight = asyncio.ensure_future(sender.send(report("a"), lease_s=5.0))
    await asyncio.wait_for(queue.first_call_arrived.wait(), 10)
    queued = asyncio.ensure_future(sender.send(report("b"), lease_s=5.0))
    await asyncio.sleep(0.05)
    await sender.close()  # e.g. the worker stopping with the batcher stuck
    assert await asyncio.wait_for(asyncio.gather(in_flight, queued), 10) == [None, None]
    queue.release.set()
