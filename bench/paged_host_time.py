"""Host time of the paged engine's steps (schedule, prepare, update) on the mix's burst, the model stubbed (CPU).

    python bench/paged_host_time.py [--lengths var/serving/mix_lengths.jsonl] [--profile]
        [--device cuda] [--requests N --output-tokens M] [--overlap]

The same 1,000 requests and scheduler settings as `bench/gpu_serving.py`'s mix burst (magnus_ccb, 256
running, 2,048 tokens a step, the H200's 10,914-block pool), or its first N generating M tokens each (a
steady small batch); the runner prepares every step's inputs as served (on cuda: graphs filled, inputs
uploaded, the step's one sync) but returns a fixed token instead of running a model, so what is timed
is the host work a GPU step waits on between replays (with --overlap, the work that overlapped steps
hide behind the previous step). The plan is deterministic: the step counts equal the GPU
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

from bench.gpu_serving import POLICIES, mix_jobs, policy_config  # noqa: E402
from services.worker.paged.decode_step import PagedDecoder, PagedModelConfig, PagedWeights  # noqa: E402
from services.worker.paged.engine import PagedEngine  # noqa: E402
from services.worker.paged.kv_blocks import BlockPool  # noqa: E402
from services.worker.paged.reference_runner import Reference, ReferenceRunner  # noqa: E402
from services.worker.paged.runner import ModelRunner  # noqa: E402
from services.worker.paged.scheduler import Scheduler, SchedulerConfig  # noqa: E402

POOL_BLOCKS = 10_914  # the H200's pool in reports/gpu/serving.md
TINY = PagedModelConfig(vocab_size=1000, hidden_size=64, intermediate_size=64, num_layers=1, num_heads=4,
                        num_kv_heads=4, max_positions=4096)


def burst_engine(lengths: Path, policy: str, device: str = "cpu", requests: int = 1000,
                 output_tokens: int = 0, overlap: bool = False) -> PagedEngine:
    """requests: the burst's first this many; output_tokens > 0: each generates that many (a steady
    small batch, as at low load) instead of its recorded length. On "cuda" the runner captures and fills
    CUDA graphs and uploads every step's inputs as served, but still runs no model."""
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    decoder = PagedDecoder(TINY, PagedWeights.random(TINY, device, dtype), POOL_BLOCKS, 16,
                           use_triton=False if device == "cpu" else None)
    runner = ModelRunner(decoder, max_model_tokens=4096, use_cuda_graphs=device != "cpu")
    # no model: each step "samples" token 7 for its sampled rows, on the runner's device, so what is
    # timed is the host work (and, on cuda, the copies and the one sync a served step makes)
    runner._run = lambda prepared: torch.full((sum(prepared.sample_counts or [1] * len(prepared.sampled_ids)),), 7,
                                              dtype=torch.int64, device=runner.device)
    fields, prediction = policy_config(policy)
    config = SchedulerConfig(max_running=256, token_budget=2048, **fields)
    jobs = mix_jobs(lengths, TINY.vocab_size)[200:200 + requests]  # gpu_serving's burst rows
    references = {i: Reference(len(job.prompt_ids), job.reference_ids) for i, job in enumerate(jobs)}  # for drafts
    engine = PagedEngine(ReferenceRunner(runner, references), Scheduler(config, BlockPool(POOL_BLOCKS, 16)),
                         overlap=overlap)
    for i, job in enumerate(jobs):
        outputs = output_tokens or job.output_tokens
        engine.add_request(i, job.prompt_ids, output_tokens or job.max_new_tokens, job.prediction(prediction),
                           replay_tokens=outputs)
    return engine


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=Path, default=Path("var/serving/mix_lengths.jsonl"))
    parser.add_argument("--policy", default="magnus_ccb", help=f"one of {sorted(POLICIES)} (magnus_ccb_spec:K too)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--device", default="cpu", help="cuda: graphs filled and inputs uploaded as served")
    parser.add_argument("--requests", type=int, default=1000, help="the burst's first this many")
    parser.add_argument("--output-tokens", type=int, default=0, help="> 0: each request generates this many")
    parser.add_argument("--overlap", action="store_true", help="PagedEngine's overlapped steps")
    args = parser.parse_args()
    for _ in range(1 if args.profile else args.repeats):
        engine = burst_engine(args.lengths, args.policy, args.device, args.requests, args.output_tokens, args.overlap)
        if args.device != "cpu":  # captures outside the timing, as the worker's warm-up does
            engine.runner.warm_up(256, 2048)
        profiler = cProfile.Profile() if args.profile else None
        started_s = time.perf_counter()
        if profiler:
            profiler.enable()
        engine.run()
        if profiler:
            profiler.disable()
        host_s = time.perf_counter() - started_s
        stats = engine.stats
        mode = ", overlap" if args.overlap else ""
        print(f"{args.policy}, {args.device}, {args.requests} requests{mode}: {stats.steps} steps "
              f"({stats.decode_only_steps} decode-only), {host_s:.2f} s of host work, "
              f"{1e3 * host_s / stats.steps:.2f} ms a step{' (profiled)' if profiler else ''}", flush=True)
        if profiler:
            pstats.Stats(profiler).sort_stats("cumulative").print_stats(20)
    return 0


if __name__ == "__main__":
    sys.exit(main())
