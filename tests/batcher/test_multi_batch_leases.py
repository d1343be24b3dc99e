"""A continuous worker's calls over real gRPC: one PullBatch leases several ready batches, one
CompleteBatches reports several, each accepted or refused on its own; bad calls are INVALID_ARGUMENT
and change nothing."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from magnus.v1 import generation_pb2, generation_pb2_grpc
from magnus.v1 import worker_queue_pb2 as wq
from magnus.v1 import worker_queue_pb2_grpc as wq_grpc
from services.batcher.config import BatcherSettings
from tests.inprocess_batcher import inprocess_batcher

pytestmark = pytest.mark.asyncio


def completion(batch: wq.Batch, worker_id: str = "") -> wq.CompleteBatchRequest:
    return wq.CompleteBatchRequest(
        worker_id=worker_id, batch_id=batch.batch_id, run_s=0.1, valid_tokens=1, total_tokens=1,
        results=[wq.ItemResult(request_id=i.request_id, text=f"answer to {i.prompt}", generated_tokens=1)
                 for i in batch.items])


async def invalid_argument(call) -> str:
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await call
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT, error.value.details()
    return error.value.details()


async def test_one_pull_leases_the_ready_batches_and_one_call_reports_them():
    settings = BatcherSettings(port=0, metrics_port=-1, policy="ccb")
    async with inprocess_batcher(settings, with_worker=False) as runner:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{runner.port}") as channel, \
                grpc.aio.insecure_channel(f"127.0.0.1:{runner.internal_port}") as worker_channel:
            client = generation_pb2_grpc.GenerationServiceStub(channel)
            texts = [f"request number {i}" for i in range(6)]
            calls = [asyncio.ensure_future(client.Generate(generation_pb2.GenerateRequest(
                prompt=generation_pb2.Prompt(user_input=t, max_new_tokens=4)), timeout=30)) for t in texts]
            while len(runner.scheduler.pending) < len(texts):
                await asyncio.sleep(0.01)
            worker = wq_grpc.WorkerQueueServiceStub(worker_channel)
            await worker.RegisterWorker(wq.RegisterWorkerRequest(worker_id="w", kv_bytes_per_token=1, free_kv_bytes=2**40))
            other = "w2"
            await worker.RegisterWorker(wq.RegisterWorkerRequest(worker_id=other, kv_bytes_per_token=1, free_kv_bytes=2**40))

            await invalid_argument(worker.PullBatch(wq.PullBatchRequest(worker_id="w", wait_s=1, max_batches=-1)))
            await invalid_argument(worker.PullBatch(wq.PullBatchRequest(worker_id="w", wait_s=1, max_batches=5000)))
            pulled = await worker.PullBatch(wq.PullBatchRequest(worker_id="w", wait_s=1, max_batches=4))
            batches = [pulled.batch, *pulled.more_batches]
            assert len(batches) == 4 and len({b.batch_id for b in batches}) == 4
            assert [len(b.items) for b in batches] == [1, 1, 1, 1], "ccb leases one request a batch"
            assert {b.items[0].prompt.strip() for b in batches} < set(texts)
            assert len(runner.scheduler.leases) == 4

            # a completion naming another worker refuses the whole call: nothing applied
            details = await invalid_argument(worker.CompleteBatches(wq.CompleteBatchesRequest(
                worker_id="w", completions=[completion(batches[0]), completion(batches[1], worker_id=other)])))
            assert "completions[1].worker_id" in details
            await invalid_argument(worker.CompleteBatches(wq.CompleteBatchesRequest(worker_id="w")))
            assert len(runner.scheduler.leases) == 4 and not any(call.done() for call in calls)

            stale = wq.CompleteBatchRequest(batch_id="not-leased")
            reply = await worker.CompleteBatches(wq.CompleteBatchesRequest(
                worker_id="w", completions=[completion(b, worker_id=w) for b, w in zip(batches[:3], ("w", "", "w"))]
                + [stale]))
            assert list(reply.is_accepted) == [True, True, True, False]
            expected = {b.items[0].request_id: f"answer to {b.items[0].prompt}" for b in batches[:3]}
            answered, _ = await asyncio.wait(calls, timeout=10, return_when=asyncio.FIRST_COMPLETED)
            while len(answered) < 3:
                answered |= (await asyncio.wait(set(calls) - answered, timeout=10,
                                                return_when=asyncio.FIRST_COMPLETED))[0]
            assert {a.result().request_id: a.result().text for a in answered} == expected
            # the fourth is still leased; a repeat report of a delivered batch is refused
            reply = await worker.CompleteBatches(wq.CompleteBatchesRequest(
                worker_id="w", completions=[completion(batches[3]), completion(batches[0])]))
            assert list(reply.is_accepted) == [True, False]

            # max_batches 0 (an older worker) leases one; the last ready one then comes alone
            one = await worker.PullBatch(wq.PullBatchRequest(worker_id="w", wait_s=1))
            assert one.HasField("batch") and not one.more_batches
            rest = await worker.PullBatch(wq.PullBatchRequest(worker_id="w", wait_s=1, max_batches=8))
            assert rest.HasField("batch") and not rest.more_batches
            reply = await worker.CompleteBatches(wq.CompleteBatchesRequest(
                worker_id="w", completions=[completion(one.batch), completion(rest.batch)]))
            assert list(reply.is_accepted) == [True, True]
            assert sorted(a.text for a in await asyncio.wait_for(asyncio.gather(*calls), 10)) == sorted(
                f"answer to {b.items[0].prompt}" for b in [*batches, one.batch, rest.batch])
            empty = await worker.PullBatch(wq.PullBatchRequest(worker_id="w", wait_s=0.05, max_batches=8))
            assert not empty.HasField("batch") and not empty.more_batches
