"""The batcher's servicers in-process over real gRPC, with a fake worker speaking the worker protocol:
a poison request fails alone, and callers that leave (queued or running) are dropped without asyncio
logging errors."""

from __future__ import annotations

import asyncio
import gc
import logging

import grpc
import pytest
from prometheus_client import REGISTRY

from magnus.v1 import generation_pb2, generation_pb2_grpc
from magnus.v1 import worker_queue_pb2 as wq
from magnus.v1 import worker_queue_pb2_grpc as wq_grpc
from services.batcher.config import BatcherSettings
from tests.inprocess_batcher import inprocess_batcher

pytestmark = pytest.mark.asyncio

POISON = "POISON"


def prompt(text: str, max_new_tokens: int = 16) -> generation_pb2.Prompt:
    return generation_pb2.Prompt(user_input=text, max_new_tokens=max_new_tokens)


async def poison_failing_worker(target: str, stop: asyncio.Event, runs: list[list[str]]) -> None:
    """Fails every batch holding a POISON prompt (as a device assert would), completes the others."""
    async with grpc.aio.insecure_channel(target) as channel:
        stub = wq_grpc.WorkerQueueServiceStub(channel)
        await stub.RegisterWorker(wq.RegisterWorkerRequest(
            worker_id="fake", kv_bytes_per_token=1, free_kv_bytes=2**40, incarnation_id="one"))
        while not stop.is_set():
            batch = (await stub.PullBatch(wq.PullBatchRequest(worker_id="fake", wait_s=0.1))).batch
            if not batch.items:
                continue
            runs.append([item.prompt for item in batch.items])
            if any(POISON in item.prompt for item in batch.items):
                await stub.ReportBatchFailure(wq.ReportBatchFailureRequest(
                    worker_id="fake", batch_id=batch.batch_id, kind=wq.FAILURE_KIND_OTHER,
                    message="RuntimeError: device-side assert triggered"))
                continue
            await stub.CompleteBatch(wq.CompleteBatchRequest(
                worker_id="fake", batch_id=batch.batch_id,
                results=[wq.ItemResult(request_id=i.request_id, text="ok", generated_tokens=1) for i in batch.items]))


async def test_a_poison_request_is_split_out_of_its_batch_and_fails_alone():
    settings = BatcherSettings(port=0, metrics_port=-1, policy="vs", fixed_batch_size=32)
    async with inprocess_batcher(settings, with_worker=False) as runner:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{runner.port}") as channel:
            stub = generation_pb2_grpc.GenerationServiceStub(channel)
            texts = [f"fine request {i}" for i in range(20)] + [f"a {POISON} request"]
            calls = [asyncio.ensure_future(stub.Generate(generation_pb2.GenerateRequest(prompt=prompt(t)), timeout=30))
                     for t in texts]
            while len(runner.scheduler.pending) < len(texts):  # all queued before the worker pulls: one batch
                await asyncio.sleep(0.01)
            stop, runs = asyncio.Event(), []
            worker = asyncio.ensure_future(
                poison_failing_worker(f"127.0.0.1:{runner.internal_port}", stop, runs))
            results = await asyncio.gather(*calls, return_exceptions=True)
            stop.set()
            await worker
    answers, poisoned = results[:20], results[20]
    assert all(isinstance(a, generation_pb2.GenerateResponse) and a.text == "ok" for a in answers), answers
    assert isinstance(poisoned, grpc.aio.AioRpcError) and poisoned.code() == grpc.StatusCode.INTERNAL
    assert "device-side assert" in poisoned.details()
    assert len(runs[0]) == 21, "the poison request was batched with its neighbours"
    assert [len(run) for run in runs if any(POISON in p for p in run)][-1] == 1, "it failed alone"


def counter(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


async def test_callers_leaving_queued_or_running_requests_log_no_asyncio_errors(caplog):
    caplog.set_level(logging.WARNING, logger="asyncio")
    queued_before = counter("magnus_cancelled_requests_total", stage="queued")
    running_before = counter("magnus_cancelled_requests_total", stage="running")
    async with inprocess_batcher(BatcherSettings(port=0, metrics_port=-1), with_worker=False) as runner:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{runner.port}") as channel, \
                grpc.aio.insecure_channel(f"127.0.0.1:{runner.internal_port}") as worker_channel:
            stub = generation_pb2_grpc.GenerationServiceStub(channel)
            stream = stub.GenerateStream(generation_pb2.GenerateStreamRequest(prompt=prompt("stream me")), timeout=30)
            assert (await stream.read()).phase == generation_pb2.REQUEST_PHASE_QUEUED
            stream.cancel()
            with pytest.raises(grpc.aio.AioRpcError) as expired:
                await stub.Generate(generation_pb2.GenerateRequest(prompt=prompt("short deadline")), timeout=0.3)
            assert expired.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            keyed = generation_pb2.Prompt(user_input="keyed", max_new_tokens=4, client_request_id="k-1")
            unary = stub.Generate(generation_pb2.GenerateRequest(prompt=keyed))
            await asyncio.sleep(0.2)
            unary.cancel()

            worker = wq_grpc.WorkerQueueServiceStub(worker_channel)
            await worker.RegisterWorker(wq.RegisterWorkerRequest(worker_id="w", kv_bytes_per_token=1, free_kv_bytes=2**40))
            running = stub.GenerateStream(generation_pb2.GenerateStreamRequest(prompt=prompt("run me")), timeout=30)
            await running.read()
            batch = (await worker.PullBatch(wq.PullBatchRequest(worker_id="w", wait_s=1))).batch
            assert (await running.read()).phase == generation_pb2.REQUEST_PHASE_STARTED
            running.cancel()
            for _ in range(100):
                if not runner.scheduler.pending:
                    break
                await asyncio.sleep(0.01)
            beat = await worker.Heartbeat(wq.HeartbeatRequest(worker_id="w", batch_id=batch.batch_id))
            assert not beat.is_lease_valid, "nobody waits for the batch: the worker is told to stop it"
            late = await worker.CompleteBatch(wq.CompleteBatchRequest(worker_id="w", batch_id=batch.batch_id))
            assert not late.is_accepted
            assert runner.scheduler.pending == {}
    gc.collect()
    await asyncio.sleep(0.05)
    assert counter("magnus_cancelled_requests_total", stage="queued") - queued_before == 3
    assert counter("magnus_cancelled_requests_total", stage="running") - running_before == 1
    errors = [r.getMessage() for r in caplog.records if r.name == "asyncio"]
    assert errors == [], errors


async def test_token_deltas_queued_together_reach_a_streamed_caller_as_one_message_in_order():
    """Deltas relayed before the caller's stream took the first of them go out merged (one gRPC message
    each costs the batcher's loop more than the tokens in it), never reordered around the phases."""
    async with inprocess_batcher(BatcherSettings(port=0, metrics_port=-1), with_worker=False) as runner:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{runner.port}") as channel, \
                grpc.aio.insecure_channel(f"127.0.0.1:{runner.internal_port}") as worker_channel:
            stub = generation_pb2_grpc.GenerationServiceStub(channel)
            worker = wq_grpc.WorkerQueueServiceStub(worker_channel)
            await worker.RegisterWorker(wq.RegisterWorkerRequest(worker_id="w", kv_bytes_per_token=1, free_kv_bytes=2**40))
            stream = stub.GenerateStream(generation_pb2.GenerateStreamRequest(prompt=prompt("stream me")), timeout=30)
            assert (await stream.read()).phase == generation_pb2.REQUEST_PHASE_QUEUED
            batch = (await worker.PullBatch(wq.PullBatchRequest(worker_id="w", wait_s=1))).batch
            assert (await stream.read()).phase == generation_pb2.REQUEST_PHASE_STARTED
            request_id = batch.items[0].request_id
            # three deltas in one report: relayed at once, before the stream's handler runs again
            await worker.StreamTokens(wq.StreamTokensRequest(worker_id="w", leases=[wq.LeaseTokens(
                batch_id=batch.batch_id, requests=[
                    wq.RequestTokens(request_id=request_id, token_offset=offset, num_tokens=1, text_delta=text)
                    for offset, text in enumerate(["Bon", "jour", " à"])])]))
            tokens = await stream.read()
            assert (tokens.phase, tokens.text_delta, tokens.num_tokens, tokens.generated_tokens) == (
                generation_pb2.REQUEST_PHASE_TOKENS, "Bonjour à", 3, 3)
            await worker.CompleteBatches(wq.CompleteBatchesRequest(worker_id="w", completions=[wq.CompleteBatchRequest(
                batch_id=batch.batch_id, run_s=0.1, results=[
                    wq.ItemResult(request_id=request_id, text="Bonjour à tous", generated_tokens=4)])]))
            rest = []
            while (event := await stream.read()) is not grpc.aio.EOF:
                rest.append(event)
            assert [(e.phase, e.text_delta, e.num_tokens) for e in rest[:-1]] == [
                (generation_pb2.REQUEST_PHASE_TOKENS, " tous", 1)]
            assert rest[-1].phase == generation_pb2.REQUEST_PHASE_FINISHED and rest[-1].result.text == "Bonjour à tous"
