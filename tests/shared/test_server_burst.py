"""A burst of concurrent calls larger than gRPC's default pending-call limit reaches the service.

gRPC's core holds calls the event loop has not yet taken up; past 1,000 of them (by default) it
cancels new ones at random, and past 3,000 all of them (CANCELLED, before any servicer code runs). A
client burst of a few thousand calls, ordinary for a serving front, lost part of itself that way
(bench/batcher_ingest.py: 100-200 of 2,000 Generate calls). `ServiceRunner` raises the limit
(`max_unanswered_rpcs`) so that overload is the service's to answer.
"""

from __future__ import annotations

import asyncio
from collections import Counter

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.shared.server import ServiceRunner
from services.shared.settings import ServiceSettings

BURST = 5_000  # past the hard limit of gRPC's default, so the default would cancel calls for certain


async def _burst_statuses(settings: ServiceSettings) -> Counter:
    runner = ServiceRunner("burst", settings)
    port = await runner.start()
    await runner.set_serving(True)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = health_pb2_grpc.HealthStub(channel)

            async def one() -> str:
                try:
                    reply = await stub.Check(health_pb2.HealthCheckRequest(), timeout=120)
                    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
                except grpc.aio.AioRpcError as error:
                    return error.code().name

            return Counter(await asyncio.gather(*(one() for _ in range(BURST))))
    finally:
        await runner.stop()


@pytest.mark.asyncio
async def test_a_burst_past_grpcs_default_pending_limit_is_answered_whole():
    statuses = await _burst_statuses(ServiceSettings(port=0))
    assert statuses == Counter({"SERVING": BURST})
