"""Continuous batching offline: FCFS (`ccb`) against length-aware order (`magnus_ccb`), engine-model time.

Why: the paper names continuous batching with length prediction as future work, and on the GPU `ccb`
(FCFS continuous batching) was the fastest policy measured (reports/gpu/e2e.md). Here a continuous
worker with `--slots` rows is simulated step by step: every step decodes one token for each active
row; a row frees when its request reaches its true length and takes the next request the batcher's
policy chooses (the real `BatchQueue.choose_next` over single-request batches; their estimates are
the engine model's one-row time at the planned length, which is what the KNN estimator learns to
give). Step time = `LinearBatchCost`'s decode step (base + per active row + per KV token read) plus the
prefill of the requests that joined before it. No GPU overheads: an estimate, not a GPU result.

    python bench/continuous_offline.py --predictor var/e2e/state/model-store/predictor/v1.joblib \\
        --workload var/e2e/workload.jsonl --out reports/simulation/continuous
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.offline_replay import load_replay, write_report  # noqa: E402
from services.batcher.policy.batch import Member, QueuedBatch  # noqa: E402
from services.batcher.policy.batch_queue import BatchQueue  # noqa: E402
from services.batcher.policy.config import make_policy  # noqa: E402
from services.batcher.policy.pack_cost import LinearBatchCost  # noqa: E402
from services.batcher.policy.rules import MemoryBudget  # noqa: E402

SLOTS = 59  # the GPU runs' ccb slots (= vs's batch: max-context requests that fit Theta on the H200)
ARRIVAL_SEED = 20241122


def simulate(policy_name: str, arrivals_s: np.ndarray, input_tokens: np.ndarray, true_gen: np.ndarray,
             plan_gen: np.ndarray, slots: int, cost: LinearBatchCost) -> np.ndarray:
    """Finish time of every request, seconds (same order as the arrays)."""
    policy = make_policy(policy_name, phi_token_reads=1.0, fixed_batch_size=1, max_batch_size=None)
    order = np.argsort(arrivals_s, kind="stable")
    queue, finished_s = BatchQueue(), np.full(len(arrivals_s), np.nan)
    active: list[list[int]] = []  # [request, generated tokens]
    now_s, next_arrival = 0.0, 0
    while next_arrival < len(order) or len(queue) or active:
        while next_arrival < len(order) and arrivals_s[order[next_arrival]] <= now_s:
            i = int(order[next_arrival])
            batch = QueuedBatch(str(i))
            queue.append(batch)
            queue.add_member(batch, Member(str(i), int(input_tokens[i]), int(plan_gen[i]), float(arrivals_s[i])))
            queue.set_estimate(batch.batch_id, batch.revision, float(cost.batch_s(1, int(input_tokens[i]),
                                                                               int(plan_gen[i]))), 0)
            next_arrival += 1
        prefill_s = 0.0
        while len(active) < slots and len(queue):
            chosen = queue.choose_next(policy, now_s, MemoryBudget(lanes=slots))  # the rows: magnus_ccb_tail's lanes
            queue.pop(chosen.batch_id)
            i = int(chosen.batch_id)
            active.append([i, 0])
            prefill_s += cost.prefill_s_per_token * input_tokens[i]
        if not active:  # idle until the next arrival
            now_s = float(arrivals_s[order[next_arrival]])
            continue
        kv_tokens = sum(int(input_tokens[i]) + generated for i, generated in active)
        now_s += prefill_s + cost.step_base_s + cost.step_s_per_row * len(active) + cost.step_s_per_kv_token * kv_tokens
        still = []
        for row in active:
            row[1] += 1
            if row[1] >= true_gen[row[0]]:
                finished_s[row[0]] = now_s
            else:
                still.append(row)
        active = still
    return finished_s


def summarize(arrivals_s: np.ndarray, finished_s: np.ndarray) -> dict:
    latency_s = finished_s - arrivals_s
    return {"requests_per_s": len(arrivals_s) / float(finished_s.max() - arrivals_s.min()),
            "mean_latency_s": float(latency_s.mean()), "p99_latency_s": float(np.percentile(latency_s, 99))}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--predictor", type=Path, required=True, help="a stored predictor version (.joblib)")
    parser.add_argument("--workload", type=Path, default=Path("var/e2e/workload.jsonl"))
    parser.add_argument("--burst-requests", type=int, default=1500)
    parser.add_argument("--loads", default="1,1.5,2",
                        help="Poisson arrival rates as fractions of ccb's burst throughput (the simulated capacity)")
    parser.add_argument("--requests-per-rate", type=int, default=1500)
    parser.add_argument("--slots", type=int, default=SLOTS)
    parser.add_argument("--out", type=Path, default=Path("reports/simulation/continuous"))
    args = parser.parse_args()
    loads = [float(x) for x in args.loads.split(",") if x]
    needed = max([args.burst_requests] + [args.requests_per_rate] * len(loads))
    replay = load_replay(args.predictor, args.workload, needed)
    input_tokens, true_gen = replay.input_tokens, replay.true_gen
    plans = {"ccb": ("ccb", true_gen), "magnus_ccb": ("magnus_ccb", replay.predicted()),
             "magnus_ccb, true lengths": ("magnus_ccb", true_gen),
             "magnus_ccb_tail": ("magnus_ccb_tail", replay.predicted())}
    cost, results = LinearBatchCost(), {"slots": args.slots, "phases": {}}

    def run_phase(phase: str, arrivals_s: np.ndarray) -> None:
        n = len(arrivals_s)
        results["phases"][phase] = {
            name: summarize(arrivals_s, simulate(policy, arrivals_s, input_tokens[:n], true_gen[:n], plan[:n],
                                                 args.slots, cost))
            for name, (policy, plan) in plans.items()
        }

    run_phase("burst", np.zeros(args.burst_requests))
    capacity = results["phases"]["burst"]["ccb"]["requests_per_s"]
    rng = np.random.default_rng(ARRIVAL_SEED)
    for load in loads:
        rate = load * capacity
        run_phase(f"{load:g} x capacity = {rate:.0f} req/s",
                  np.cumsum(rng.exponential(1.0 / rate, args.requests_per_rate)))
    lines = [
        f"# Continuous batching offline: {args.slots} rows, engine-model time (no GPU overheads)",
        "",
        f"Command: `python {' '.join(sys.argv)}`. Burst: {args.burst_requests} requests queued at once; "
        f"Poisson phases: {args.requests_per_rate} requests each, at fractions of ccb's burst throughput. `ccb` takes requests in arrival order, "
        "`magnus_ccb` by highest response ratio at the predicted length (point prediction), the next row "
        "by the true length (an upper bound for the ordering); `magnus_ccb_tail` first takes any request "
        "whose estimate outlasts the queue's drain over the rows, longest first (the tail guard).",
        "",
        "Inputs: `python bench/e2e_workload.py --num-requests 3000 --out var/e2e/workload.jsonl` (held-out "
        "8-task mix, Qwen-token lengths) and the predictor `python -m services.predictor.bootstrap --data "
        "../shared/data --model magnus_static --max-per-task 2500 --database-url "
        "sqlite+aiosqlite:///$PWD/var/e2e/state/log.db --model-store-dir var/e2e/state/model-store`. "
        "The engine model (`LinearBatchCost`, the H200 static-engine fit) has none of the continuous "
        "worker's per-step host work: on the H200 `ccb` served 35 req/s end to end (reports/gpu/e2e.md) "
        "where this model gives ~157, so the absolute numbers are an upper bound; the point is the "
        "comparison between orders on identical arrivals.",
        "",
        "| phase | policy | req/s | mean latency s | p99 latency s |",
        "|---|---|---:|---:|---:|",
    ]
    for phase, by_policy in results["phases"].items():
        for name, r in by_policy.items():
            lines.append(f"| {phase} | {name} | {r['requests_per_s']:.1f} | {r['mean_latency_s']:.2f} | "
                         f"{r['p99_latency_s']:.2f} |")
    write_report(args.out, "continuous_offline", results, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
