"""magnus_pack offline: a saturation burst drained by the real packing code, timed by the engine model.

Why: the GPU runs (reports/gpu/e2e.md) showed under-predicted requests stretching packed batches.
This replays the same kind of burst on the CPU: the served predictor's point predictions, its upper
estimates at several quantiles, and the true lengths, each planned by `BatchQueue.take_next` (the
batcher's code) and timed with `LinearBatchCost` at the batch's *true* G(B). No GPU overheads
(graph captures, host work): an upper bound for what planning with each length buys, not a GPU result.

    python bench/pack_offline.py --predictor var/e2e/state/model-store/predictor/v1.joblib \\
        --workload var/e2e/workload.jsonl --out reports/gpu
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.offline_replay import load_replay, write_report  # noqa: E402
from services.batcher.policy.assembler import MemoryBudget  # noqa: E402
from services.batcher.policy.batch import Member, QueuedBatch  # noqa: E402
from services.batcher.policy.batch_queue import BatchQueue  # noqa: E402
from services.batcher.policy.config import make_policy  # noqa: E402
from services.batcher.policy.pack_cost import LinearBatchCost  # noqa: E402

# the H200 run's memory model (reports/gpu/e2e.md): Llama-2-7B shape, 6 GiB reserve
BUDGET = MemoryBudget(kv_bytes_per_token=524_288, free_kv_bytes=127_572_901_888)
VS_BATCH = 59
QUANTILES = (0.75, 0.9, 0.95)
PREEMPT_SHARES = (0.01, 0.05, 0.1)


def drain_s(plan: np.ndarray, input_tokens: np.ndarray, true_gen: np.ndarray, cost: LinearBatchCost,
            preempt_share: float | None = None) -> tuple[float, int, int]:
    """Seconds to run every request (all queued at t=0) packed by `plan` lengths; batches run; requeues.

    preempt_share: straggler preemption, as the batcher's MAGNUS_BATCHER_PREEMPT_SHARE does it (the
    worker there checks every 16 decode steps; here the cut is exact). Once a batch has run its planned
    G(B) steps and at most this share of its rows is still running, those rows are cut and requeued as
    continuations: prompt + what they generated, planned to generate as much again. None = every
    batch runs to its longest row.
    """
    policy = make_policy("magnus_pack", phi_token_reads=1e4, fixed_batch_size=VS_BATCH, max_batch_size=256,
                         memory_fill_fraction=0.85)
    queue, generated = BatchQueue(), np.zeros(len(plan), dtype=int)

    def enqueue(key: str, planned_tokens: int) -> None:
        row = int(key.split(".")[0])
        batch = QueuedBatch(f"b{key}")
        queue.append(batch)
        queue.add_member(batch, Member(key, int(input_tokens[row] + generated[row]), max(1, int(planned_tokens)), 0.0))

    for i, n_gen in enumerate(plan):
        enqueue(str(i), n_gen)
    ids, now_s, batches, requeues = (f"m{i}" for i in itertools.count()), 0.0, 0, 0
    while len(queue):
        batch = queue.take_next(policy, now_s, BUDGET, lambda: next(ids))
        keys = [m.request_id for m in batch.members]
        rows = np.array([int(k.split(".")[0]) for k in keys])
        remaining = true_gen[rows] - generated[rows]
        steps = int(remaining.max())
        if preempt_share is not None:
            may_run_on = max(1, int(preempt_share * len(rows)))  # rows allowed to outlive the cut
            last_kept = int(np.sort(remaining)[-may_run_on - 1]) if len(rows) > may_run_on else 0
            steps = min(steps, max(batch.gen_tokens_max, last_kept))
        now_s += cost.batch_s(len(rows), batch.input_tokens_max, steps)
        batches += 1
        for key, row, left in zip(keys, rows, remaining, strict=True):
            if left > steps:  # cut: requeued with its output so far as part of its prompt
                generated[row] += steps
                requeues += 1
                enqueue(f"{row}.{requeues}", generated[row])
    return now_s, batches, requeues


def vs_drain_s(input_tokens: np.ndarray, true_gen: np.ndarray, cost: LinearBatchCost) -> float:
    total_s = 0.0
    for start in range(0, len(input_tokens), VS_BATCH):
        rows = slice(start, start + VS_BATCH)
        total_s += cost.batch_s(len(input_tokens[rows]), int(input_tokens[rows].max()), int(true_gen[rows].max()))
    return total_s


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--predictor", type=Path, required=True, help="a stored predictor version (.joblib)")
    parser.add_argument("--workload", type=Path, default=Path("var/e2e/workload.jsonl"))
    parser.add_argument("--requests", type=int, default=1500)
    parser.add_argument("--out", type=Path, default=Path("reports/gpu"))
    args = parser.parse_args()
    replay = load_replay(args.predictor, args.workload, args.requests)
    input_tokens, true_gen, requests = replay.input_tokens, replay.true_gen, len(replay.true_gen)
    cost = LinearBatchCost()
    point = replay.predicted()
    plans = {"point prediction": point}
    for q in QUANTILES:
        plans[f"upper q{q:g}"] = replay.predicted(quantile=q)
    plans["true lengths"] = true_gen
    vs_s = vs_drain_s(input_tokens, true_gen, cost)
    results = {"requests": requests, "vs_batch": VS_BATCH, "vs_requests_per_s": requests / vs_s, "plans": {}}
    badly = true_gen > 2 * point + 10
    for name, plan in plans.items():
        seconds, batches, _ = drain_s(plan, input_tokens, true_gen, cost)
        results["plans"][name] = {
            "requests_per_s": requests / seconds, "x_vs": vs_s / seconds, "batches": batches,
            "coverage": float((true_gen <= plan).mean()),
            "flags_badly_under_predicted": float((plan[badly] >= 1.5 * point[badly]).mean()) if badly.any() else None,
        }
    results["preemption"] = {}
    for name in ("point prediction", "upper q0.9"):
        for share in PREEMPT_SHARES:
            seconds, batches, requeues = drain_s(plans[name], input_tokens, true_gen, cost, preempt_share=share)
            results["preemption"][f"{name}, cut at {share:g}"] = {
                "requests_per_s": requests / seconds, "x_vs": vs_s / seconds, "batches": batches,
                "requeues": requeues,
            }
    lines = [
        f"# magnus_pack offline: {requests} requests queued at once, engine-model time (no GPU overheads)",
        "",
        f"Command: `python {' '.join(sys.argv)}`. vs (batch {VS_BATCH}): {results['vs_requests_per_s']:.1f} req/s. "
        f"Badly under-predicted (true > 2 x point + 10): {int(badly.sum())} requests.",
        "",
        "| planned with | req/s | x vs | batches | true <= planned | flags the badly under-predicted |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, r in results["plans"].items():
        flags = "-" if r["flags_badly_under_predicted"] is None else f"{r['flags_badly_under_predicted']:.2f}"
        lines.append(f"| {name} | {r['requests_per_s']:.1f} | {r['x_vs']:.2f} | {r['batches']} | {r['coverage']:.2f} | {flags} |")
    lines += [
        "",
        "Straggler preemption (`MAGNUS_BATCHER_PREEMPT_SHARE`; here the cut is exact, the worker checks every",
        "16 decode steps). Once a batch has run its planned G(B) steps and at most this share of its rows",
        "still runs, those rows are cut and requeued with their output so far as part of the prompt (paying",
        "its prefill again), planned to generate as much again:",
        "",
        "| planned with, rows allowed past the plan | req/s | x vs | batches | requeued |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, r in results["preemption"].items():
        lines.append(f"| {name} | {r['requests_per_s']:.1f} | {r['x_vs']:.2f} | {r['batches']} | {r['requeues']} |")
    write_report(args.out, "pack_offline", results, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
