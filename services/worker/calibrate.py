"""Time the engine over a grid of batch shapes and store the samples for the batch-time estimator.

Each shape is (batch size, prompt tokens L, new tokens G). Prompts are random ordinary token ids
of exactly L tokens and EOS is ignored, so every row runs exactly G decode steps: the sample then
measures the shape, not the text. Rows go to the log DB as BatchTimeSample(source="calibration").

CLI: `python -m services.worker.calibrate [--grid small|full] [--database-url URL]`.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import logging
import random
import statistics
import time
from dataclasses import dataclass

from services.worker.engine import BatchOutOfMemory, StaticBatchEngine, describe_device, resolve_device

log = logging.getLogger(__name__)

# (batch sizes, prompt tokens, new tokens). small: 27 shapes, < 60 s on 2 idle CPU cores with the tiny
# model. first: the corners of small, timed once (a few seconds): `make run`'s prior, which the trainer
# refines from the served batches' times (continuous learning) and `make calibrate` widens.
GRIDS: dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]] = {
    "first": ((1, 8), (16, 128), (8, 32)),
    "small": ((1, 4, 8), (16, 64, 128), (8, 16, 32)),
    "full": ((1, 2, 4, 8, 16, 32, 64), (32, 128, 512, 1024, 2048), (16, 64, 128, 256, 512)),
    # a 7B shape on one H100/H200 in about a minute (timed once each): the paper tasks' range
    "gpu": ((1, 16, 64, 256), (32, 128, 384), (16, 64, 256)),
}
REPEATS = {"first": 1, "small": 3, "full": 3, "gpu": 1}
SEED = 0


@dataclass(frozen=True)
class Shape:
    batch_size: int
    input_tokens: int  # L(B), tokens
    gen_tokens: int  # G(B), tokens


@dataclass(frozen=True)
class Sample:
    shape: Shape
    duration_s: float | None  # None: the shape ran out of memory


def grid_shapes(grid: str) -> list[Shape]:
    if grid not in GRIDS:
        raise ValueError(f"unknown grid {grid!r}; choose one of {sorted(GRIDS)}")
    return [Shape(b, l, g) for b, l, g in itertools.product(*GRIDS[grid])]


def synthetic_prompt_ids(engine: StaticBatchEngine, shape: Shape, rng: random.Random) -> list[list[int]]:
    """`batch_size` prompts of exactly `input_tokens` ordinary (non-special) token ids."""
    num_ordinary = min(engine.eos_token_ids + [len(engine.tokenizer)])
    return [[rng.randrange(num_ordinary) for _ in range(shape.input_tokens)] for _ in range(shape.batch_size)]


def time_shape(engine: StaticBatchEngine, shape: Shape, rng: random.Random, repeats: int = 3) -> Sample:
    """Median of `repeats` runs: one stray pause (GC, a neighbour process) must not become a sample.

    With CUDA graphs a shape's first run also captures its decode steps (one graph per 32-token
    length bucket); that one-off cost is not the shape's time, so the first run is not timed.
    """
    static = engine.static
    untimed = 1 if static is not None and static.use_cuda_graphs else 0
    durations_s = []
    for run in range(untimed + repeats):
        prompts = synthetic_prompt_ids(engine, shape, rng)
        try:
            output = engine.run_ids(prompts, [shape.gen_tokens] * shape.batch_size, stop_at_eos=False)
        except BatchOutOfMemory:
            return Sample(shape, None)
        if run >= untimed:
            durations_s.append(output.run_s)
    return Sample(shape, statistics.median(durations_s))


def calibrate(
    engine: StaticBatchEngine, shapes: list[Shape], *, repeats: int = 3, show_progress: bool = True
) -> list[Sample]:
    """Warm up on the smallest and largest shapes (allocator, thread pools, kernel choice), then time each."""
    from tqdm import tqdm

    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    rng = random.Random(SEED)
    by_size = sorted(shapes, key=lambda s: s.batch_size * (s.input_tokens + s.gen_tokens))
    for shape in (by_size[0], by_size[-1]):
        time_shape(engine, shape, rng, repeats=1)
    progress = tqdm(shapes, desc="calibrating", disable=not show_progress)
    return [time_shape(engine, shape, rng, repeats) for shape in progress]


def format_table(samples: list[Sample]) -> str:
    lines = [f"{'batch':>5} {'L':>6} {'G':>6} {'seconds':>9} {'ms/step':>8}"]
    for s in samples:
        if s.duration_s is None:
            lines.append(f"{s.shape.batch_size:>5} {s.shape.input_tokens:>6} {s.shape.gen_tokens:>6} {'OOM':>9}")
            continue
        per_step_ms = 1000 * s.duration_s / s.shape.gen_tokens
        lines.append(
            f"{s.shape.batch_size:>5} {s.shape.input_tokens:>6} {s.shape.gen_tokens:>6} "
            f"{s.duration_s:>9.3f} {per_step_ms:>8.2f}"
        )
    return "\n".join(lines)


async def store_samples(database_url: str, samples: list[Sample], device: str) -> int:
    """Insert the timed samples (OOM shapes skipped); returns the number of rows written."""
    from services.shared.db import BatchTimeSample, make_engine, make_session_factory
    from services.shared.db.models import SampleSource

    rows = [
        BatchTimeSample(
            batch_size=s.shape.batch_size,
            input_tokens_max=s.shape.input_tokens,
            gen_tokens_max=s.shape.gen_tokens,
            duration_s=s.duration_s,
            source=SampleSource.CALIBRATION,
            device=device[:64],
        )
        for s in samples
        if s.duration_s is not None
    ]
    db_engine = make_engine(database_url)
    try:
        async with make_session_factory(db_engine)() as session, session.begin():
            session.add_all(rows)
    finally:
        await db_engine.dispose()
    return len(rows)


async def calibrate_if_missing(engine: StaticBatchEngine, grid: str, database_url: str) -> int:
    """Time `grid` and store it unless the engine's device has samples; returns the rows written."""
    from services.shared.db import upgrade

    await asyncio.to_thread(upgrade, database_url)
    device = engine.device_name
    if num_existing := await count_samples(database_url, device):
        log.info("%d calibration samples for %s already stored; not calibrating", num_existing, device)
        return 0
    started_s = time.monotonic()
    samples = await asyncio.to_thread(calibrate, engine, grid_shapes(grid), repeats=REPEATS[grid], show_progress=False)
    log.info("calibrated %d shapes on %s in %.1f s:\n%s", len(samples), device, time.monotonic() - started_s,
             format_table(samples))
    return await store_samples(database_url, samples, device)


async def count_samples(database_url: str, device: str) -> int:
    """Calibration samples already stored for `device`."""
    from sqlalchemy import func, select

    from services.shared.db import BatchTimeSample, make_engine, make_session_factory
    from services.shared.db.models import SampleSource

    query = select(func.count()).where(
        BatchTimeSample.source == SampleSource.CALIBRATION, BatchTimeSample.device == device[:64]
    )
    db_engine = make_engine(database_url)
    try:
        async with make_session_factory(db_engine)() as session:
            return int(await session.scalar(query) or 0)
    finally:
        await db_engine.dispose()


def main(argv: list[str] | None = None) -> None:
    from services.shared.db import default_database_url, upgrade
    from services.worker.model_builder import resolve_model_dir

    parser = argparse.ArgumentParser(description="Time the worker engine over batch shapes; store the samples.")
    parser.add_argument("--grid", choices=sorted(GRIDS), default="small")
    parser.add_argument(
        "--database-url", default=None, help="log DB URL (default: MAGNUS_DATABASE_URL or var/magnus.db)"
    )
    parser.add_argument("--model", default="", help="HF model folder (default: MAGNUS_MODEL or the tiny Qwen2)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--dtype", choices=("auto", "float32", "float16", "bfloat16"), default="auto")
    parser.add_argument("--repeats", type=int, default=None, help="runs per shape, the median is stored "
                        "(default: 3, 1 for the gpu grid)")
    parser.add_argument(
        "--if-missing", action="store_true", help="do nothing if this device already has calibration samples"
    )
    parser.add_argument("--no-store", action="store_true", help="print the table only")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    database_url = args.database_url or default_database_url()
    if not args.no_store:
        upgrade(database_url)
    if args.if_missing and not args.no_store:
        device = describe_device(resolve_device(args.device))
        num_existing = asyncio.run(count_samples(database_url, device))
        if num_existing:
            print(f"{num_existing} calibration samples for {device} already stored; nothing to do")
            return

    started_s = time.monotonic()
    engine = StaticBatchEngine(resolve_model_dir(args.model), device=args.device, dtype=args.dtype)
    samples = calibrate(engine, grid_shapes(args.grid), repeats=args.repeats or REPEATS[args.grid])
    print(format_table(samples))
    print(f"{len(samples)} shapes on {engine.device_name} in {time.monotonic() - started_s:.1f} s")
    if args.no_store:
        return
    num_rows = asyncio.run(store_samples(database_url, samples, engine.device_name))
    print(f"stored {num_rows} calibration samples in {database_url}")


if __name__ == "__main__":
    main()
