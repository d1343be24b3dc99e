"""ContinuousWorkerLoop against the in-process fake WorkerQueueService of test_worker_loop."""

from __future__ import annotations

import asyncio
from concurrent.futures import Future
from dataclasses import replace

import grpc
import pytest
import pytest_asyncio

from magnus.v1 import worker_queue_pb2 as pb
from magnus.v1 import worker_queue_pb2_grpc as pb_grpc
from services.worker.continuous import ContinuousBatcher, ContinuousResult
from services.worker.continuous_loop import ContinuousWorkerLoop
from services.worker.engine import BatchOutOfMemory, EngineItem, ItemOutput, StaticBatchEngine
from services.worker.puller import SHUTTING_DOWN_MESSAGE, WorkerIdentity
from tests.worker.test_worker_loop import FAST, IDENTITY, FakeQueue, make_batch, next_report, start_fake

pytestmark = pytest.mark.asyncio


class FakeBatcher:
    """Rows that finish only when the test says so; a done future frees its row."""

    def __init__(self, slots: int) -> None:
        self.slots = slots
        self.on_slot_freed = None
        self.submitted: list[tuple[EngineItem, Future]] = []

    def submit(self, item: EngineItem) -> Future:
        future: Future = Future()
        future.add_done_callback(lambda _: self.on_slot_freed and self.on_slot_freed())
        self.submitted.append((item, future))
        return future

    def free_slots(self) -> int:
        return max(0, self.slots - sum(not future.done() for _, future in self.submitted))

    def index(self, request_id: str) -> int:
        """Where `request_id` was submitted: batches pulled by concurrent calls arrive in any order."""
        return next(i for i, (item, _) in enumerate(self.submitted) if item.request_id == request_id)

    async def finish(self, index: int, generated_tokens: int = 0, error: BaseException | None = None) -> None:
        """Complete submitted item `index` from another thread, as the engine thread does."""
        item, future = self.submitted[index]
        if error is not None:
            await asyncio.to_thread(future.set_exception, error)
            return
        tokens = generated_tokens or item.max_new_tokens
        output = ItemOutput(item.request_id, item.prompt[::-1], tokens)
        result = ContinuousResult(output, run_s=0.1 * (index + 1), queued_s=0.0, total_tokens=tokens)
        await asyncio.to_thread(future.set_result, result)


@pytest.fixture(scope="module")
def static_engine(tiny_model_dir) -> StaticBatchEngine:
    # 2 rows x 64 tokens of KV (the tiny Qwen2 has Delta = 512 bytes in float32)
    return StaticBatchEngine(
        tiny_model_dir, device="cpu", dtype="float32", backend="static", cpu_kv_budget_bytes=2 * 64 * 512
    )


@pytest_asyncio.fixture(params=["older batcher", "batch RPCs"])
async def fake(request):
    queue = FakeQueue(has_batch_rpcs=request.param == "batch RPCs")
    server, port = await start_fake(queue)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    yield queue, pb_grpc.WorkerQueueServiceStub(channel)
    await channel.close()
    await server.stop(0)


async def eventually(condition, timeout_s: float = 5.0) -> None:
    for _ in range(int(timeout_s / 0.01)):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition never held")


async def test_batches_complete_with_their_tokens_and_counts(fake, static_engine):
    queue, stub = fake
    requests = [("r1", "Translate to German: thank you", 9), ("r2", "short", 3), ("r3", "", 5), ("r4", "go on", 12)]
    alone = {r: static_engine.run([EngineItem(r, p, n)]).items[0] for r, p, n in requests}
    batcher = ContinuousBatcher(static_engine, slots=2)
    batcher.start()
    loop = ContinuousWorkerLoop(stub, batcher, IDENTITY, FAST)
    loop.start()
    await queue.batches.put(make_batch("b1", requests[:1]))
    await queue.batches.put(make_batch("b2", requests[1:]))  # 3 requests for 2 rows: one waits inside
    reports = {report.batch_id: (name, report) for name, report in [await next_report(queue) for _ in range(2)]}
    await loop.stop(1.0)
    batcher.stop(cancel=True)
    for batch_id, ids in (("b1", ["r1"]), ("b2", ["r2", "r3", "r4"])):
        name, report = reports[batch_id]
        expected = [alone[r] for r in ids]
        assert name == "CompleteBatch"
        assert [(r.request_id, r.text, r.generated_tokens) for r in report.results] == [
            (o.request_id, o.text, o.generated_tokens) for o in expected
        ]
        assert report.valid_tokens == report.total_tokens == sum(o.generated_tokens for o in expected)
        assert report.run_s > 0


async def test_pulls_only_while_a_slot_is_free_and_heartbeats_each_lease(fake):
    queue, stub = fake
    batcher = FakeBatcher(slots=2)
    loop = ContinuousWorkerLoop(stub, batcher, IDENTITY, FAST)
    loop.start()
    for i in range(3):
        await queue.batches.put(make_batch(f"b{i}", [(f"r{i}", f"prompt {i}", 4)]))
    await eventually(lambda: len(batcher.submitted) == 2)
    pulls = queue.names().count("PullBatch")  # 1 with batch RPCs (it asked for both rows), else 2
    await asyncio.sleep(0.3)  # both rows busy: no third pull meanwhile
    assert queue.names().count("PullBatch") == pulls <= 2 and len(batcher.submitted) == 2 and queue.batches.qsize() == 1
    asked = [r.max_batches for n, r in queue.calls if n == "PullBatch"]
    assert asked[0] == 2 and asked[1:] in ([], [1]), "one pull for the two free rows; an older batcher's one more"
    pulled = sorted(item.request_id for item, _ in batcher.submitted)  # two of the three, by two concurrent pulls
    first, second = batcher.index(pulled[0]), batcher.index(pulled[1])
    await batcher.finish(second, generated_tokens=3)
    name, report = await next_report(queue)
    assert (name, report.batch_id) == ("CompleteBatch", f"b{pulled[1][1:]}")
    assert (report.results[0].text, report.valid_tokens, report.total_tokens) == (
        f"{pulled[1][1:]} tpmorp", 3, 3)
    assert report.run_s == pytest.approx(0.1 * (second + 1))
    await eventually(lambda: len(batcher.submitted) == 3)  # the freed row pulled the next batch
    beats = [r.batch_id for n, r in queue.calls if n == "Heartbeat"]
    # both leases kept alive in parallel
    assert beats.count(f"b{pulled[0][1:]}") >= 3 and beats.count(f"b{pulled[1][1:]}") >= 3
    await batcher.finish(first)
    await batcher.finish(2)
    third = ({"r0", "r1", "r2"} - set(pulled)).pop()
    assert sorted([(await next_report(queue))[1].batch_id for _ in range(2)]) == sorted(
        [f"b{pulled[0][1:]}", f"b{third[1:]}"])
    await loop.stop(1.0)


async def test_a_rejected_item_fails_its_batch_and_the_others_complete(fake, static_engine):
    queue, stub = fake
    batcher = ContinuousBatcher(static_engine, slots=2)
    batcher.start()
    loop = ContinuousWorkerLoop(stub, batcher, IDENTITY, FAST)
    loop.start()
    await queue.batches.put(make_batch("ok", [("a", "fine", 4)]))
    await queue.batches.put(make_batch("too-long", [("b", "fine", 2), ("c", "word " * 50, 150)]))  # more than the whole pool
    reports = {report.batch_id: (name, report) for name, report in [await next_report(queue) for _ in range(2)]}
    await loop.stop(1.0)
    batcher.stop(cancel=True)
    assert reports["ok"][0] == "CompleteBatch" and reports["ok"][1].valid_tokens == 4
    name, failure = reports["too-long"]
    assert name == "ReportBatchFailure" and failure.kind == pb.FAILURE_KIND_OTHER
    assert "BatchRejected" in failure.message and "exceeds the KV pool of 128" in failure.message


async def test_out_of_memory_item_is_reported_as_out_of_memory(fake):
    queue, stub = fake
    batcher = FakeBatcher(slots=4)
    loop = ContinuousWorkerLoop(stub, batcher, IDENTITY, FAST)
    loop.start()
    await queue.batches.put(make_batch("big", [("a", "x", 5), ("b", "y", 5)]))
    await eventually(lambda: len(batcher.submitted) == 2)
    await batcher.finish(0)
    await batcher.finish(1, error=BatchOutOfMemory("simulated: 100 prompt tokens"))
    name, report = await next_report(queue)
    await loop.stop(1.0)
    assert name == "ReportBatchFailure" and report.kind == pb.FAILURE_KIND_OUT_OF_MEMORY
    assert "simulated" in report.message


async def test_lost_lease_cancels_the_items_and_reports_nothing(fake):
    queue, stub = fake
    queue.is_lease_valid = False
    batcher = FakeBatcher(slots=1)
    loop = ContinuousWorkerLoop(stub, batcher, IDENTITY, FAST)
    loop.start()
    await queue.batches.put(make_batch("gone", [("r", "abc", 3)]))
    await eventually(lambda: len(batcher.submitted) == 1)
    await eventually(lambda: batcher.submitted[0][1].cancelled())  # its row frees for the next batch
    queue.is_lease_valid = True
    await queue.batches.put(make_batch("next", [("s", "xyz", 1)]))
    await eventually(lambda: len(batcher.submitted) == 2)
    await batcher.finish(1)
    name, report = await next_report(queue)
    await loop.stop(1.0)
    assert (name, report.batch_id) == ("CompleteBatch", "next")
    assert queue.reports.empty()


async def test_a_request_whose_caller_left_frees_its_row_and_the_rest_of_its_batch_is_reported(fake):
    queue, stub = fake
    batcher = FakeBatcher(slots=3)
    loop = ContinuousWorkerLoop(stub, batcher, IDENTITY, FAST)
    loop.start()
    await queue.batches.put(make_batch("b", [("stay", "abc", 3), ("gone", "def", 3), ("stay2", "ghi", 3)]))
    await eventually(lambda: len(batcher.submitted) == 3)
    queue.cancelled_request_ids = ["gone"]  # the batcher's next heartbeat reply names it
    await eventually(lambda: batcher.submitted[1][1].cancelled())  # its row frees at the next step
    assert not batcher.submitted[0][1].done() and not batcher.submitted[2][1].done()
    await batcher.finish(0)
    await batcher.finish(2)
    name, report = await next_report(queue)
    await loop.stop(1.0)
    assert name == "CompleteBatch" and [r.request_id for r in report.results] == ["stay", "stay2"]


async def test_registration_announces_the_context_and_a_new_incarnation(fake):
    queue, stub = fake
    identity = replace(IDENTITY, max_context_tokens=4096)
    loop = ContinuousWorkerLoop(stub, FakeBatcher(slots=1), identity, FAST)
    loop.start()
    await eventually(lambda: "RegisterWorker" in queue.names())
    await loop.stop(1.0)
    request = next(r for n, r in queue.calls if n == "RegisterWorker")
    assert request.max_context_tokens == 4096 and request.incarnation_id == identity.incarnation_id
    assert len(request.incarnation_id) == 32
    # a new identity (a new process) is a new incarnation; replace() keeps it (the continuous server's)
    assert WorkerIdentity("w", 1, 1, "m", "cpu").incarnation_id != WorkerIdentity("w", 1, 1, "m", "cpu").incarnation_id


async def test_shutdown_hands_back_batches_that_outlive_the_grace(fake):
    queue, stub = fake
    batcher = FakeBatcher(slots=2)
    loop = ContinuousWorkerLoop(stub, batcher, IDENTITY, FAST)
    loop.start()
    await queue.batches.put(make_batch("quick", [("q", "abc", 2)]))
    await queue.batches.put(make_batch("long", [("l", "abc", 3)]))
    await eventually(lambda: len(batcher.submitted) == 2)
    stopping = asyncio.create_task(loop.stop(0.3))
    await batcher.finish(batcher.index("q"))  # finishes within the grace: completed as usual
    await stopping
    reports = {report.batch_id: (name, report) for name, report in [await next_report(queue) for _ in range(2)]}
    assert reports["quick"][0] == "CompleteBatch"
    name, failure = reports["long"]
    assert name == "ReportBatchFailure" and failure.kind == pb.FAILURE_KIND_WORKER_STOPPING
    assert failure.message == SHUTTING_DOWN_MESSAGE
    assert batcher.submitted[batcher.index("l")][1].cancelled()
    assert queue.names().count("PullBatch") >= (1 if queue.has_batch_rpcs else 2) and not loop._batches


async def test_one_pull_fills_the_free_rows_with_ready_batches(fake):
    queue, stub = fake
    for i in range(5):  # queued before the worker starts: its first pull finds all five ready
        await queue.batches.put(make_batch(f"b{i}", [(f"r{i}", f"prompt {i}", 4)]))
    batcher = FakeBatcher(slots=3)
    loop = ContinuousWorkerLoop(stub, batcher, IDENTITY, FAST)
    loop.start()
    await eventually(lambda: len(batcher.submitted) == 3)
    await asyncio.sleep(0.2)  # the rows are full: nothing more is pulled
    asked = [r.max_batches for n, r in queue.calls if n == "PullBatch"]
    assert len(batcher.submitted) == 3 and queue.batches.qsize() == 2
    assert asked == ([3] if queue.has_batch_rpcs else [3, 2, 1]), "one call with batch RPCs; else one per row"
    for index in range(3):
        await batcher.finish(index)
    await eventually(lambda: len(batcher.submitted) == 5)  # the freed rows take the last two
    for index in (3, 4):
        await batcher.finish(index)
    reports = sorted([(await next_report(queue))[1].batch_id for _ in range(5)])
    await loop.stop(1.0)
    assert reports == [f"b{i}" for i in range(5)]
