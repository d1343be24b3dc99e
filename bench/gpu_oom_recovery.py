"""A forced OOM on the real engine, recovered by the real scheduler's split-and-requeue.

The worker registers with four times its true Theta, so the batcher's memory cap lets through a
batch the KV pool cannot hold (the cap bypassed, as a mispredicted length would). The engine
reports out-of-memory, the scheduler splits the batch into halves and requeues them, and the loop
runs until every request has completed. No gRPC here: the scheduler and engine objects are the
ones the services use, driven directly.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable
from datetime import UTC, datetime
import time

from services.batcher.domain import BatchReport, GenerationInput, ItemOutput, PendingRequest, Prediction, WorkerInfo
from services.batcher.policy.config import make_policy
from services.batcher.scheduler import Clock, Scheduler, SchedulerLimits
from services.worker.engine import BatchOutOfMemory


class _ListSink:
    def __init__(self) -> None:
        self.requests: list[dict] = []
        self.batches: list[dict] = []

    def add_request(self, row: dict) -> None:
        self.requests.append(row)

    def add_batch(self, row: dict) -> None:
        self.batches.append(row)


async def _recover(engine, say: Callable[[str], None], num_requests: int, prompt_tokens: int, new_tokens: int) -> dict:
    clock = Clock(monotonic_s=time.monotonic, wall=lambda: datetime.now(UTC))
    sink = _ListSink()
    policy = make_policy("magnus", phi_token_reads=1e12, fixed_batch_size=8, max_batch_size=None)
    scheduler = Scheduler(policy, SchedulerLimits(max_pending_requests=100_000), clock, sink)
    scheduler.register(
        WorkerInfo("gpu-0", engine.kv_bytes_per_token, 4 * engine.free_kv_bytes, 0, "bench", engine.device_name, 0.0)
    )
    rng = random.Random(1)
    vocab = engine.model.config.vocab_size
    prompts: dict[str, list[int]] = {}
    loop = asyncio.get_running_loop()
    for index in range(num_requests):
        request_id = f"r{index:04d}"
        prompts[request_id] = [rng.randrange(3, vocab) for _ in range(prompt_tokens)]
        scheduler.admit(
            PendingRequest(
                request_id=request_id,
                generation=GenerationInput("", "x", new_tokens, "", "bench"),
                prediction=Prediction(prompt_tokens, new_tokens, 0, False),
                prompt="",
                arrival_s=clock.monotonic_s(),
                queued_at=clock.wall(),
                future=loop.create_future(),
            )
        )
    await asyncio.sleep(0)
    num_ooms = 0
    while scheduler.num_in_flight:
        lease = scheduler.pull("gpu-0")
        if not hasattr(lease, "batch"):
            lease = await asyncio.wait_for(lease, timeout=5)
        batch = lease.batch
        ids = [prompts[m.request_id] for m in batch.members]
        try:
            output = engine.run_ids(ids, [new_tokens] * len(ids), stop_at_eos=False)
        except BatchOutOfMemory as error:
            num_ooms += 1
            say(f"oom: batch {batch.batch_id[:8]} of {batch.size} x ({prompt_tokens} + {new_tokens}) tokens: {error}")
            scheduler.fail("gpu-0", batch.batch_id, is_out_of_memory=True, message=str(error))
            continue
        outputs = [
            ItemOutput(m.request_id, "", len(row)) for m, row in zip(batch.members, output.generated_ids, strict=True)
        ]
        valid = sum(len(row) for row in output.generated_ids)
        scheduler.complete(
            "gpu-0", batch.batch_id, BatchReport(outputs, output.run_s, valid, len(ids) * output.steps)
        )
        say(f"ok:  batch {batch.batch_id[:8]} of {batch.size} requests in {output.run_s:.2f} s "
            f"(parent {str(batch.parent_batch_id)[:8]})")
    completed = [r for r in sink.requests if r["status"] == "completed"]
    say(f"oom recovery: {len(completed)}/{num_requests} requests completed after {num_ooms} OOM split(s)")
    return dict(num_requests=num_requests, num_completed=len(completed), num_ooms=num_ooms,
                batches=[{k: b[k] for k in ("size", "outcome", "parent_batch_id")} for b in sink.batches])


def run_oom_recovery(engine, say: Callable[[str], None], *, tiny: bool) -> dict:
    """Admit a batch 1.6x larger than the KV pool holds; return what happened."""
    prompt_tokens, new_tokens = (16, 8) if tiny else (1024, 64)
    per_request_tokens = prompt_tokens + new_tokens
    num_requests = max(2, int(1.6 * engine.static.capacity_tokens / per_request_tokens))
    return asyncio.run(_recover(engine, say, num_requests, prompt_tokens, new_tokens))
