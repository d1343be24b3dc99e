"""Load test: a sustained rate the stack holds, then twice that rate; nothing may be lost.

Needs the first model versions (`make bootstrap`, which `make run` does). Starts the five services
on free ports with the tiny CPU model (its own log DB copy under var/loadtest), then sends
`--num-requests` requests as a Poisson process at `--rate`, then `2 x rate` for `--overload-s`
seconds. Every request must end with a response or a clear status (RESOURCE_EXHAUSTED when the
bounded queue is full): lost = sent - answered must be 0. Samples every service's RSS each second.

    python bench/load_test.py --rate 30 --num-requests 10000 --overload-s 60 --out reports
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import shutil
import statistics
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from magnus.v1 import generation_pb2, generation_pb2_grpc  # noqa: E402
from services.shared.settings import VAR_DIR  # noqa: E402
from tools import demo  # noqa: E402
from tools.stack import SERVICES, Stack  # noqa: E402


@dataclass
class Phase:
    name: str
    rate_per_s: float
    statuses: Counter = field(default_factory=Counter)
    latencies_s: list[float] = field(default_factory=list)  # answered OK
    sent: int = 0
    wall_s: float = 0.0


def rss_bytes(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class RssSampler(threading.Thread):
    def __init__(self, stack: Stack) -> None:
        super().__init__(daemon=True)
        self.stack, self.peak_bytes, self.stop_event = stack, Counter(), threading.Event()

    def run(self) -> None:
        while not self.stop_event.wait(1.0):
            for name, process in self.stack.processes.items():
                self.peak_bytes[name] = max(self.peak_bytes[name], rss_bytes(process.pid))


async def run_phase(stub, phase: Phase, prompts: list[generation_pb2.Prompt], count: int, rng: random.Random) -> None:
    async def one(prompt: generation_pb2.Prompt, delay_s: float) -> None:
        await asyncio.sleep(delay_s)
        started_s = time.monotonic()
        try:
            await stub.Generate(generation_pb2.GenerateRequest(prompt=prompt), timeout=120)
            phase.statuses["OK"] += 1
            phase.latencies_s.append(time.monotonic() - started_s)
        except grpc.aio.AioRpcError as error:
            phase.statuses[error.code().name] += 1

    delays_s, at_s = [], 0.0
    for _ in range(count):
        delays_s.append(at_s)
        at_s += rng.expovariate(phase.rate_per_s)
    started_s = time.monotonic()
    tasks = [asyncio.ensure_future(one(prompts[i % len(prompts)], d)) for i, d in enumerate(delays_s)]
    phase.sent = len(tasks)
    await asyncio.gather(*tasks)
    phase.wall_s = time.monotonic() - started_s


def summarize(phase: Phase) -> dict:
    latencies = sorted(phase.latencies_s)
    answered = sum(phase.statuses.values())

    def pct(q: float) -> float:
        return latencies[min(len(latencies) - 1, int(q * (len(latencies) - 1)))] if latencies else float("nan")

    return {
        "offered_rate_per_s": phase.rate_per_s,
        "sent": phase.sent,
        "answered": answered,
        "lost": phase.sent - answered,
        "statuses": dict(phase.statuses),
        "completed_per_s": phase.statuses["OK"] / phase.wall_s if phase.wall_s else 0.0,
        "p50_latency_s": pct(0.50),
        "p99_latency_s": pct(0.99),
        "mean_latency_s": statistics.fmean(latencies) if latencies else float("nan"),
        "wall_s": phase.wall_s,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=30.0, help="sustained phase, requests/s")
    parser.add_argument("--num-requests", type=int, default=10_000)
    parser.add_argument("--overload-s", type=float, default=60.0, help="length of the 2x phase, s")
    parser.add_argument("--max-new-tokens", type=int, default=16, help="cap per request, tokens")
    parser.add_argument("--max-pending", type=int, default=1000, help="batcher queue bound, requests")
    parser.add_argument("--out", type=Path, default=Path("reports"))
    args = parser.parse_args()

    workdir = VAR_DIR / "loadtest"
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    source_db = VAR_DIR / "magnus.db"
    if not source_db.exists():
        sys.exit("no var/magnus.db with model versions: run `make bootstrap` (or `make run`) first")
    shutil.copy(source_db, workdir / "log.db")
    stack = Stack(
        workdir=workdir,
        database_url=f"sqlite+aiosqlite:///{workdir / 'log.db'}",
        model_store_dir=VAR_DIR / "model-store",
        extra_env={
            "MAGNUS_BATCHER_MAX_PENDING_REQUESTS": str(args.max_pending),
            "MAGNUS_BATCHER_MAX_PENDING_PER_TENANT": str(args.max_pending),
        },
    )
    requests = demo.load_requests(demo.DEFAULT_DATA_DIR, 400, args.max_new_tokens, seed=0)
    prompts = [
        generation_pb2.Prompt(instruction=r.instruction, user_input=r.user_input, max_new_tokens=r.max_new_tokens,
                              tenant_id="load")
        for r in requests
    ]
    sampler = RssSampler(stack)
    stack.start_all()
    try:
        stack.wait_healthy(timeout_s=180)
        sampler.start()
        sustained = Phase("sustained", args.rate)
        overload = Phase("overload", 2 * args.rate)
        rng = random.Random(0)

        async def drive() -> None:
            async with grpc.aio.insecure_channel(stack.target("batcher")) as channel:
                stub = generation_pb2_grpc.GenerationServiceStub(channel)
                await run_phase(stub, sustained, prompts, args.num_requests, rng)
                await run_phase(stub, overload, prompts, int(args.overload_s * overload.rate_per_s), rng)

        asyncio.run(drive())
    finally:
        sampler.stop_event.set()
        stack.stop_all()
    result = {
        "machine": "2-core CPU development machine, tiny random-weight Qwen2 model on the CPU",
        "command": " ".join(["python", *sys.argv]),
        "sustained": summarize(sustained),
        "overload": summarize(overload),
        "peak_rss_bytes": dict(sampler.peak_bytes),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "reliability.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return 0 if result["sustained"]["lost"] == 0 and result["overload"]["lost"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
