"""A burst to several workers, one SIGKILLed mid-way: is every request answered exactly once?

Run by bench/gpu_e2e.py --kill-one N after its phases, on the stack it built (the most workers, the
last policy run). The batcher restarts with leases of LEASE_S renewed every HEARTBEAT_S, so the dead
worker's lease is requeued within seconds instead of the run's usual ten minutes.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time

import urllib.request

from bench.arrivals import poisson_offsets_s
from bench.gpu_e2e import ARRIVAL_SEED, say, send_all

LEASE_S, HEARTBEAT_S = 20.0, 2.0


def kill_one(bench, policy: str, rows: list[dict]) -> dict:
    """{"sent", "answered", "duplicated", "errors", "victim", "killed_at_s", "wall_s"} of the burst.

    answered: calls that returned a result; duplicated: client ids with more than one completed log row.
    """
    bench.set_workers(bench.stack.num_workers)
    bench.start_batcher(bench.batcher_policy(policy), {"MAGNUS_BATCHER_LEASE_S": str(LEASE_S),
                                                       "MAGNUS_BATCHER_HEARTBEAT_INTERVAL_S": str(HEARTBEAT_S)})
    bench.stack.wait_healthy(bench.workers, timeout_s=900)
    victim = bench.workers[-1]
    tag = f"kill-one-{policy}"
    offsets = poisson_offsets_s(len(rows), bench.args.saturation_rate, ARRIVAL_SEED + 99)

    async def scenario() -> tuple[list[dict], float]:
        started_s = time.monotonic()
        calls = asyncio.ensure_future(send_all(bench.stack.target("batcher"), rows, offsets, tag))
        while not calls.done():  # mid-burst: once the victim runs a batch and a tenth of the burst was sent
            busy = await asyncio.to_thread(metric_value, bench.stack.metrics_url(victim), "magnus_worker_busy")
            if busy >= 1 and time.monotonic() - started_s >= offsets[len(offsets) // 10]:
                break
            await asyncio.sleep(0.1)
        killed_at_s = time.monotonic() - started_s
        bench.stack.kill(victim)
        say(f"SIGKILLed {victim} {killed_at_s:.1f} s into the burst")
        return await calls, killed_at_s

    started_s = time.monotonic()
    records, killed_at_s = asyncio.run(scenario())
    wall_s = time.monotonic() - started_s
    client_ids = [f"{tag}-{i}" for i in range(len(rows))]
    result = {
        "sent": len(rows),
        "answered": sum(r["status"] == "OK" for r in records),
        "duplicated": duplicated(bench.database, client_ids),
        "errors": sorted({r["status"] for r in records} - {"OK"}),
        "victim": victim, "killed_at_s": killed_at_s, "wall_s": wall_s,
    }
    say(f"kill one: {result}")
    return result


def metric_value(url: str, name: str) -> float:
    """One unlabelled sample of a /metrics page (0 if absent or unreachable)."""
    try:
        with urllib.request.urlopen(url, timeout=5) as page:
            lines = page.read().decode().splitlines()
    except OSError:
        return 0.0
    return next((float(line.split()[1]) for line in lines if line.startswith(f"{name} ")), 0.0)


def duplicated(database, client_ids: list[str], timeout_s: float = 15.0) -> int:
    """Client ids with more than one completed log row (waits for the log writer to flush them all)."""
    marks = ",".join("?" * len(client_ids))
    deadline_s = time.monotonic() + timeout_s
    while True:
        with sqlite3.connect(database, timeout=30) as db:
            counts = [n for (n,) in db.execute(
                f"SELECT COUNT(*) FROM requests WHERE status = 'completed' AND client_request_id IN ({marks}) "
                "GROUP BY client_request_id", client_ids)]
        if len(counts) >= len(client_ids) or time.monotonic() > deadline_s:
            return sum(n > 1 for n in counts)
        time.sleep(0.3)
