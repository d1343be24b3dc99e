"""WorkerLoop against an in-process fake WorkerQueueService (grpc.aio on a local port)."""

from __future__ import annotations

import asyncio
import socket
import threading
import time

import grpc
import pytest
import pytest_asyncio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from magnus.v1 import worker_queue_pb2 as pb
from magnus.v1 import worker_queue_pb2_grpc as pb_grpc
from services.shared.rpc import add_servicer
from services.worker.config import WorkerSettings
from services.worker.engine import BatchCancelled, BatchOutOfMemory, BatchOutput, EngineItem, ItemOutput
from services.worker.puller import SHUTTING_DOWN_MESSAGE, LoopTiming, WorkerIdentity, WorkerLoop
from services.worker.server import serve

pytestmark = pytest.mark.asyncio

FAST = LoopTiming(
    pull_wait_s=0.2, rpc_timeout_s=2.0, heartbeat_interval_s=0.05, backoff_initial_s=0.05, backoff_max_s=0.2
)
IDENTITY = WorkerIdentity("w1", kv_bytes_per_token=512, free_kv_bytes=1 << 30, model_name="tiny", device="cpu")


class FakeQueue:
    """Hands out the batches put in `batches`; records every call as (method, request). With
    `has_batch_rpcs` a pull leases up to max_batches ready batches and CompleteBatches works (each of its
    completions reported as a CompleteBatch); without, it is an older batcher: one batch a pull and
    CompleteBatches UNIMPLEMENTED."""

    def __init__(self, heartbeat_interval_s: float = 0.05, has_batch_rpcs: bool = False) -> None:
        self.has_batch_rpcs = has_batch_rpcs
        self.batches: asyncio.Queue[pb.Batch] = asyncio.Queue()
        self.calls: list[tuple[str, object]] = []
        self.reports: asyncio.Queue[tuple[str, object]] = asyncio.Queue()
        self.heartbeat_interval_s = heartbeat_interval_s
        self.is_lease_valid = True
        self.cancelled_request_ids: list[str] = []  # told in every heartbeat of a batch
        self.known_workers: set[str] = set()

    def names(self) -> list[str]:
        return [name for name, _ in self.calls]

    async def RegisterWorker(self, request, context):
        self.calls.append(("RegisterWorker", request))
        self.known_workers.add(request.worker_id)
        return pb.RegisterWorkerResponse(lease_s=5.0, heartbeat_interval_s=self.heartbeat_interval_s)

    async def PullBatch(self, request, context):
        self.calls.append(("PullBatch", request))
        try:
            batch = await asyncio.wait_for(self.batches.get(), request.wait_s)
        except TimeoutError:
            return pb.PullBatchResponse()
        more = []
        while self.has_batch_rpcs and len(more) < request.max_batches - 1 and not self.batches.empty():
            more.append(self.batches.get_nowait())
        return pb.PullBatchResponse(batch=batch, more_batches=more)

    async def CompleteBatch(self, request, context):
        self.calls.append(("CompleteBatch", request))
        await self.reports.put(("CompleteBatch", request))
        return pb.CompleteBatchResponse(is_accepted=True)

    async def CompleteBatches(self, request, context):
        self.calls.append(("CompleteBatches", request))
        if not self.has_batch_rpcs:
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, "Method not found!")
        for completion in request.completions:
            await self.reports.put(("CompleteBatch", completion))
        return pb.CompleteBatchesResponse(is_accepted=[True] * len(request.completions))

    async def ReportBatchFailure(self, request, context):
        self.calls.append(("ReportBatchFailure", request))
        await self.reports.put(("ReportBatchFailure", request))
        return pb.ReportBatchFailureResponse(is_accepted=True)

    async def StreamTokens(self, request, context):
        self.calls.append(("StreamTokens", request))
        return pb.StreamTokensResponse()

    async def Heartbeat(self, request, context):
        self.calls.append(("Heartbeat", request))
        return pb.HeartbeatResponse(
            is_lease_valid=self.is_lease_valid,
            is_registered=request.worker_id in self.known_workers,
            cancelled_request_ids=self.cancelled_request_ids if request.batch_id else [],
        )


async def start_fake(queue: FakeQueue, port: int = 0) -> tuple[grpc.aio.Server, int]:
    server = grpc.aio.server()
    add_servicer(server, pb, "WorkerQueueService", queue)
    bound = server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    return server, bound


def make_batch(batch_id: str, items: list[tuple[str, str, int]]) -> pb.Batch:
    return pb.Batch(
        batch_id=batch_id,
        items=[pb.BatchItem(request_id=r, prompt=p, max_new_tokens=n) for r, p, n in items],
        lease_s=5.0,
    )


class FakeRunner:
    """Echo engine: text is the reversed prompt, every row runs to its max_new_tokens."""

    def __init__(self, sleep_s: float = 0.0, oom_batches: int = 0) -> None:
        self.sleep_s = sleep_s
        self.oom_batches = oom_batches

    def run(self, items, cancel: threading.Event | None = None, preemption=None) -> BatchOutput:
        deadline_s = time.monotonic() + self.sleep_s
        while time.monotonic() < deadline_s:
            if cancel is not None and cancel.is_set():
                raise BatchCancelled("cancelled")
            time.sleep(0.01)
        if self.oom_batches:
            self.oom_batches -= 1
            raise BatchOutOfMemory("simulated: 4 x 100 tokens")
        outs = [ItemOutput(i.request_id, i.prompt[::-1], i.max_new_tokens) for i in items]
        steps = max(i.max_new_tokens for i in items)
        return BatchOutput(outs, sum(o.generated_tokens for o in outs), len(items) * steps, steps, self.sleep_s)


@pytest_asyncio.fixture
async def fake():
    queue = FakeQueue()
    server, port = await start_fake(queue)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    yield queue, pb_grpc.WorkerQueueServiceStub(channel), port
    await channel.close()
    await server.stop(0)


async def next_report(queue: FakeQueue, timeout_s: float = 10.0):
    return await asyncio.wait_for(queue.reports.get(), timeout_s)


async def test_register_pull_complete_with_real_engine(fake, engine):
    queue, stub, _ = fake
    loop = WorkerLoop(stub, engine, IDENTITY, FAST)
    loop.start()
    items = [("r1", "Translate to German: thank you", 4), ("r2", "修正语法：他们是去学校了昨天。", 6)]
    await queue.batches.put(make_batch("b1", items))
    name, report = await next_report(queue)
    await loop.stop(1.0)
    expected = engine.run([EngineItem(*item) for item in items])
    assert name == "CompleteBatch"
    assert queue.names()[:2] == ["RegisterWorker", "PullBatch"]
    register = queue.calls[0][1]
    assert (register.worker_id, register.kv_bytes_per_token, register.free_kv_bytes) == ("w1", 512, 1 << 30)
    assert report.batch_id == "b1" and report.worker_id == "w1"
    assert [(r.request_id, r.text, r.generated_tokens) for r in report.results] == [
        (o.request_id, o.text, o.generated_tokens) for o in expected.items
    ]
    assert (report.valid_tokens, report.total_tokens) == (10, 2 * 6)
    assert report.run_s > 0


async def test_heartbeats_during_a_slow_batch(fake):
    queue, stub, _ = fake
    loop = WorkerLoop(stub, FakeRunner(sleep_s=0.5), IDENTITY, FAST)
    loop.start()
    await queue.batches.put(make_batch("slow", [("r", "abc", 3)]))
    name, report = await next_report(queue)
    await loop.stop(1.0)
    assert name == "CompleteBatch" and report.results[0].text == "cba"
    during = [r for n, r in queue.calls[: queue.names().index("CompleteBatch")] if n == "Heartbeat"]
    assert len([r for r in during if r.batch_id == "slow"]) >= 3  # every 0.05 s over 0.5 s


async def test_oom_is_reported_and_worker_keeps_serving(fake):
    queue, stub, _ = fake
    loop = WorkerLoop(stub, FakeRunner(oom_batches=1), IDENTITY, FAST)
    loop.start()
    await queue.batches.put(make_batch("big", [("a", "x", 5), ("b", "y", 5)]))
    await queue.batches.put(make_batch("half", [("a", "x", 5)]))
    first, second = await next_report(queue), await next_report(queue)
    await loop.stop(1.0)
    assert first[0] == "ReportBatchFailure"
    assert first[1].batch_id == "big" and first[1].kind == pb.FAILURE_KIND_OUT_OF_MEMORY
    assert "simulated" in first[1].message
    assert second[0] == "CompleteBatch" and second[1].batch_id == "half"


async def test_survives_batcher_down_at_start():
    with socket.socket() as probe:  # a port nobody listens on yet
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    loop = WorkerLoop(pb_grpc.WorkerQueueServiceStub(channel), FakeRunner(), IDENTITY, FAST)
    task = loop.start()
    await asyncio.sleep(0.6)  # several failed registrations with backoff
    assert not task.done() and not loop.is_registered
    queue = FakeQueue()
    server, _ = await start_fake(queue, port)
    try:
        await queue.batches.put(make_batch("late", [("r", "hello", 2)]))
        name, report = await next_report(queue)
        assert name == "CompleteBatch" and report.batch_id == "late"
        await loop.stop(1.0)
    finally:
        await channel.close()
        await server.stop(0)


async def test_lost_lease_drops_result_quietly(fake):
    queue, stub, _ = fake
    queue.is_lease_valid = False
    runner = FakeRunner(sleep_s=2.0)
    loop = WorkerLoop(stub, runner, IDENTITY, FAST)
    loop.start()
    started_s = time.monotonic()
    await queue.batches.put(make_batch("gone", [("r", "abc", 3)]))
    while not any(n == "Heartbeat" and r.batch_id == "gone" for n, r in queue.calls):
        await asyncio.sleep(0.01)
    queue.is_lease_valid = True  # the answer for "gone" is out; later batches keep their lease
    runner.sleep_s = 0.0
    await queue.batches.put(make_batch("next", [("s", "xyz", 1)]))
    name, report = await next_report(queue)
    await loop.stop(1.0)
    assert (name, report.batch_id) == ("CompleteBatch", "next")  # nothing was reported for "gone"
    assert queue.reports.empty()
    assert time.monotonic() - started_s < 1.5  # "gone" was cancelled, not run for its 2 s


async def test_reregisters_when_batcher_forgets_the_worker(fake):
    queue, stub, _ = fake
    loop = WorkerLoop(stub, FakeRunner(), IDENTITY, FAST)
    loop.start()
    while not loop.is_registered:
        await asyncio.sleep(0.02)
    queue.known_workers.clear()  # as after a batcher restart
    for _ in range(100):
        if queue.names().count("RegisterWorker") >= 2:
            break
        await asyncio.sleep(0.02)
    await loop.stop(1.0)
    assert queue.names().count("RegisterWorker") >= 2


async def test_shutdown_hands_back_a_batch_that_outlives_the_grace(fake):
    queue, stub, _ = fake
    loop = WorkerLoop(stub, FakeRunner(sleep_s=30.0), IDENTITY, FAST)
    loop.start()
    await queue.batches.put(make_batch("long", [("r", "abc", 3)]))
    while "Heartbeat" not in queue.names():
        await asyncio.sleep(0.02)
    started_s = time.monotonic()
    await loop.stop(0.2)
    name, report = await next_report(queue, 1.0)
    assert time.monotonic() - started_s < 2.0
    assert name == "ReportBatchFailure" and report.kind == pb.FAILURE_KIND_WORKER_STOPPING
    assert report.message == SHUTTING_DOWN_MESSAGE


async def test_server_health_serving_after_registration(fake):
    queue, _, port = fake
    settings = WorkerSettings(port=0, batcher_target=f"127.0.0.1:{port}", worker_id="w-health", pull_wait_s=0.2)
    from services.shared.server import ServiceRunner

    runner = ServiceRunner("worker", settings)
    task = asyncio.create_task(serve(settings, engine=_FakeEngine(), runner=runner))
    while runner.port == 0:
        await asyncio.sleep(0.02)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{runner.port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for _ in range(200):
            status = (await health.Check(health_pb2.HealthCheckRequest())).status
            if status == health_pb2.HealthCheckResponse.SERVING:
                break
            await asyncio.sleep(0.02)
        assert status == health_pb2.HealthCheckResponse.SERVING
        assert ("RegisterWorker", "w-health") in [(n, r.worker_id) for n, r in queue.calls]
    runner.request_shutdown()
    await asyncio.wait_for(task, 5.0)


class _FakeEngine(FakeRunner):
    kv_bytes_per_token = 512
    free_kv_bytes = 1 << 20
    max_context_tokens = 4096
    device_name = "cpu"

    class model_dir:  # noqa: N801 - stands in for a Path
        name = "fake"

    def warm_up(self, max_rows: int, max_attend_tokens: int = 0) -> None:  # nothing to compile or capture
        pass
