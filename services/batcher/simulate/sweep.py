"""Runs of (policy, rate) pairs over the same workloads: one seed per rate, shared by all policies."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from services.batcher.policy.config import make_policy
from services.batcher.simulate.cost_model import CostModel
from services.batcher.simulate.engine import Hardware, Simulation, fit_estimator
from services.batcher.simulate.metrics import RunMetrics, run_metrics
from services.batcher.simulate.workload import (
    LengthTable,
    poisson_arrivals_s,
    read_trace_gaps_s,
    sample_workload,
    trace_arrivals_s,
)


@dataclass(frozen=True)
class SweepSpec:
    """What to run. `arrivals`: "poisson" or a trace CSV path; duration_s: arrival window per run."""

    policies: tuple[str, ...]
    rates_per_s: tuple[float, ...]
    duration_s: float
    phi_token_reads: float
    fixed_batch_size: int
    max_batch_size: int | None
    max_new_tokens: int
    arrivals: str
    seed: int
    memory_fill_fraction: float = 1.0
    is_planned_at_quantile: bool = False  # plan at the table's calibrated quantile, not the point


def safe_fixed_batch_size(table: LengthTable, hardware: Hardware, max_new_tokens: int) -> int:
    """The largest fixed batch that can never run out of KV memory without length predictions:
    every row may hold the longest prompt plus max_new_tokens."""
    worst_tokens = int(table.input_tokens.max()) + max_new_tokens
    return max(1, hardware.free_kv_bytes // (worst_tokens * hardware.kv_bytes_per_token))


def run_sweep(
    spec: SweepSpec, table: LengthTable, cost: CostModel, hardware: Hardware, *, show_progress: bool = True
) -> list[RunMetrics]:
    estimator = fit_estimator(cost)
    gaps_s = None if spec.arrivals == "poisson" else read_trace_gaps_s(Path(spec.arrivals))
    results = []
    runs = [(rate, name) for rate in spec.rates_per_s for name in spec.policies]
    for rate, name in tqdm(runs, desc="simulating", unit="run", disable=not show_progress):
        rng = np.random.default_rng([spec.seed, int(rate * 1000)])
        num_requests = max(1, int(round(rate * spec.duration_s)))
        if gaps_s is None:
            arrival_s = poisson_arrivals_s(num_requests, rate, rng)
        else:
            arrival_s = trace_arrivals_s(gaps_s, num_requests, rate, rng)
        workload = sample_workload(
            table, arrival_s, spec.max_new_tokens, rng, is_planned_at_quantile=spec.is_planned_at_quantile
        )
        policy = make_policy(
            name,
            phi_token_reads=spec.phi_token_reads,
            fixed_batch_size=spec.fixed_batch_size,
            max_batch_size=spec.max_batch_size,
            memory_fill_fraction=spec.memory_fill_fraction,
        )
        result = Simulation(workload, policy, cost, hardware, estimator).run()
        results.append(run_metrics(name, rate, workload, result))
    return results


def saturated_requests_per_s(rows: list[RunMetrics], policy: str) -> float:
    """The highest steady-window throughput a policy reached over the swept rates, requests/s."""
    return max(r.requests_per_s for r in rows if r.policy == policy)
