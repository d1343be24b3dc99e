"""bench/gpu_e2e.py on the paged engine (--backend paged, issue 23): what each policy name sets in the
batcher and in the worker, and the worker's paged counters read around each phase.

The continuous policies differ in one setting each, so a run separates their effects:

| bench policy | batcher policy | worker admission | worker wait order | preempted first |
|---|---|---|---|---|
| `ccb` | ccb (FCFS leases) | predicted (x margin) | fcfs | most predicted work left |
| `magnus_ccb` | magnus_ccb (HRRN leases) | predicted (x margin) | hrrn | most predicted work left |
| `magnus_ccb_tail` | magnus_ccb_tail (HRRN after those outlasting the queue) | predicted (x margin) | hrrn_tail | most predicted work left |
| `greedy` | ccb (FCFS leases) | greedy (vLLM's) | fcfs | youngest (vLLM's) |

`greedy` is vLLM's scheduler: admit while the free blocks hold a request's known tokens, preempt
the last admitted when they run out, no use of predicted lengths. `ccb` takes the predicted-length
admission alone, `magnus_ccb` adds the HRRN order (in the batcher's queue and among the requests
the worker holds). Every request still carries its prediction to the worker (the batcher predicts
for all policies); only the worker's settings decide whether it is read.
"""

from __future__ import annotations

import threading
import urllib.error
import urllib.request
from dataclasses import dataclass

from services.worker.config import WorkerSettings
from services.worker.paged.scheduler import Admission, PreemptRule, WaitOrder


@dataclass(frozen=True)
class PagedPolicy:
    batcher_policy: str  # MAGNUS_BATCHER_POLICY
    admission: Admission
    order: WaitOrder
    preempt_rule: PreemptRule


PAGED_POLICIES = {
    "ccb": PagedPolicy("ccb", Admission.PREDICTED, WaitOrder.FCFS, PreemptRule.MOST_WORK_LEFT),
    "magnus_ccb": PagedPolicy("magnus_ccb", Admission.PREDICTED, WaitOrder.HRRN, PreemptRule.MOST_WORK_LEFT),
    "magnus_ccb_tail": PagedPolicy("magnus_ccb_tail", Admission.PREDICTED, WaitOrder.HRRN_TAIL,
                                   PreemptRule.MOST_WORK_LEFT),
    "greedy": PagedPolicy("ccb", Admission.GREEDY, WaitOrder.FCFS, PreemptRule.YOUNGEST),
}
BENCH_ONLY_POLICIES = ("greedy",)  # names the batcher does not know


def worker_default(field: str):
    return WorkerSettings.model_fields[field].default


@dataclass(frozen=True)
class PagedKnobs:
    """The paged worker's sizes, the same for every policy of a run (defaults: the worker's)."""

    max_running: int = worker_default("paged_max_running")
    token_budget: int = worker_default("paged_token_budget")
    block_tokens: int = worker_default("paged_block_tokens")
    admission_margin: float = worker_default("admission_margin")
    cpu_kv_budget_bytes: int = 0  # CPU only: the block pool's bytes (0 = the worker's default)


def paged_worker_env(policy: PagedPolicy, knobs: PagedKnobs) -> dict[str, str]:
    """The worker's environment for `policy` in continuous mode on the paged backend."""
    env = {
        "MAGNUS_WORKER_MODE": "continuous",
        "MAGNUS_WORKER_BACKEND": "paged",
        "MAGNUS_WORKER_ADMISSION": policy.admission.value,
        "MAGNUS_WORKER_ADMISSION_MARGIN": str(knobs.admission_margin),
        "MAGNUS_WORKER_PAGED_ORDER": policy.order.value,
        "MAGNUS_WORKER_PAGED_PREEMPT_RULE": policy.preempt_rule.value,
        "MAGNUS_WORKER_PAGED_MAX_RUNNING": str(knobs.max_running),
        "MAGNUS_WORKER_PAGED_TOKEN_BUDGET": str(knobs.token_budget),
        "MAGNUS_WORKER_PAGED_BLOCK_TOKENS": str(knobs.block_tokens),
    }
    if knobs.cpu_kv_budget_bytes:
        env["MAGNUS_WORKER_KV_BUDGET_BYTES"] = str(knobs.cpu_kv_budget_bytes)
    return env


# worker counters read before and after a phase (their difference is the phase's), by short name
COUNTERS = {
    "preemptions": "magnus_worker_paged_preemptions_total",
    "recomputed_tokens": "magnus_worker_paged_recomputed_tokens_total",
    "steps": "magnus_worker_continuous_steps_total",
    "step_s": "magnus_worker_continuous_step_seconds_total",
    "running_row_steps": "magnus_worker_continuous_active_row_steps_total",
    "decode_only_steps": "magnus_worker_paged_decode_only_steps_total",
    "decode_only_step_s": "magnus_worker_paged_decode_only_step_seconds_total",
    "batched_tokens": "magnus_worker_paged_batched_tokens_total",
}
RUNNING = "magnus_worker_paged_running_requests"
MAX_RUNNING_SINCE_START = "magnus_worker_paged_max_running_requests"


def scrape(url: str) -> dict[str, float]:
    """A service's /metrics as {sample name with labels: value}; empty if it does not answer."""
    try:
        body = urllib.request.urlopen(url, timeout=5).read().decode()
    except (urllib.error.URLError, OSError):
        return {}
    samples = {}
    for line in body.splitlines():
        if line and not line.startswith("#"):
            key, value = line.rsplit(" ", 1)
            samples[key] = float(value)
    return samples


WORKER_RPCS = ("PullBatch", "CompleteBatch", "CompleteBatches", "Heartbeat", "StreamTokens")


def worker_rpc_calls(samples: dict[str, float]) -> dict[str, float]:
    """The batcher's handled worker-protocol calls by method (all status codes), from its /metrics."""
    calls = dict.fromkeys(WORKER_RPCS, 0.0)
    for key, value in samples.items():
        if key.startswith("magnus_rpc_requests_total{") and 'grpc_service="magnus.v1.WorkerQueueService"' in key:
            method = key.split('grpc_method="', 1)[1].split('"', 1)[0]
            if method in calls:
                calls[method] += value
    return calls


class PhaseCounters:
    """The workers' paged counters over one phase: read at start and at finish, and the running
    requests sampled in between (the engine's own maximum is only kept since the worker started)."""

    def __init__(self, urls: dict[str, str], sample_every_s: float = 0.5) -> None:
        self.urls, self.sample_every_s = urls, sample_every_s
        self.before = {name: scrape(url) for name, url in urls.items()}
        self.max_running = dict.fromkeys(urls, 0.0)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, name="paged-counters", daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._stop.wait(self.sample_every_s):
            for name, url in self.urls.items():
                running = scrape(url).get(RUNNING, 0.0)
                self.max_running[name] = max(self.max_running[name], running)

    def finish(self) -> dict[str, dict[str, float]]:
        """Per worker: each counter's increase over the phase, the mean and sampled maximum of the
        running requests, and the engine's maximum since the worker started."""
        self._stop.set()
        self._thread.join()
        out = {}
        for name, url in self.urls.items():
            after, before = scrape(url), self.before[name]
            moved = {short: after.get(full, 0.0) - before.get(full, 0.0) for short, full in COUNTERS.items()}
            moved["mean_running_requests"] = moved["running_row_steps"] / moved["steps"] if moved["steps"] else 0.0
            moved["max_running_requests_sampled"] = self.max_running[name]
            moved["max_running_requests_since_start"] = after.get(MAX_RUNNING_SINCE_START, 0.0)
            out[name] = moved
        return out
