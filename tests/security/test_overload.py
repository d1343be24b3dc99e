"""Overload over real gRPC: per-tenant and global caps answer RESOURCE_EXHAUSTED with retry-after;
a caller that leaves (deadline, cancel) takes its request out of the queue."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from magnus.v1 import generation_pb2, generation_pb2_grpc
from services.batcher.config import BatcherSettings
from tests.inprocess_batcher import inprocess_batcher


def _request(tenant: str) -> generation_pb2.GenerateStreamRequest:
    return generation_pb2.GenerateStreamRequest(
        prompt=generation_pb2.Prompt(user_input="translate me please", max_new_tokens=4, tenant_id=tenant)
    )


async def _queued(stub, tenant: str):
    """Open a stream and wait for QUEUED (admitted); returns the live call."""
    call = stub.GenerateStream(_request(tenant), timeout=30)
    first = await call.read()
    assert first.phase == generation_pb2.REQUEST_PHASE_QUEUED
    return call


async def _refusal(stub, tenant: str) -> grpc.aio.AioRpcError:
    call = stub.GenerateStream(_request(tenant), timeout=30)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await call.read()
    return refused.value


@pytest.mark.asyncio
async def test_per_tenant_and_global_limits_with_retry_after():
    settings = BatcherSettings(port=0, max_pending_requests=5, max_pending_per_tenant=3)
    async with inprocess_batcher(settings, with_worker=False) as runner:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{runner.port}") as channel:
            stub = generation_pb2_grpc.GenerationServiceStub(channel)
            noisy = [await _queued(stub, "noisy") for _ in range(3)]
            refused = await _refusal(stub, "noisy")
            assert refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "tenant 'noisy'" in refused.details()
            assert float(dict(refused.trailing_metadata())["retry-after-s"]) > 0
            quiet = [await _queued(stub, "quiet") for _ in range(2)]  # the noisy tenant did not starve it
            full = await _refusal(stub, "third")
            assert full.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "queue full" in full.details()

            noisy[0].cancel()  # the caller left: its queued request is dropped, its share is free
            for _ in range(100):
                if runner.scheduler.pending_by_tenant["noisy"] == 2:
                    break
                await asyncio.sleep(0.01)
            assert runner.scheduler.pending_by_tenant["noisy"] == 2
            noisy.append(await _queued(stub, "noisy"))
            for call in noisy[1:] + quiet:
                call.cancel()
            for _ in range(100):
                if not runner.scheduler.pending:
                    break
                await asyncio.sleep(0.01)
            assert runner.scheduler.pending == {} and not runner.scheduler.pending_by_tenant


@pytest.mark.asyncio
async def test_an_expired_deadline_takes_the_request_out_of_the_queue():
    async with inprocess_batcher(BatcherSettings(port=0), with_worker=False) as runner:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{runner.port}") as channel:
            stub = generation_pb2_grpc.GenerationServiceStub(channel)
            prompt = generation_pb2.Prompt(user_input="no worker will run this", max_new_tokens=4)
            with pytest.raises(grpc.aio.AioRpcError) as expired:
                await stub.Generate(generation_pb2.GenerateRequest(prompt=prompt), timeout=0.3)
            assert expired.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            for _ in range(100):
                if not runner.scheduler.pending:
                    break
                await asyncio.sleep(0.01)
            assert runner.scheduler.pending == {}, "no worker time is spent on a request nobody waits for"
            assert len(runner.scheduler.open_batches) == 0 or all(
                b.size == 0 for b in runner.scheduler.open_batches.values()
            )
