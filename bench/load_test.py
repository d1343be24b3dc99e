"""Load test: a sustained rate, a capacity probe, then overload with client deadlines; nothing lost.

Needs the first model versions (`make bootstrap`, which `make run` does). Starts the five services
on free ports with the tiny CPU model (its own log DB copy under var/loadtest), then:
1. sustained: `--num-requests` requests as a Poisson process at `--rate` (0 skips it);
2. capacity: `--probe-requests` sent at once with a long deadline; completed/s is the capacity;
3. overload: `--overload-factor` x capacity for `--overload-s` seconds, every call with a
   `--deadline-s` client deadline. Each request must end OK within its deadline or be rejected
   (RESOURCE_EXHAUSTED, at once, by the bounded queue or deadline-aware admission); lost = sent -
   answered must be 0. The log DB then says, per request whose caller gave up (DEADLINE_EXCEEDED),
   whether the batcher dropped it before it ran, cut it while running, or ran it to the end.
Samples every service's RSS each second.

    python bench/load_test.py --rate 0 --probe-requests 300 --overload-factor 3 --overload-s 60 \
        --deadline-s 5 --out reports
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import sqlite3
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
from services.batcher.policy.config import CONTINUOUS_POLICY_NAMES  # noqa: E402
from services.shared.settings import VAR_DIR  # noqa: E402
from tools import demo  # noqa: E402
from tools.stack import Stack  # noqa: E402


@dataclass
class Phase:
    name: str
    rate_per_s: float
    statuses: Counter = field(default_factory=Counter)
    latencies_s: list[float] = field(default_factory=list)  # answered OK
    sent: int = 0
    wall_s: float = 0.0
    outcome_of: dict[str, str] = field(default_factory=dict)  # client_request_id -> error code name
    rejection_latencies_s: list[float] = field(default_factory=list)


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


async def run_phase(
    stub, phase: Phase, prompts: list[generation_pb2.Prompt], count: int, rng: random.Random,
    *, deadline_s: float = 120.0, at_once: bool = False,
) -> None:
    async def one(index: int, prompt: generation_pb2.Prompt, delay_s: float) -> None:
        await asyncio.sleep(delay_s)
        client_id = f"{phase.name}-{index}"
        request = generation_pb2.Prompt()
        request.CopyFrom(prompt)
        request.client_request_id = client_id
        started_s = time.monotonic()
        try:
            await stub.Generate(generation_pb2.GenerateRequest(prompt=request), timeout=deadline_s)
            phase.statuses["OK"] += 1
            phase.latencies_s.append(time.monotonic() - started_s)
        except grpc.aio.AioRpcError as error:
            phase.statuses[error.code().name] += 1
            phase.outcome_of[client_id] = error.code().name
            if error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                phase.rejection_latencies_s.append(time.monotonic() - started_s)

    delays_s, at_s = [], 0.0
    for _ in range(count):
        delays_s.append(at_s)
        at_s += 0.0 if at_once else rng.expovariate(phase.rate_per_s)
    started_s = time.monotonic()
    tasks = [asyncio.ensure_future(one(i, prompts[i % len(prompts)], d)) for i, d in enumerate(delays_s)]
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
        "max_latency_s": latencies[-1] if latencies else float("nan"),
        "max_rejection_latency_s": max(phase.rejection_latencies_s, default=float("nan")),
        "wall_s": phase.wall_s,
    }


def gone_callers(database_path: Path, phase: Phase) -> dict[str, int]:
    """What the batcher did with each request whose caller gave up (DEADLINE_EXCEEDED), from the log.

    dropped_before_running: the request left the queue, no work ran; cut_while_running: its work
    had started and was stopped (its row freed, or its batch revoked once every caller had gone) or
    ran on beside live neighbours in a static batch; ran_to_completion: answered to nobody.
    """
    gone = [cid for cid, code in phase.outcome_of.items() if code == "DEADLINE_EXCEEDED"]
    counts = Counter({"gave_up": len(gone), "dropped_before_running": 0, "cut_while_running": 0,
                      "ran_to_completion": 0, "not_logged": 0})
    with sqlite3.connect(database_path) as db:
        rows = dict(db.execute(
            "SELECT client_request_id, status || '|' || coalesce(error, '') FROM requests WHERE client_request_id LIKE ?",
            (f"{phase.name}-%",),
        ).fetchall())
    for client_id in gone:
        logged = rows.get(client_id)
        if logged is None:
            counts["not_logged"] += 1
        elif logged.startswith("cancelled|") and "queued" in logged:
            counts["dropped_before_running"] += 1
        elif logged.startswith("cancelled|"):
            counts["cut_while_running"] += 1
        else:
            counts["ran_to_completion"] += 1
    return dict(counts)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=30.0, help="sustained phase, requests/s")
    parser.add_argument("--num-requests", type=int, default=10_000)
    parser.add_argument("--overload-s", type=float, default=60.0, help="length of the 2x phase, s")
    parser.add_argument("--max-new-tokens", type=int, default=16, help="cap per request, tokens")
    parser.add_argument("--max-pending", type=int, default=1000, help="batcher queue bound, requests")
    parser.add_argument("--probe-requests", type=int, default=0, help="capacity probe: sent at once (0 = skip)")
    parser.add_argument("--overload-factor", type=float, default=2.0,
                        help="overload rate: this x the probe's capacity (or x --rate without a probe)")
    parser.add_argument("--deadline-s", type=float, default=120.0, help="client deadline in the overload phase, s")
    parser.add_argument("--policy", default="", help="MAGNUS_BATCHER_POLICY for the run (default: the batcher's)")
    parser.add_argument("--continuous-slots", type=int, default=64, help="worker rows for ccb / magnus_ccb")
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
            **({"MAGNUS_BATCHER_POLICY": args.policy} if args.policy else {}),
            **({"MAGNUS_WORKER_MODE": "continuous", "MAGNUS_WORKER_CONTINUOUS_SLOTS": str(args.continuous_slots)}
               if args.policy in CONTINUOUS_POLICY_NAMES else {}),
        },
    )
    requests = demo.load_requests(demo.DEFAULT_DATA_DIR, 400, args.max_new_tokens, seed=0)
    prompts = [
        generation_pb2.Prompt(instruction=r.instruction, user_input=r.user_input, max_new_tokens=r.max_new_tokens,
                              tenant_id="load")
        for r in requests
    ]
    sampler = RssSampler(stack)
    load_avg_before = os.getloadavg()[0]
    stack.start_all()
    try:
        stack.wait_healthy(timeout_s=180)
        sampler.start()
        sustained = Phase("sustained", args.rate)
        probe = Phase("capacity", 0.0)
        overload = Phase("overload", args.overload_factor * args.rate)
        rng = random.Random(0)

        async def drive() -> None:
            async with grpc.aio.insecure_channel(stack.target("batcher")) as channel:
                stub = generation_pb2_grpc.GenerationServiceStub(channel)
                if args.num_requests and args.rate:
                    await run_phase(stub, sustained, prompts, args.num_requests, rng)
                if args.probe_requests:
                    await run_phase(stub, probe, prompts, args.probe_requests, rng, deadline_s=600, at_once=True)
                    overload.rate_per_s = args.overload_factor * probe.statuses["OK"] / probe.wall_s
                    print(f"capacity {probe.statuses['OK'] / probe.wall_s:.1f} req/s; "
                          f"overload at {overload.rate_per_s:.1f} req/s for {args.overload_s:.0f} s", flush=True)
                await run_phase(stub, overload, prompts, int(args.overload_s * overload.rate_per_s), rng,
                                deadline_s=args.deadline_s)

        asyncio.run(drive())
    finally:
        sampler.stop_event.set()
        stack.stop_all()  # the log writer flushes on SIGTERM: the rows below are complete
    phases = [p for p in (sustained, probe, overload) if p.sent]
    result = {
        "machine": "2-core CPU development machine, tiny random-weight Qwen2 model on the CPU",
        "command": " ".join(["python", *sys.argv]),
        **{p.name: summarize(p) for p in phases},
        "overload_deadline_s": args.deadline_s,
        "load_avg_1m_before_and_after": [load_avg_before, os.getloadavg()[0]],
        "overload_gone_callers": gone_callers(workdir / "log.db", overload),
        "peak_rss_bytes": dict(sampler.peak_bytes),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "reliability.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return 0 if all(result[p.name]["lost"] == 0 for p in phases) else 1


if __name__ == "__main__":
    sys.exit(main())
