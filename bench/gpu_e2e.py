"""End to end on one GPU: the five services, a 7B-shape model, each policy on identical arrivals.

Starts the stack (tools/stack.py: five processes, SQLite log) with the worker serving a Llama-2-7B
shape with seeded random weights in trace replay (every request stops exactly at its reference
output length), then for each policy restarts the batcher and replays the workload
(bench/e2e_workload.py) as Poisson arrivals at each rate: the same requests and the same arrival
times for every policy. The worker calibrates the estimator's first version on this device before
it registers; the trainer runs with its rounds pushed out of the run so every policy sees the same
model versions. `ccb` and `magnus_ccb` restart the worker in continuous-batching mode, with rows
of --continuous-row-tokens (a request longer than a row runs alone once the rows drained).

Per request it records queued/started/finished, predicted and true length, batch; per batch the
log DB's shape, estimated and actual time. Everything lands in OUT/e2e_raw.json as it is measured
(a run cut off by its time limit keeps what it finished); `bench/gpu_e2e_report.py` makes the
table, plots and reports/gpu/e2e.json from one or more raw files.

    python bench/gpu_e2e.py --workload var/e2e/workload.jsonl --state var/e2e/state --out OUT \\
        --policies vs,magnus --rates 8,16 --requests-per-rate 150 --saturation-requests 600
    python bench/gpu_e2e.py --tiny ...   # the same on the CPU with the tiny model: a smoke test

--backend paged runs the continuous policies on the paged engine (services/worker/paged/, issue 23)
with a worker restarted for each, since each sets the worker's admission and order: `ccb`,
`magnus_ccb` and the bench-only `greedy` (vLLM's admission and preemption), see bench/e2e_paged.py;
each phase then records the worker's preemptions, recomputed tokens and running requests
(`worker_counters`, scraped from its /metrics before and after).

--workers 1,2 runs every phase of every policy with one worker, then with two pulling from the same
batcher (worker i on GPU i: CUDA_VISIBLE_DEVICES), results under raw["workers"]["1"|"2"]; with the
default --workers 1 the raw file has the one-worker shape as before (raw["policies"]). --kill-one N
then sends N requests at the saturation rate to the most workers and SIGKILLs one mid-burst
(bench/gpu_kill_one.py); bench/gpu_scaling_report.py makes reports/gpu/scaling.{md,json}.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import shutil
import sqlite3
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.arrivals import poisson_offsets_s  # noqa: E402
from bench.e2e_paged import (  # noqa: E402
    BENCH_ONLY_POLICIES, PAGED_POLICIES, PagedKnobs, PhaseCounters, paged_worker_env, scrape, worker_rpc_calls,
)
from bench.percentile import nearest_rank  # noqa: E402
from magnus.v1 import generation_pb2, generation_pb2_grpc  # noqa: E402
from services.batcher.policy.config import CONTINUOUS_POLICY_NAMES, SERVING_POLICY_NAMES  # noqa: E402
from tools.stack import Stack  # noqa: E402

CONTEXT_TOKENS = 4096  # Llama-2-7B's context: a careful operator sizes vs for requests this long
WARMUP_REQUESTS = 16
ARRIVAL_SEED = 20241122


def say(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def load_workload(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


async def send_all(target: str, rows: list[dict], offsets_s: list[float], tag: str, stream: bool = False) -> list[dict]:
    """Send each row at its offset; one record per request, answered or not. stream: as GenerateStream
    callers reading every token event (time to first token and per-token gaps recorded)."""
    async with grpc.aio.insecure_channel(target) as channel:
        stub = generation_pb2_grpc.GenerationServiceStub(channel)
        started_s = time.monotonic()

        async def one(index: int, row: dict, offset_s: float) -> dict:
            await asyncio.sleep(max(0.0, started_s + offset_s - time.monotonic()))
            prompt = generation_pb2.Prompt(
                instruction=row["instruction"], user_input=row["user_input"], max_new_tokens=row["gen_tokens"],
                tenant_id="e2e", client_request_id=f"{tag}-{index}",
            )
            sent_s = time.monotonic()
            record = dict(task=row["task"], input_tokens=row["input_tokens"], true_gen_tokens=row["gen_tokens"],
                          sent_s=sent_s - started_s)
            try:
                if stream:
                    response = await streamed(stub, prompt, record, sent_s)
                else:
                    response = await stub.Generate(generation_pb2.GenerateRequest(prompt=prompt), timeout=900)
            except grpc.aio.AioRpcError as error:
                record.update(status=error.code().name, error=error.details(), latency_s=time.monotonic() - sent_s)
                return record
            timings = response.timings
            record.update(
                status="OK", latency_s=time.monotonic() - sent_s, done_s=time.monotonic() - started_s,
                predicted_tokens=response.predicted_tokens, generated_tokens=response.generated_tokens,
                batch_id=response.batch_id, batch_size=response.batch_size,
                is_prediction_fallback=response.is_prediction_fallback,
                queued_at_s=timings.queued_at.ToNanoseconds() / 1e9,
                started_at_s=timings.started_at.ToNanoseconds() / 1e9,
                finished_at_s=timings.finished_at.ToNanoseconds() / 1e9,
                queue_wait_s=timings.queue_wait_s, run_s=timings.run_s,
            )
            return record

        return await asyncio.gather(*(one(i, r, o) for i, (r, o) in enumerate(zip(rows, offsets_s, strict=True))))


async def streamed(stub, prompt, record: dict, sent_s: float):
    """GenerateStream: the FINISHED result; records time to the first TOKENS event and the token events."""
    result, token_events = None, 0
    async for event in stub.GenerateStream(generation_pb2.GenerateStreamRequest(prompt=prompt), timeout=900):
        if event.phase == generation_pb2.REQUEST_PHASE_TOKENS:
            token_events += 1
            if token_events == 1:
                record["ttft_s"] = time.monotonic() - sent_s
        elif event.phase == generation_pb2.REQUEST_PHASE_FINISHED:
            result = event.result
    record["token_events"] = token_events
    return result


def phases(args: argparse.Namespace, workload: list[dict]) -> list[tuple[float, list[dict]]]:
    """(rate, requests) per phase: each Poisson rate its own requests, then the saturation burst.

    The slices depend only on the arguments, so every policy gets the same requests and arrivals.
    """
    n, out = args.requests_per_rate, []
    for index, rate in enumerate(args.rate_list):
        out.append((rate, workload[index * n:(index + 1) * n]))
    if args.saturation_requests:
        start = len(args.rate_list) * n
        out.append((args.saturation_rate, workload[start:start + args.saturation_requests]))
    return out


def batch_rows(database: Path, batch_ids: set[str]) -> list[dict]:
    """The log DB's rows of these batches (every attempt, OOM splits included), by batch id."""
    if not batch_ids:
        return []
    with sqlite3.connect(database) as connection:
        connection.row_factory = sqlite3.Row
        rows = connection.execute(
            "SELECT id, size, input_tokens_max, predicted_gen_tokens_max, actual_gen_tokens_max, estimated_s, "
            "actual_s, outcome, parent_batch_id, valid_tokens, total_tokens, worker_id FROM batches"
        ).fetchall()
    wanted = [dict(r) for r in rows]
    parents = {r["parent_batch_id"] for r in wanted if r["id"] in batch_ids}
    return [r for r in wanted if r["id"] in batch_ids or r["id"] in parents]


def count_calibration_samples(database: Path) -> int:
    try:
        with sqlite3.connect(database) as connection:
            return connection.execute("SELECT count(*) FROM batch_time_samples WHERE source='calibration'").fetchone()[0]
    except sqlite3.OperationalError:  # not migrated yet
        return 0


CALIBRATION_COLUMNS = ("batch_size", "input_tokens_max", "gen_tokens_max", "duration_s", "device")


def export_calibration(database: Path, path: Path) -> int:
    """The worker's calibration samples as JSON: a later run seeds its log DB with them (--calibration)
    and its worker skips calibrating (minutes of device time)."""
    with sqlite3.connect(database) as connection:
        rows = connection.execute(f"SELECT {', '.join(CALIBRATION_COLUMNS)} FROM batch_time_samples "
                                  "WHERE source='calibration' ORDER BY id").fetchall()
    path.write_text(json.dumps([dict(zip(CALIBRATION_COLUMNS, row, strict=True)) for row in rows], indent=1))
    return len(rows)


def import_calibration(database: Path, path: Path) -> int:
    samples = json.loads(path.read_text())
    with sqlite3.connect(database) as connection:
        connection.executemany(
            f"INSERT INTO batch_time_samples ({', '.join(CALIBRATION_COLUMNS)}, source, created_at) "
            f"VALUES ({', '.join('?' * len(CALIBRATION_COLUMNS))}, 'calibration', CURRENT_TIMESTAMP)",
            [tuple(sample[c] for c in CALIBRATION_COLUMNS) for sample in samples])
    return len(samples)


def engine_line(stack: Stack) -> dict:
    """Delta and Theta as the worker logged them at load."""
    match = re.search(r"Delta=(\d+) bytes/token, Theta=(\d+) bytes", stack.log_path("worker").read_text())
    if not match:
        raise RuntimeError(f"worker never logged its memory model:\n{stack.log_tail('worker')}")
    return {"kv_bytes_per_token": int(match[1]), "theta_bytes": int(match[2])}


def wait_for(predicate, what: str, stack: Stack, timeout_s: float, watch: str = "worker") -> None:
    deadline_s = time.monotonic() + timeout_s
    while not predicate():
        process = stack.processes.get(watch)
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"{watch} exited while waiting for {what}:\n{stack.log_tail(watch, 60)}")
        if time.monotonic() > deadline_s:
            raise TimeoutError(f"no {what} after {timeout_s:.0f} s:\n{stack.log_tail(watch, 60)}")
        time.sleep(0.5)


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.workdir = args.workdir
        shutil.rmtree(self.workdir, ignore_errors=True)
        self.workdir.mkdir(parents=True)
        shutil.copy(args.state / "log.db", self.workdir / "log.db")
        shutil.copytree(args.state / "model-store", self.workdir / "model-store")
        with sqlite3.connect(self.workdir / "log.db") as connection:  # store-relative: the folder moved
            connection.execute("UPDATE model_versions SET artifact_uri = kind || '/v' || version || '.joblib'")
        self.database = self.workdir / "log.db"
        if args.calibration:
            say(f"seeded {import_calibration(self.database, args.calibration)} calibration samples from {args.calibration}")
        self.model_dir = self._model_dir()
        self.stack = Stack(
            workdir=self.workdir,
            database_url=f"sqlite+aiosqlite:///{self.database}",
            model_store_dir=self.workdir / "model-store",
            extra_env=self._env(),
            num_workers=max(args.worker_counts),
            # one GPU each; on the CPU (--tiny) they share it
            worker_devices=() if args.tiny else tuple(str(i) for i in range(max(args.worker_counts))),
        )
        self.raw: dict = {"command": " ".join(["python", *sys.argv]), "policies": {},
                          "setup": {"backend": args.backend, "paged": asdict(args.paged_knobs)}}
        self.num_workers = 1  # workers running now: stack.worker_names[:num_workers]
        self.worker_env = STATIC_WORKER_ENV  # what the running workers were started with
        self.fixed_batch_size = 0  # set by start() from the worker's Theta
        self.continuous_slots = 0  # likewise

    def _model_dir(self) -> str:
        if self.args.tiny:
            return ""  # the default tiny Qwen2
        from services.worker.model_builder import write_random_shape_folder

        return str(write_random_shape_folder(self.workdir / "llama2-7b-shape"))

    def _env(self) -> dict[str, str]:
        pending = str(10 * self.args.requests_per_rate + 1000)
        return {
            "MAGNUS_MODEL": self.model_dir,
            "MAGNUS_WORKER_DEVICE": "cpu" if self.args.tiny else "cuda",
            "MAGNUS_WORKER_TRACE_REPLAY": "true",
            "MAGNUS_WORKER_CALIBRATE_GRID": "" if self.args.skip_calibration else "small" if self.args.tiny else "gpu",
            "MAGNUS_WORKER_BACKOFF_MAX_S": "1",
            "MAGNUS_WORKER_PULL_WAIT_S": "2",
            "MAGNUS_WORKER_CUDA_RESERVE_BYTES": str(int(self.args.reserve_gib * 2**30)),
            "MAGNUS_TRAINER_PREDICTOR_PERIOD_S": "86400",  # same model versions for every policy
            "MAGNUS_TRAINER_ESTIMATOR_PERIOD_S": "86400",
            "MAGNUS_BATCHER_MAX_PENDING_REQUESTS": pending,
            "MAGNUS_BATCHER_MAX_PENDING_PER_TENANT": pending,
            "MAGNUS_BATCHER_LEASE_S": "600",  # a long static batch must not be requeued mid-run
            "MAGNUS_WORKER_GRAPH_LENGTH_BUCKET_TOKENS": str(self.args.graph_length_bucket_tokens),
            # compile and capture every batch bucket a policy can make before the first phase
            "MAGNUS_WORKER_WARMUP_BATCH_ROWS": str(self.args.max_batch_size),
            # and their graphs up to 1,024 attended tokens: else the first policy run pays for the captures
            "MAGNUS_WORKER_WARMUP_ATTEND_TOKENS": "1024",
        }

    # ---- set-up -------------------------------------------------------------------------------
    def start(self) -> None:
        stack, started_s = self.stack, time.monotonic()
        stack.start("predictor")
        stack.start("worker")
        stack.wait_healthy(("predictor",), timeout_s=300)
        say("predictor serving; worker loading and calibrating")
        # samples carried in --state make the worker skip calibration; it must still have loaded
        loaded = lambda: "Theta=" in stack.log_path("worker").read_text()  # noqa: E731
        wait_for(lambda: loaded() and count_calibration_samples(self.database) > 0, "calibration samples", stack,
                 timeout_s=900)
        memory = engine_line(stack)
        self.fixed_batch_size = self.safe_batch_size(memory)
        self.continuous_slots = self.slots_for(memory)
        self.raw["setup"].update(memory, calibration_s=time.monotonic() - started_s)
        say(f"worker calibrated after {time.monotonic() - started_s:.0f} s: {memory}")
        subprocess.run([sys.executable, "-m", "services.estimator.bootstrap", "--if-missing"],
                       env=stack.env(), check=True, cwd=Path(__file__).resolve().parents[1])
        stack.start("estimator")
        stack.start("trainer")
        stack.wait_healthy(("estimator", "trainer"), timeout_s=120)

    def safe_batch_size(self, memory: dict) -> int:
        """vs's batch and ccb's slots: as many max-context requests as Theta holds (never an OOM)."""
        if self.args.fixed_batch_size:
            return self.args.fixed_batch_size
        context = 512 if self.args.tiny else CONTEXT_TOKENS
        return max(1, memory["theta_bytes"] // (memory["kv_bytes_per_token"] * context))

    def slots_for(self, memory: dict) -> int:
        """ccb's and magnus_ccb's rows: Theta in rows of --continuous-row-tokens (0: the vs batch)."""
        if not self.args.continuous_row_tokens:
            return self.fixed_batch_size
        return max(1, memory["theta_bytes"] // (memory["kv_bytes_per_token"] * self.args.continuous_row_tokens))

    def start_batcher(self, policy: str, extra_env: dict[str, str] | None = None) -> None:
        self.stack.stop("batcher")
        env = {
            "MAGNUS_BATCHER_POLICY": policy,
            "MAGNUS_BATCHER_FIXED_BATCH_SIZE": str(self.fixed_batch_size),
            "MAGNUS_BATCHER_MAX_BATCH_SIZE": str(self.args.max_batch_size),
            "MAGNUS_BATCHER_PREEMPT_SHARE": str(self.args.preempt_share),
            **(extra_env or {}),
        }
        self.stack.start("batcher", env)
        self.stack.wait_healthy(("batcher",), timeout_s=120)

    @property
    def workers(self) -> tuple[str, ...]:
        return self.stack.worker_names[:self.num_workers]

    def is_continuous(self, policy: str) -> bool:
        return policy in CONTINUOUS_POLICY_NAMES or policy in BENCH_ONLY_POLICIES

    def is_paged(self, policy: str) -> bool:
        return self.args.backend == "paged" and self.is_continuous(policy)

    def worker_env_for(self, policy: str) -> dict[str, str]:
        """The worker settings `policy` runs with (beyond the stack's): a restart when they change."""
        if self.is_paged(policy):
            return paged_worker_env(PAGED_POLICIES[policy], self.args.paged_knobs)
        if self.is_continuous(policy):
            return {"MAGNUS_WORKER_MODE": "continuous", "MAGNUS_WORKER_CONTINUOUS_SLOTS": str(self.continuous_slots)}
        return STATIC_WORKER_ENV

    def batcher_policy(self, policy: str) -> str:
        return PAGED_POLICIES[policy].batcher_policy if self.is_paged(policy) else policy

    def restart_worker(self, env: dict[str, str]) -> None:
        for name in self.workers:
            self.stack.stop(name, timeout_s=60)
        for name in self.workers:
            self.stack.start(name, env)
        self.worker_env = env

    def set_workers(self, count: int) -> None:
        """Run `count` workers: stop those past it, start the missing ones in the current mode. With the
        calibration in the log DB by then, a started one loads and registers without calibrating."""
        for name in self.stack.worker_names[count:]:
            self.stack.stop(name, timeout_s=60)
        for name in self.stack.worker_names[:count]:
            process = self.stack.processes.get(name)
            if process is None or process.poll() is not None:
                self.stack.start(name, self.worker_env)
        self.num_workers = count  # run_policy waits for them: a worker is SERVING once a batcher took it
        say(f"{count} worker(s): {', '.join(self.workers)}")

    def tag(self, policy: str) -> str:
        """Client request id prefix: new per worker count, else the batcher answers a later count's
        requests from the log (idempotency keys) instead of running them."""
        return policy if self.args.worker_counts == [1] else f"{policy}-{self.num_workers}w"

    def policy_results(self) -> dict:
        """Where this worker count's results go: raw["policies"] for a one-worker-only run (as before)."""
        if self.args.worker_counts == [1]:
            return self.raw["policies"]
        return self.raw.setdefault("workers", {}).setdefault(str(self.num_workers), {"policies": {}})["policies"]

    # ---- one policy ---------------------------------------------------------------------------
    def run_policy(self, policy: str, workload: list[dict]) -> None:
        worker_env = self.worker_env_for(policy)
        if worker_env != self.worker_env:
            self.restart_worker(worker_env)
        self.start_batcher(self.batcher_policy(policy))
        self.stack.wait_healthy(self.workers, timeout_s=900)  # raises with its log if a restarted worker died
        warmup = workload[-WARMUP_REQUESTS:]  # not measured: waits for the worker to (re)register
        asyncio.run(send_all(self.stack.target("batcher"), warmup, [0.0] * len(warmup), f"{self.tag(policy)}-warmup"))
        if self.is_paged(policy):
            size = self.args.paged_knobs.max_running
        else:
            size = self.continuous_slots if self.is_continuous(policy) else self.fixed_batch_size
        result = self.policy_results().setdefault(policy, {
            "fixed_batch_size": size, "rates": {}, "is_continuous": self.is_continuous(policy),
            "backend": "paged" if self.is_paged(policy) else "rows" if self.is_continuous(policy) else "static",
            "batcher_policy": self.batcher_policy(policy), "worker_env": worker_env})
        for index, (rate, rows) in enumerate(phases(self.args, workload)):
            offsets = poisson_offsets_s(len(rows), rate, ARRIVAL_SEED + index)
            for stream in self.args.stream_modes:  # the same requests and arrivals, unstreamed then streamed
                counters = (PhaseCounters({name: self.stack.metrics_url(name) for name in self.workers})
                            if self.is_continuous(policy) else None)
                rpcs_before = worker_rpc_calls(scrape(self.stack.metrics_url("batcher")))
                started_s = time.monotonic()
                records = asyncio.run(send_all(self.stack.target("batcher"), rows, offsets,
                                               f"{self.tag(policy)}-{rate}{'-stream' if stream else ''}", stream=stream))
                wall_s = time.monotonic() - started_s
                batches = self.logged_batches({r["batch_id"] for r in records if r.get("batch_id")})
                rates = result["rates"] if not stream else result.setdefault("streamed_rates", {})
                rpcs = worker_rpc_calls(scrape(self.stack.metrics_url("batcher")))
                rates[str(rate)] = {"wall_s": wall_s, "requests": records, "batches": batches,
                                    "worker_rpc_calls": {m: rpcs[m] - rpcs_before[m] for m in rpcs}}
                paged_line = ""
                if counters is not None:
                    rates[str(rate)]["worker_counters"] = moved = counters.finish()
                    paged_line = (f", {sum(m['preemptions'] for m in moved.values()):.0f} preemptions "
                                  f"({sum(m['recomputed_tokens'] for m in moved.values()):.0f} tokens recomputed), "
                                  f"running mean {sum(m['mean_running_requests'] for m in moved.values()):.1f} "
                                  f"max {sum(m['max_running_requests_sampled'] for m in moved.values()):.0f}, "
                                  f"{sum(m['steps'] for m in moved.values()):.0f} steps "
                                  f"({sum(m['decode_only_steps'] for m in moved.values()):.0f} decode-only) of "
                                  f"{1000 * sum(m['step_s'] for m in moved.values()) / max(1, sum(m['steps'] for m in moved.values())):.1f} ms")
                ok = [r for r in records if r["status"] == "OK"]
                mean_s = sum(r["latency_s"] for r in ok) / max(1, len(ok))
                ttft = sorted(r["ttft_s"] for r in ok if "ttft_s" in r)
                ttft_line = (f", TTFT p50 {ttft[len(ttft) // 2]:.3f} s p99 {nearest_rank(ttft, 0.99):.3f} s"
                             if ttft else "")
                say(f"{self.num_workers}w {policy:9s} rate {rate:6.1f}/s{' streamed' if stream else ''}: {len(ok)}/{len(records)} ok, "
                    f"{len(ok) / max(r['done_s'] for r in ok) if ok else 0:.1f} req/s done, mean {mean_s:.2f} s, "
                    f"{len(batches)} batches{ttft_line}{paged_line}; worker calls: "
                    + ", ".join(f"{n:.0f} {m}" for m, n in rates[str(rate)]["worker_rpc_calls"].items() if n))
                self.save()

    def logged_batches(self, batch_ids: set[str], timeout_s: float = 15.0) -> list[dict]:
        """The batches' log rows, once the batcher's log writer (it batches rows) has flushed them all."""
        deadline_s = time.monotonic() + timeout_s
        while True:
            rows = batch_rows(self.database, batch_ids)
            if batch_ids <= {r["id"] for r in rows} or time.monotonic() > deadline_s:
                return rows
            time.sleep(0.3)

    def save(self) -> None:
        self.args.out.mkdir(parents=True, exist_ok=True)
        (self.args.out / "e2e_raw.json").write_text(json.dumps(self.raw))

    def save_state(self) -> None:
        """The log DB (calibration samples, estimator version) and model store, for a follow-up run's --state."""
        state = self.args.out / "state"
        shutil.rmtree(state, ignore_errors=True)
        state.mkdir(parents=True)
        with sqlite3.connect(self.database) as source, sqlite3.connect(state / "log.db") as target:
            source.backup(target)
        shutil.copytree(self.workdir / "model-store", state / "model-store")
        export_calibration(self.database, self.args.out / "calibration.json")

    def collect_logs(self) -> None:
        logs = self.args.out / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        for path in (self.workdir / "logs").glob("*.log"):
            shutil.copy(path, logs / path.name)


STATIC_WORKER_ENV = {"MAGNUS_WORKER_MODE": "static"}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", type=Path, default=Path("var/e2e/workload.jsonl"))
    parser.add_argument("--state", type=Path, default=Path("var/e2e/state"),
                        help="folder with log.db and model-store holding the predictor's first version")
    parser.add_argument("--calibration", type=Path, default=None,
                        help="calibration samples a run wrote (OUT/calibration.json): the worker skips calibrating "
                        "when they are for its device")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/magnus-e2e"))
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--policies", default="vs,glp,abp,magnus,magnus_sw,magnus_pack,oracle,ccb")
    parser.add_argument("--rates", default="8,16", help="Poisson arrival rates, requests/s")
    parser.add_argument("--requests-per-rate", type=int, default=150)
    parser.add_argument("--saturation-requests", type=int, default=600,
                        help="then this many requests at --saturation-rate: a queue deep enough to measure saturation")
    parser.add_argument("--saturation-rate", type=float, default=400.0)
    parser.add_argument("--fixed-batch-size", type=int, default=0, help="vs batch / ccb slots; 0 = Theta / context")
    parser.add_argument("--continuous-row-tokens", type=int, default=1024,
                        help="KV per row of the continuous worker (slots = Theta / this); 0 = vs's batch as slots")
    parser.add_argument("--max-batch-size", type=int, default=256, help="ceiling of the adaptive policies")
    parser.add_argument("--preempt-share", type=float, default=0.0,
                        help="the batcher's straggler preemption (MAGNUS_BATCHER_PREEMPT_SHARE); 0 = off")
    parser.add_argument("--reserve-gib", type=float, default=6.0, help="GPU memory kept out of Theta")
    parser.add_argument("--graph-length-bucket-tokens", type=int, default=32,
                        help="the worker's attention-length bucket: fewer graph captures when larger")
    parser.add_argument("--tiny", action="store_true", help="tiny CPU model: a smoke test of the driver")
    parser.add_argument("--stream", choices=("off", "on", "both"), default="off",
                        help="clients call Generate (off), GenerateStream reading every token event (on), or both "
                        "one after the other on the same arrivals (both: streamed results under streamed_rates)")
    parser.add_argument("--skip-calibration", action="store_true",
                        help="the worker does not calibrate (the estimator fits --calibration's samples, whatever "
                        "their device): for runs that compare something else than static policies")
    parser.add_argument("--backend", choices=("hf", "paged"), default="hf",
                        help="engine of the continuous policies: hf = the rows engine over the HF model (the "
                        "worker's static backend, as before); paged = services/worker/paged/, which adds policy greedy")
    parser.add_argument("--paged-max-running", type=int, default=PagedKnobs.max_running,
                        help="paged: requests running at once (also the requests the worker holds)")
    parser.add_argument("--paged-token-budget", type=int, default=PagedKnobs.token_budget,
                        help="paged: tokens one step computes, decode rows plus prefill chunks")
    parser.add_argument("--paged-block-tokens", type=int, default=PagedKnobs.block_tokens,
                        help="paged: tokens per KV block")
    parser.add_argument("--admission-margin", type=float, default=PagedKnobs.admission_margin,
                        help="paged, ccb and magnus_ccb: predicted output tokens are planned for at this multiple")
    parser.add_argument("--paged-cpu-kv-bytes", type=int, default=0,
                        help="paged on the CPU (--tiny): the block pool's bytes, small enough to preempt; 0 = the "
                        "worker's default (on a GPU the pool is the free memory less --reserve-gib)")
    parser.add_argument("--workers", default="1",
                        help="worker counts to run every policy with, e.g. 1,2 (one GPU per worker)")
    parser.add_argument("--kill-one", type=int, default=0,
                        help="then this many requests at --saturation-rate to the most workers, one SIGKILLed mid-burst")
    args = parser.parse_args()
    args.worker_counts = sorted({int(n) for n in args.workers.split(",") if n})
    if not args.worker_counts or args.worker_counts[0] < 1:
        sys.exit(f"--workers needs counts >= 1, got {args.workers!r}")
    if args.kill_one and args.worker_counts[-1] < 2:
        sys.exit("--kill-one needs --workers with a count of 2 or more")
    args.rate_list = [float(r) for r in args.rates.split(",") if r]
    args.stream_modes = {"off": [False], "on": [True], "both": [False, True]}[args.stream]
    args.paged_knobs = PagedKnobs(args.paged_max_running, args.paged_token_budget, args.paged_block_tokens,
                                  args.admission_margin, args.paged_cpu_kv_bytes)
    policies = [p for p in args.policies.split(",") if p]
    known = (*SERVING_POLICY_NAMES, *(BENCH_ONLY_POLICIES if args.backend == "paged" else ()))
    if unknown := [p for p in policies if p not in known]:
        sys.exit(f"unknown policies {', '.join(unknown)} for --backend {args.backend}; choose among {', '.join(known)}")
    # the continuous workers last: one restart into continuous mode (on the paged engine, one per policy)
    policies.sort(key=lambda p: p in CONTINUOUS_POLICY_NAMES or p in BENCH_ONLY_POLICIES)
    workload = load_workload(args.workload)
    needed = max(len(args.rate_list) * args.requests_per_rate + args.saturation_requests, args.kill_one) + WARMUP_REQUESTS
    if len(workload) < needed:
        sys.exit(f"{args.workload} has {len(workload)} rows; these phases and the warm-up need {needed}")
    bench = Bench(args)
    try:
        bench.start()
        bench.save_state()  # the calibration, kept even if the run is cut off later
        for count in args.worker_counts:
            bench.set_workers(count)
            for policy in policies:
                bench.run_policy(policy, workload)
        if args.kill_one:
            from bench.gpu_kill_one import kill_one

            bench.raw["kill_one"] = kill_one(bench, policies[-1], workload[:args.kill_one])
    finally:
        try:
            bench.stack.stop_all()
        except BaseException as error:  # noqa: BLE001 - a time limit too: what was measured must still be written
            say(f"stopping the stack failed: {error!r}")
        bench.collect_logs()
        bench.save()
        bench.save_state()
    return 0


if __name__ == "__main__":
    sys.exit(main())
