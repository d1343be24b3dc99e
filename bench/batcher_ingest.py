"""The batcher's ingest: how fast Generate calls become queued requests, and its CPU per request.

On the H200 host the services' burst is bounded by the batcher's admission (serving_e2e_ab run 12: 1,000
requests sent at 400 req/s were queued at ~210 req/s, then run at once by the worker). This bench takes
the GPU out: it starts the predictor, the estimator and the batcher from a bootstrapped state (e.g.
`var/e2e/state`, `bash bench/gpu_setup.sh`), registers a fake continuous worker in this process that
leases every ready batch and completes each after --hold-s seconds (so leases pile up as on the GPU),
and sends --requests mix prompts as fast as one asyncio client can (or at --rate), each with a
deadline as clients give (--stream: as GenerateStream callers, the fake worker streaming their tokens). Reported per repeat: the queued rate (requests over the span of their
queued_at stamps), the batcher's CPU seconds per 1,000 requests (from /proc: user + system over the
whole run, completions and pulls included) and the client's rate.

    python bench/batcher_ingest.py --state var/e2e/state --workload var/e2e/workload.jsonl \
        [--base var/old] [--repeats 2] [--out reports/batcher_ingest.json]

--base runs the batcher from another tree too (the A/B on one machine), alternating with this one;
--policies runs each batcher policy in turn. --ms-per-token makes each request take its length in steps
of that many ms (the burst's tail then shows, as on the GPU; reports/gpu/serving_tail).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import sqlite3
import statistics
import subprocess
import sys
import time
from pathlib import Path

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.gpu_e2e import import_calibration, send_all  # noqa: E402
from bench.percentile import nearest_rank  # noqa: E402
from magnus.v1 import worker_queue_pb2 as wq  # noqa: E402
from magnus.v1 import worker_queue_pb2_grpc  # noqa: E402
from tools.stack import BATCHER_INTERNAL, Stack  # noqa: E402

WORKER_ID = "fake-gpu"
CALIBRATION = Path(__file__).resolve().parents[1] / "reports/gpu/e2e_raw/h100_calibration.json"
CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


class FakeWorker:
    """A continuous worker that runs nothing: each leased batch completes `hold_s` after its lease, or,
    with `s_per_token` > 0, after its longest item's max_new_tokens x s_per_token (an engine whose every
    step takes the same time: a request's run time follows its length, as on the GPU)."""

    def __init__(self, channel: grpc.aio.Channel, hold_s: float, slots: int, s_per_token: float = 0.0) -> None:
        self.stub = worker_queue_pb2_grpc.WorkerQueueServiceStub(channel)
        self.hold_s, self.slots, self.s_per_token = hold_s, slots, s_per_token
        self.running: list[tuple[float, float, wq.Batch]] = []  # (done at, hold, batch)
        self.streamed_tokens: dict[str, int] = {}  # request id -> tokens reported so far
        self.stopping = False

    async def register(self) -> None:
        await self.stub.RegisterWorker(wq.RegisterWorkerRequest(
            worker_id=WORKER_ID, kv_bytes_per_token=524_288, free_kv_bytes=118_572_974_080, model_name="fake",
            device="fake", max_batch_size=self.slots, max_context_tokens=4096, incarnation_id=str(time.time())))

    async def pull_loop(self) -> None:
        while not self.stopping:
            free = self.slots - sum(len(b.items) for _, _, b in self.running)
            if free <= 0:
                await asyncio.sleep(0.005)
                continue
            reply = await self.stub.PullBatch(wq.PullBatchRequest(worker_id=WORKER_ID, wait_s=0.2,
                                                                  max_batches=min(free, 16)))
            batches = ([reply.batch] if reply.HasField("batch") else []) + list(reply.more_batches)
            if self.hold_s <= 0 and batches:  # answer at once: what is left of a call's latency is the services'
                await self._complete(batches)
                continue
            now_s = time.monotonic()
            self.running += [(now_s + hold_s, hold_s, b) for b in batches for hold_s in [self._hold_s(b)]]

    def _hold_s(self, batch: wq.Batch) -> float:
        if self.s_per_token <= 0:
            return self.hold_s
        return max(i.max_new_tokens for i in batch.items) * self.s_per_token

    async def complete_loop(self) -> None:
        while not self.stopping or self.running:
            now_s = time.monotonic()
            await self._stream(now_s)
            due = [b for t, _, b in self.running if t <= now_s]
            self.running = [entry for entry in self.running if entry[0] > now_s]
            if due:
                await self._complete(due)
            await asyncio.sleep(0.02)

    async def _complete(self, batches: list[wq.Batch]) -> None:
        await self.stub.CompleteBatches(wq.CompleteBatchesRequest(worker_id=WORKER_ID, completions=[
            wq.CompleteBatchRequest(worker_id=WORKER_ID, batch_id=b.batch_id, run_s=max(self._hold_s(b), 1e-3), results=[
                wq.ItemResult(request_id=i.request_id, text="ok", generated_tokens=i.max_new_tokens)
                for i in b.items]) for b in batches]))

    async def _stream(self, now_s: float) -> None:
        """Each streamed request's tokens as if generated evenly over the batch's hold, one call a turn."""
        leases = []
        for done_s, hold_s, batch in self.running:
            share = min(1.0, 1.0 - (done_s - now_s) / max(hold_s, 1e-3))
            deltas = []
            for item in batch.items:
                if not item.is_streamed:
                    continue
                sent, total = self.streamed_tokens.get(item.request_id, 0), int(share * item.max_new_tokens)
                if total > sent:
                    deltas.append(wq.RequestTokens(request_id=item.request_id, token_offset=sent, num_tokens=total - sent,
                                                   text_delta="x" * (total - sent)))
                    self.streamed_tokens[item.request_id] = total
            if deltas:
                leases.append(wq.LeaseTokens(batch_id=batch.batch_id, requests=deltas))
        if leases:
            await self.stub.StreamTokens(wq.StreamTokensRequest(worker_id=WORKER_ID, leases=leases))


async def one_run(stack: Stack, rows: list[dict], args: argparse.Namespace, tag: str) -> dict:
    async with grpc.aio.insecure_channel(stack.target(BATCHER_INTERNAL)) as channel:
        worker = FakeWorker(channel, args.hold_s, args.slots, args.ms_per_token / 1000)
        await worker.register()
        loops = [asyncio.create_task(worker.pull_loop()), asyncio.create_task(worker.complete_loop())]
        pid = stack.processes["batcher"].pid
        cpu_before_s, started_s = cpu_s(pid), time.monotonic()
        offsets_s = [index / args.rate if args.rate else 0.0 for index in range(len(rows))]
        records = await send_all(stack.target("batcher"), rows, offsets_s, tag, args.stream)
        wall_s, cpu_used_s = time.monotonic() - started_s, cpu_s(pid) - cpu_before_s
        worker.stopping = True
        await asyncio.gather(*loops)
    ok = [r for r in records if r["status"] == "OK"]
    queued = sorted(r["queued_at_s"] for r in ok)
    failed = [r for r in records if r["status"] != "OK"]
    if failed:
        print(f"{len(failed)} failed, e.g. {failed[0]}", flush=True)
    return dict(requests=len(rows), ok=len(ok), statuses=sorted({r["status"] for r in records}),
                queued_per_s=round((len(queued) - 1) / (queued[-1] - queued[0]), 1),
                sent_per_s=round(len(rows) / max(r["sent_s"] for r in records), 1),
                done_per_s=round(len(ok) / wall_s, 1),
                batcher_cpu_s_per_1000=round(1000 * cpu_used_s / len(rows), 3),
                mean_token_events=round(sum(r.get("token_events", 0) for r in ok) / max(1, len(ok)), 2),
                latency_ms_p50=round(1000 * statistics.median(r["latency_s"] for r in ok), 2),
                latency_ms_mean=round(1000 * statistics.fmean(r["latency_s"] for r in ok), 2),
                latency_ms_p99=round(1000 * nearest_rank((r["latency_s"] for r in ok), 0.99), 2))


def start_stack(workdir: Path, state: Path, batcher_dir: Path, policy: str = "magnus_ccb") -> Stack:
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    shutil.copy(state / "log.db", workdir / "log.db")
    shutil.copytree(state / "model-store", workdir / "model-store")
    with sqlite3.connect(workdir / "log.db") as connection:  # store-relative: the folder moved
        connection.execute("UPDATE model_versions SET artifact_uri = kind || '/v' || version || '.joblib'")
    stack = Stack(workdir=workdir, database_url=f"sqlite+aiosqlite:///{workdir / 'log.db'}",
                  model_store_dir=workdir / "model-store", extra_env={
                      "MAGNUS_BATCHER_POLICY": policy, "MAGNUS_BATCHER_LEASE_S": "600",
                      "MAGNUS_BATCHER_MAX_PENDING_REQUESTS": "100000", "MAGNUS_BATCHER_MAX_PENDING_PER_TENANT": "100000"})
    import_calibration(workdir / "log.db", CALIBRATION)  # the estimator's first version fits on these
    subprocess.run([sys.executable, "-m", "services.estimator.bootstrap", "--if-missing"], env=stack.env(), check=True,
                   cwd=Path(__file__).resolve().parents[1], stdout=subprocess.DEVNULL)
    stack.start("predictor")
    stack.start("estimator")
    stack.wait_healthy(("predictor", "estimator"), timeout_s=300)
    # the batcher of `batcher_dir` (its own services/ and generated magnus/ come first from its cwd)
    with open(stack.log_path("batcher"), "ab") as log_file:
        stack.processes["batcher"] = subprocess.Popen([sys.executable, "-m", "services.batcher"], cwd=batcher_dir,
                                                      env=stack.env(), stdout=log_file, stderr=subprocess.STDOUT,
                                                      start_new_session=True)
    stack.wait_healthy(("batcher",), timeout_s=120)
    return stack


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--state", type=Path, default=Path("var/e2e/state"))
    parser.add_argument("--workload", type=Path, default=Path("var/e2e/workload.jsonl"))
    parser.add_argument("--requests", type=int, default=1500)
    parser.add_argument("--rate", type=float, default=0.0, help="requests/s; 0 = as fast as the client sends")
    parser.add_argument("--hold-s", type=float, default=0.5,
                        help="the fake worker's run time of each batch; 0 = answer as pulled (latency of the services)")
    parser.add_argument("--slots", type=int, default=256, help="requests the fake worker runs at once")
    parser.add_argument("--ms-per-token", type=float, default=0.0,
                        help="> 0: each request runs its max_new_tokens x this (the engine's step), not --hold-s")
    parser.add_argument("--policies", default="magnus_ccb", help="batcher policies to run in turn (comma list)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--stream", action="store_true",
                        help="GenerateStream callers; the fake worker streams each request's tokens every 20 ms")
    parser.add_argument("--base", type=Path, default=None, help="another tree whose batcher runs too (A/B)")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/magnus-ingest"))
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    rows = [json.loads(line) for line in args.workload.read_text().splitlines() if line.strip()]
    here = Path(__file__).resolve().parents[1]
    trees = {"this": here, **({"base": args.base.resolve()} if args.base else {})}
    policies = args.policies.split(",")
    runs = {(f"{tree} {policy}" if len(policies) > 1 else tree): (tree, policy) for tree in trees for policy in policies}
    results: dict[str, list[dict]] = {name: [] for name in runs}
    for repeat in range(args.repeats):
        for name, (tree, policy) in runs.items():
            stack = start_stack(args.workdir, args.state.resolve(), trees[tree], policy)
            try:
                rows_now = [rows[(repeat * args.requests + i) % len(rows)] for i in range(args.requests)]
                result = asyncio.run(one_run(stack, rows_now, args, f"{name}-{repeat}"))
            finally:
                stack.stop_all()
            results[name].append(result)
            print(f"{name:>5} repeat {repeat}: {json.dumps(result)}", flush=True)
    report = dict(command=" ".join(["python", *sys.argv]), cpu_count=os.cpu_count(),
                  load_avg_1min_at_end=round(os.getloadavg()[0], 2), trees={k: str(v) for k, v in trees.items()},
                  results=results)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
