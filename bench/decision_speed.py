"""Batcher decision speed: admit one request and choose one batch with 10,000 requests queued.

`python bench/decision_speed.py` (or `make bench-decisions`) fills a BatchQueue with 10,000
requests through the real insertion rule, then times `choose_for` + `add_member` (admit) and
`choose_next` (choose) one call at a time, on one core, and writes
reports/simulation/decision_speed.{md,json}. Scenarios: the paper tasks' lengths under magnus and
glp, and a worst case where every request is alone in its batch (10,000 batches).
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from services.batcher.policy.rules import MemoryBudget  # noqa: E402
from services.batcher.policy.batch import Member, QueuedBatch  # noqa: E402
from services.batcher.policy.batch_queue import BatchQueue  # noqa: E402
from services.batcher.policy.config import make_policy  # noqa: E402

NUM_QUEUED = 10_000
NUM_TIMED = 2_000
BUDGET = MemoryBudget(kv_bytes_per_token=524_288, free_kv_bytes=63_800_000_000)
OUT = Path("reports/simulation")


def lengths(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Prompt and generation tokens shaped like the paper tasks (log-normal, median ~50, tail ~2,000)."""
    return (np.clip(rng.lognormal(4.0, 0.8, n), 5, 2000).astype(int), np.clip(rng.lognormal(3.7, 1.0, n), 1, 2000).astype(int))


def fill(policy, rng) -> tuple[BatchQueue, int]:
    queue = BatchQueue()
    input_tokens, gen_tokens = lengths(rng, NUM_QUEUED)
    for i in range(NUM_QUEUED):
        member = Member(f"r{i}", int(input_tokens[i]), int(gen_tokens[i]), float(i) * 1e-3)
        admit(queue, member, policy)
    for batch in list(queue.values())[::2]:  # half the batches have an estimate, as in serving
        queue.set_estimate(batch.batch_id, batch.revision, 1.0 + batch.gen_tokens_max * 0.05, 1)
    return queue, len(queue)


def admit(queue: BatchQueue, member: Member, policy) -> None:
    batch = queue.choose_for(member, policy, BUDGET)
    if batch is None:
        batch = QueuedBatch(f"b{member.request_id}")
        queue.append(batch)
    queue.add_member(batch, member)


def time_scenario(name: str, policy, rng, num_timed: int = NUM_TIMED) -> dict:
    queue, num_batches = fill(policy, rng)
    input_tokens, gen_tokens = lengths(rng, num_timed)
    admit_us, choose_us = [], []
    for i in range(num_timed):
        member = Member(f"t{i}", int(input_tokens[i]), int(gen_tokens[i]), 100.0 + i * 1e-3)
        started = time.perf_counter()
        admit(queue, member, policy)
        admit_us.append(1e6 * (time.perf_counter() - started))
        started = time.perf_counter()
        if policy.times_batches_itself:  # packing: the choice merges requests; take them and put them back
            taken = queue.take_next(policy, 200.0 + i * 1e-3, BUDGET, lambda: f"p{i}")
            choose_us.append(1e6 * (time.perf_counter() - started))
            for member in taken.members:  # back in the queue, untimed: it stays 10,000 deep
                admit(queue, member, policy)
        else:
            queue.choose_next(policy, 200.0 + i * 1e-3)
            choose_us.append(1e6 * (time.perf_counter() - started))
    def stats(xs):
        return {"median_us": round(statistics.median(xs), 1), "p99_us": round(float(np.percentile(xs, 99)), 1)}
    return {"scenario": name, "queued_requests": NUM_QUEUED, "queued_batches": num_batches, "admit": stats(admit_us), "choose": stats(choose_us)}


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine()


def main() -> int:
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})  # one core, as the issue asks
    rng = np.random.default_rng(0)
    scenarios = [
        ("magnus, Phi 10,000, paper-task lengths", make_policy("magnus", phi_token_reads=10_000, fixed_batch_size=8, max_batch_size=None)),
        ("glp, batch 8, paper-task lengths", make_policy("glp", phi_token_reads=10_000, fixed_batch_size=8, max_batch_size=None)),
        ("magnus, worst case: every request alone (Phi 1)", make_policy("magnus", phi_token_reads=1, fixed_batch_size=8, max_batch_size=None)),
    ]
    results = [time_scenario(name, policy, rng) for name, policy in scenarios]
    # packing builds the batch at pull time from up to pack.MAX_CANDIDATE_ROWS requests: milliseconds
    pack = make_policy("magnus_pack", phi_token_reads=10_000, fixed_batch_size=8, max_batch_size=256)
    results.append(time_scenario("magnus_pack, batches up to 256, paper-task lengths (choose = pack and take)",
                                 pack, rng, num_timed=200))
    machine = f"{cpu_model()}, {os.cpu_count()} cores (pinned to 1), Python {platform.python_version()}"
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "decision_speed.json").write_text(json.dumps({"machine": machine, "results": results}, indent=2) + "\n")
    lines = [
        "# Batcher decision speed",
        "",
        f"Command: `python bench/decision_speed.py` (`make bench-decisions`). Machine: {machine}.",
        f"Each scenario queues {NUM_QUEUED:,} requests with the real insertion rule, then times {NUM_TIMED:,} admissions"
        " (choose_for + add_member) and choices (choose_next, the batch stays queued) one call at a time"
        " (magnus_pack: 200 calls of take_next, whose requests are then queued again, untimed).",
        "",
        "| scenario | queued batches | admit median / p99 (us) | choose median / p99 (us) |",
        "|---|---:|---:|---:|",
    ]
    for r in results:
        lines.append(
            f"| {r['scenario']} | {r['queued_batches']:,} | {r['admit']['median_us']} / {r['admit']['p99_us']} |"
            f" {r['choose']['median_us']} / {r['choose']['p99_us']} |"
        )
    (OUT / "decision_speed.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
