"""What a simulated run measured: throughputs and latencies, as the paper's Fig. 8-11 plot them."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from services.batcher.simulate.engine import RunResult
from services.batcher.simulate.workload import Workload

# Throughput is counted over the steady part of the offered load: from WARMUP_FRACTION of the
# arrival window (the system starts empty) to the last arrival (after it the queue only drains,
# and a drain tail of a few long batches would say more about the last batches than the policy).
WARMUP_FRACTION = 0.1


@dataclass(frozen=True)
class RunMetrics:
    policy: str
    rate_per_s: float
    num_requests: int
    num_completed: int
    requests_per_s: float  # completions per second in the steady window
    valid_tokens_per_s: float  # generated tokens of completed requests per second (whole run)
    total_tokens_per_s: float  # rows x decode steps of every batch run per second (whole run)
    mean_latency_s: float
    p99_latency_s: float
    mean_batch_size: float
    num_batches: int
    num_oom: int
    num_rejected: int

    def row(self) -> dict:
        return asdict(self)


def run_metrics(policy: str, rate_per_s: float, workload: Workload, result: RunResult) -> RunMetrics:
    done = ~np.isnan(result.finish_s)
    latency_s = result.finish_s[done] - workload.arrival_s[done]
    last_arrival_s = float(workload.arrival_s[-1])
    window_start_s = WARMUP_FRACTION * last_arrival_s
    in_window = done & (result.finish_s >= window_start_s) & (result.finish_s <= last_arrival_s)
    makespan_s = float(np.nanmax(result.finish_s)) if done.any() else float("nan")
    return RunMetrics(
        policy=policy,
        rate_per_s=rate_per_s,
        num_requests=len(workload),
        num_completed=int(done.sum()),
        requests_per_s=float(in_window.sum() / (last_arrival_s - window_start_s)),
        valid_tokens_per_s=result.valid_tokens / makespan_s,
        total_tokens_per_s=result.total_tokens / makespan_s,
        mean_latency_s=float(latency_s.mean()) if done.any() else float("nan"),
        p99_latency_s=float(np.percentile(latency_s, 99)) if done.any() else float("nan"),
        mean_batch_size=float(np.mean(result.batch_sizes)) if result.batch_sizes else 0.0,
        num_batches=result.num_batches,
        num_oom=result.num_oom,
        num_rejected=result.num_rejected,
    )
