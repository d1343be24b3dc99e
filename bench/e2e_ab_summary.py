"""Tables of gpu_e2e A/B runs (bench/gpu_e2e_ab.sh) and of the py-spy samples they took of the worker.

    python bench/e2e_ab_summary.py NAME=path/e2e_raw.json[.gz] ... [--pyspy NAME=path/pyspy.txt[.gz] ...]

Per run and phase: requests/s done, mean and p99 latency, the paged worker's steps split into decode-only
(graph-replayed) and mixed ones with their mean times, the mean running requests and the worker-protocol
calls the batcher handled. Per py-spy file (raw format, --threads): samples per thread and, for the engine
thread, where it was (the deepest frames in the worker's own code).
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.percentile import nearest_rank  # noqa: E402

ENGINE_THREAD = "paged-engine"
OWN_FILES = ("mixed_step.py", "runner.py", "scheduler.py", "engine.py", "serving.py", "decode_step.py",
             "attention.py", "fused_ops.py", "skinny_gemm.py", "kv_blocks.py", "projection.py", "engine_thread.py")


def _open(path: Path):
    return gzip.open(path, "rt") if path.suffix == ".gz" else open(path)


def phase_rows(name: str, raw: dict) -> list[str]:
    rows = []
    for policy, result in raw["policies"].items():
        for rate, phase in result["rates"].items():
            ok = [r for r in phase["requests"] if r["status"] == "OK"]
            latencies = sorted(r["latency_s"] for r in ok)
            done_s = max(r["done_s"] for r in ok)
            counters = phase.get("worker_counters", {}).get("worker", {})
            steps, step_s = counters.get("steps", 0), counters.get("step_s", 0.0)
            if "decode_only_steps" in counters:  # exported since 58920cb
                decode, decode_s = counters["decode_only_steps"], counters["decode_only_step_s"]
                mixed_ms = 1e3 * (step_s - decode_s) / max(1, steps - decode)
                split = f"{decode:.0f} @ {1e3 * decode_s / max(1, decode):.2f} ms | {steps - decode:.0f} @ {mixed_ms:.2f} ms"
            else:
                split = "- | -"
            calls = phase.get("worker_rpc_calls")  # recorded since 761a80f
            calls_text = (f"{calls['PullBatch']:.0f} / {calls['CompleteBatch'] + calls['CompleteBatches']:.0f}"
                          if calls else "-")
            rows.append(
                f"| {name} | {policy} | {float(rate):g} | {len(ok) / done_s:.1f} | {sum(latencies) / len(ok):.3f} | "
                f"{nearest_rank(latencies, 0.99):.3f} | {steps:.0f} @ "
                f"{1e3 * step_s / max(1, steps):.2f} ms | {split} | {counters.get('mean_running_requests', 0):.1f} | "
                f"{calls_text} |")
    return rows


def pyspy_summary(name: str, path: Path, top: int = 12) -> list[str]:
    threads: collections.Counter[str] = collections.Counter()
    where: collections.Counter[str] = collections.Counter()
    for line in _open(path):
        line = line.strip()
        if not line:
            continue
        stack, count = line.rsplit(" ", 1)
        frames = stack.split(";")
        thread = frames[0].split(": ", 1)[-1]
        threads[thread] += int(count)
        if thread != ENGINE_THREAD:
            continue
        names = [f"{f.split(' (')[0]}@{f.rsplit('/', 1)[-1].rstrip(')')}" for f in frames[1:]]
        own = [n for n in names if any(file in n for file in OWN_FILES)]
        key = " > ".join(own[-2:]) if own else (names[-1] if names else "?")
        if own and own[-1] != names[-1]:
            key += f" > {names[-1]}"
        where[key] += int(count)
    engine = where.total()
    lines = [f"{name}: samples per thread: " + ", ".join(f"{t} {n}" for t, n in threads.most_common(6))]
    lines += [f"  {n:5d} {100 * n / engine:5.1f}%  {key}" for key, n in where.most_common(top)]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="NAME=path to an e2e_raw.json(.gz)")
    parser.add_argument("--pyspy", nargs="*", default=[], help="NAME=path to a py-spy raw file(.gz)")
    args = parser.parse_args()
    print("| run | policy | rate req/s | done req/s | mean s | p99 s | steps | decode-only steps | mixed steps | mean running "
          "| PullBatch / Complete calls |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for spec in args.runs:
        name, path = spec.split("=", 1)
        with _open(Path(path)) as file:
            print("\n".join(phase_rows(name, json.load(file))))
    for spec in args.pyspy:
        name, path = spec.split("=", 1)
        print("\n".join(pyspy_summary(name, Path(path))))


if __name__ == "__main__":
    main()
