"""A demo workload against a running batcher, and its summary.

Requests come from the task files (the held-out split of the predictor's bootstrap, so its
predictions are honest), arrive as a Poisson process, and are capped at their reference output
length: the default model has random weights and never stops by itself, so the cap stands in for
where a real model would stop (trace replay). The summary reads the answers and the log DB.

With TLS on (MAGNUS_TLS_*), it verifies the batcher against MAGNUS_TLS_CA_FILE; with auth on it
sends the API key from `--api-key` or MAGNUS_API_KEY as `authorization: Bearer <key>`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import grpc

from magnus.v1 import generation_pb2, generation_pb2_grpc
from services.core.dataset import find_task_files, is_test_id, read_task_rows
from services.shared.auth import bearer_metadata
from services.shared.channels import channel_options
from services.shared.tls import TlsSettings, channel_credentials
from services.shared.tokenizer import get_token_counter

DEFAULT_DATA_DIR = Path(__file__).resolve().parents[2] / "shared" / "data"
API_KEY_ENV = "MAGNUS_API_KEY"
DEFAULT_TENANT = "demo"


@dataclass(frozen=True)
class DemoRequest:
    task: str
    instruction: str
    user_input: str
    max_new_tokens: int


@dataclass(frozen=True)
class DemoOutcome:
    request: DemoRequest
    latency_s: float
    response: generation_pb2.GenerateResponse | None
    error: str | None


def load_requests(source: Path, num_requests: int, max_new_tokens_cap: int, seed: int) -> list[DemoRequest]:
    """An even mix over the tasks in a data folder, or the rows of one JSONL file of that format."""
    counter = get_token_counter()
    if source.is_file():
        rows = read_task_rows(source)
    else:
        per_task = max(1, num_requests // len(find_task_files(source)))
        rows = []
        for path in find_task_files(source).values():
            held_out = [r for r in read_task_rows(path, max_rows=4000) if is_test_id(r.id, 0.2)]
            rows.extend(held_out[:per_task])
    random.Random(seed).shuffle(rows)
    rows = rows[:num_requests]
    lengths = counter.count_many([r.output_text for r in rows])
    return [
        DemoRequest(r.task, r.instruction, r.input_text, max(1, min(n, max_new_tokens_cap)))
        for r, n in zip(rows, lengths, strict=True)
    ]


@dataclass(frozen=True)
class ClientAccess:
    """How the demo reaches the batcher: TLS (None = plaintext), API key (None = auth off), tenant.

    An API key acts for its own tenant: `tenant_id` "" lets the batcher take the key's.
    """

    tls: TlsSettings | None = None
    api_key: str | None = None
    tenant_id: str = DEFAULT_TENANT

    @classmethod
    def from_env(cls, api_key: str | None = None, tenant_id: str | None = None) -> ClientAccess:
        """TLS from MAGNUS_TLS_*, the key from `api_key` or MAGNUS_API_KEY; the tenant as given, else
        the key's own (sent empty) with a key, "demo" without one."""
        tls = TlsSettings()
        api_key = api_key or os.environ.get(API_KEY_ENV) or None
        return cls(
            tls=tls if channel_credentials(tls) is not None else None,
            api_key=api_key,
            tenant_id=tenant_id if tenant_id is not None else ("" if api_key else DEFAULT_TENANT),
        )

    def channel(self, target: str) -> grpc.aio.Channel:
        credentials = channel_credentials(self.tls) if self.tls is not None else None
        if credentials is None:
            return grpc.aio.insecure_channel(target, options=channel_options())
        options = channel_options()
        if self.tls.server_name:
            options.append(("grpc.ssl_target_name_override", self.tls.server_name))
        return grpc.aio.secure_channel(target, credentials, options=options)

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        return bearer_metadata(self.api_key) if self.api_key else ()


async def _send(stub, request: DemoRequest, delay_s: float, index: int, access: ClientAccess) -> DemoOutcome:
    await asyncio.sleep(delay_s)
    started_s = time.monotonic()
    prompt = generation_pb2.Prompt(
        instruction=request.instruction,
        user_input=request.user_input,
        max_new_tokens=request.max_new_tokens,
        tenant_id=access.tenant_id,
        client_request_id=f"demo-{index}-{started_s}",
    )
    try:
        response = await stub.Generate(
            generation_pb2.GenerateRequest(prompt=prompt), timeout=600, metadata=access.metadata
        )
        return DemoOutcome(request, time.monotonic() - started_s, response, None)
    except grpc.aio.AioRpcError as error:
        return DemoOutcome(request, time.monotonic() - started_s, None, f"{error.code().name}: {error.details()}")


async def run_workload(
    target: str, requests: list[DemoRequest], rate_per_s: float, seed: int, access: ClientAccess | None = None
) -> list[DemoOutcome]:
    access = access or ClientAccess()
    rng = random.Random(seed)
    delays_s, at_s = [], 0.0
    for _ in requests:
        delays_s.append(at_s)
        at_s += rng.expovariate(rate_per_s)
    async with access.channel(target) as channel:
        stub = generation_pb2_grpc.GenerationServiceStub(channel)
        return await asyncio.gather(
            *(_send(stub, r, d, i, access) for i, (r, d) in enumerate(zip(requests, delays_s)))
        )


def summarize(outcomes: list[DemoOutcome]) -> dict:
    answered = [o for o in outcomes if o.response is not None]
    latencies_s = sorted(o.latency_s for o in answered)
    per_task: dict[str, list[DemoOutcome]] = defaultdict(list)
    for o in answered:
        per_task[o.request.task].append(o)

    def p99(values: list[float]) -> float:
        return values[min(len(values) - 1, int(round(0.99 * (len(values) - 1))))] if values else float("nan")

    return {
        "num_requests": len(outcomes),
        "num_answered": len(answered),
        "num_failed": len(outcomes) - len(answered),
        "errors": sorted({o.error for o in outcomes if o.error}),
        "num_batches": len({o.response.batch_id for o in answered}),
        "mean_batch_size": statistics.fmean([o.response.batch_size for o in answered]) if answered else 0,
        "mean_latency_s": statistics.fmean(latencies_s) if latencies_s else float("nan"),
        "p99_latency_s": p99(latencies_s),
        "per_task": {
            task: {
                "n": len(items),
                "mean_predicted_tokens": statistics.fmean(o.response.predicted_tokens for o in items),
                "mean_generated_tokens": statistics.fmean(o.response.generated_tokens for o in items),
                "mae_tokens": statistics.fmean(
                    abs(o.response.predicted_tokens - o.response.generated_tokens) for o in items
                ),
            }
            for task, items in sorted(per_task.items())
        },
    }


def machine_load() -> dict:
    """The machine's 1-minute load average and core count: a demo's latency means little without it."""
    return {"load_avg_1m": os.getloadavg()[0], "num_cpus": os.cpu_count() or 1}


def what_latency_measures(load_before: dict, load_after: dict) -> str:
    """One honest line on what the demo's latency measures, read from the settings and the load."""
    model = os.environ.get("MAGNUS_MODEL") or "the tiny random-weight Qwen2 (meaningless text, trace-replay lengths)"
    device = os.environ.get("MAGNUS_WORKER_DEVICE", "auto (a GPU if the worker has one, else the CPU)")
    cpus = load_after["num_cpus"]
    load = max(load_before["load_avg_1m"], load_after["load_avg_1m"])
    busy = (
        f"the machine was busy (load {load:.1f} on {cpus} cores): other processes competed with the stack"
        if load > cpus
        else f"load {load:.1f} on {cpus} cores"
    )
    return (
        f"latency = queue + batch run of {model} on device {device}, with every service and this client "
        f"on one machine; {busy}. A serving benchmark is reports/gpu/, not this demo."
    )


def print_summary(summary: dict) -> None:
    print(
        f"\nrequests {summary['num_answered']}/{summary['num_requests']} answered, "
        f"{summary['num_batches']} batches (mean size {summary['mean_batch_size']:.1f}), "
        f"latency mean {summary['mean_latency_s']:.2f} s, p99 {summary['p99_latency_s']:.2f} s"
    )
    if "latency_note" in summary:
        print(f"  ({summary['latency_note']})")
    for error in summary["errors"]:
        print(f"  error: {error}")
    print(f"\n{'task':22s} {'n':>4s} {'predicted':>10s} {'actual':>8s} {'MAE':>7s}  (tokens, means)")
    for task, row in summary["per_task"].items():
        print(
            f"{task:22s} {row['n']:4d} {row['mean_predicted_tokens']:10.1f} "
            f"{row['mean_generated_tokens']:8.1f} {row['mae_tokens']:7.1f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", default="127.0.0.1:50051", help="batcher host:port")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA_DIR, help="task folder or one JSONL file")
    parser.add_argument("--num-requests", type=int, default=48)
    parser.add_argument("--rate", type=float, default=8.0, help="Poisson arrival rate, requests/s")
    parser.add_argument("--max-new-tokens", type=int, default=128, help="cap on each request's length, tokens")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="also write the summary here")
    parser.add_argument("--api-key", help=f"client API key when auth is on (default: ${API_KEY_ENV})")
    parser.add_argument("--tenant", help="tenant_id of every request (default: the API key's, or 'demo' without one)")
    args = parser.parse_args()
    access = ClientAccess.from_env(args.api_key, args.tenant)
    requests = load_requests(args.data, args.num_requests, args.max_new_tokens, args.seed)
    print(f"sending {len(requests)} requests at {args.rate:g}/s to {args.target} ...")
    load_before = machine_load()
    outcomes = asyncio.run(run_workload(args.target, requests, args.rate, args.seed, access))
    summary = summarize(outcomes)
    summary["latency_note"] = what_latency_measures(load_before, machine_load())
    print_summary(summary)
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))
    raise SystemExit(0 if summary["num_failed"] == 0 else 1)


if __name__ == "__main__":
    main()
