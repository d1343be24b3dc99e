"""Poisson arrival times for the benches that replay a workload at a rate (gpu_e2e, gpu_serving, gpu_kill_one)."""

from __future__ import annotations

import random


def poisson_offsets_s(count: int, rate_per_s: float, seed: int) -> list[float]:
    """Seconds after the start at which each of `count` requests arrives: exponential gaps at
    `rate_per_s`, the first at 0; the same seed gives the same arrivals in every bench."""
    rng, at_s, offsets = random.Random(seed), 0.0, []
    for _ in range(count):
        offsets.append(at_s)
        at_s += rng.expovariate(rate_per_s)
    return offsets
