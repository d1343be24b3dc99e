"""Host time of the paged engine's steps (schedule, prepare, update) on the mix's burst, the model stubbed (CPU).

    python bench/paged_host_time.py [--lengths var/serving/mix_lengths.jsonl] [--profile]

The same 1,000 requests and scheduler settings as `bench/gpu_serving.py`'s mix burst (magnus_ccb, 256
running, 2,048 tokens a step, the H200's 10,914-block pool); the runner prepares every step's inputs as
on a CPU (eager) and its `step` returns a fixed token instead of running a model, so what is timed is the
host work a GPU step waits on between replays. The plan is deterministic: the step counts equal the GPU
run's. --profile prints cProfile's top functions (and slows the run ~3x).
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.gpu_serving import POLICIES, mix_jobs  # noqa: E402
from services.worker.paged.decode_step import PagedDecoder, PagedModelConfig, PagedWeights  # noqa: E402
from services.worker.paged.engine import PagedEngine  # noqa: E402
from services.worker.paged.kv_blocks import BlockPool  # noqa: E402
from services.worker.paged.runner import ModelRunner  # noqa: E402
from services.worker.paged.scheduler import Scheduler, SchedulerConfig  # noqa: E402

POOL_BLOCKS = 10_914  # the H200's pool in reports/gpu/serving.md
TINY = PagedModelConfig(vocab_size=1000, hidden_size=64, intermediate_size=64, num_layers=1, num_heads=4,
                        num_kv_heads=4, max_positions=4096)


def burst_engine(lengths: Path, policy: str) -> PagedEngine:
    decoder = PagedDecoder(TINY, PagedWeights.random(TINY, "cpu", torch.float32), POOL_BLOCKS, 16, use_triton=False)
    runner = ModelRunner(decoder, max_model_tokens=4096)
    runner.step = lambda prepared: dict.fromkeys(prepared.sampled_ids, 7)  # no model: host work only
    fields, prediction = POLICIES[policy]
    config = SchedulerConfig(max_running=256, token_budget=2048, **fields)
    engine = PagedEngine(runner, Scheduler(config, BlockPool(POOL_BLOCKS, 16)))
    for i, job in enumerate(mix_jobs(lengths, TINY.vocab_size)[200:1200]):  # gpu_serving's burst rows
        engine.add_request(i, job.prompt_ids, job.max_new_tokens, job.prediction(prediction),
                           replay_tokens=job.output_tokens)
    return engine


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=Path, default=Path("var/serving/mix_lengths.jsonl"))
    parser.add_argument("--policy", default="magnus_ccb", choices=sorted(POLICIES))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    for _ in range(1 if args.profile else args.repeats):
        engine = burst_engine(args.lengths, args.policy)
        profiler = cProfile.Profile() if args.profile else None
        started_s = time.perf_counter()
        if profiler:
            profiler.enable()
        engine.run()
        if profiler:
            profiler.disable()
        host_s = time.perf_counter() - started_s
        stats = engine.stats
        print(f"{args.policy}: {stats.steps} steps ({stats.decode_only_steps} decode-only), {host_s:.2f} s of host "
              f"work, {1e3 * host_s / stats.steps:.2f} ms a step{' (profiled)' if profiler else ''}", flush=True)
        if profiler:
            pstats.Stats(profiler).sort_stats("cumulative").print_stats(20)
    return 0


if __name__ == "__main__":
    sys.exit(main())
