"""`make bootstrap` (run by `make run` / `make serve`): what the services need before they start.

Each step runs only if its result is missing: migrations, the default model, the first predictor
version, the worker's calibration samples, the first estimator version. One process instead of one
per step, so a second `make run` pays one interpreter start and one torch import, not five. Prints
each step's time, so a newcomer sees where the first run's minutes go.

    python -m tools.bootstrap --data ../shared/data
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import Callable
from pathlib import Path

from services.shared.db import default_database_url, migrate


def _step(number: int, total: int, title: str, action: Callable[[], object]) -> object:
    print(f"[{number}/{total}] {title} ...", flush=True)
    started_s = time.monotonic()
    result = action()
    print(f"[{number}/{total}] {title}: {time.monotonic() - started_s:.1f} s", flush=True)
    return result


def _build_model() -> None:
    from services.worker.model_builder import resolve_model_dir

    print(f"      model folder: {resolve_model_dir()}")  # MAGNUS_MODEL if set, else the tiny Qwen2 (built once)


def _predictor(data: Path, database_url: str) -> None:
    from services.core.embedding_forest import SERVED_MODEL
    from services.predictor import bootstrap as predictor_bootstrap

    args = predictor_bootstrap.parse_args(
        ["--data", str(data), "--model", SERVED_MODEL, "--max-per-task", "2500", "--if-missing",
         "--database-url", database_url]
    )
    if asyncio.run(predictor_bootstrap.run(args)) != 0:
        raise SystemExit("the first predictor version could not be trained")


def _calibrate(grid: str, database_url: str) -> None:
    from services.worker import calibrate

    calibrate.main(["--grid", grid, "--if-missing", "--database-url", database_url])


def _estimator(database_url: str) -> None:
    from services.estimator import bootstrap as estimator_bootstrap

    if estimator_bootstrap.main(["--if-missing", "--database-url", database_url]) != 0:
        raise SystemExit("the first estimator version could not be fitted")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.bootstrap", description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="task folder (or one .jsonl) for the predictor")
    parser.add_argument("--grid", default="first", help="calibration grid (services.worker.calibrate)")
    parser.add_argument("--database-url", default=None, help="log DB (default: MAGNUS_DATABASE_URL or var/magnus.db)")
    args = parser.parse_args(argv)
    database_url = args.database_url or default_database_url()
    started_s = time.monotonic()
    steps: list[tuple[str, Callable[[], object]]] = [
        ("log DB migrations", lambda: migrate.upgrade(database_url)),
        ("default model", _build_model),
        ("first predictor version", lambda: _predictor(args.data, database_url)),
        (f"worker calibration ({args.grid} grid)", lambda: _calibrate(args.grid, database_url)),
        ("first estimator version", lambda: _estimator(database_url)),
    ]
    for number, (title, action) in enumerate(steps, start=1):
        _step(number, len(steps), title, action)
    print(f"bootstrap done in {time.monotonic() - started_s:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
