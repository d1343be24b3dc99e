"""`python -m services.estimator.bootstrap [--if-missing]`: fit an estimator from calibration.

Fits KNN on every `batch_time_samples` row with source "calibration" (written by the workers'
calibration run) and stores it as a new, pushed estimator version.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

from services.estimator.calibration import KIND, fit_from_calibration
from services.estimator.config import EstimatorSettings
from services.shared.db import migrate
from services.shared.db.engine import make_engine, make_session_factory
from services.shared.model_store import ModelStore, VersionNotFound


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    settings = EstimatorSettings()
    parser = argparse.ArgumentParser(prog="python -m services.estimator.bootstrap", description=__doc__)
    parser.add_argument("--database-url", default=settings.database_url)
    parser.add_argument("--model-store-dir", type=Path, default=settings.model_store_dir)
    parser.add_argument("--n-neighbors", type=int, default=settings.n_neighbors)
    parser.add_argument("--if-missing", action="store_true", help="skip if an estimator version exists")
    args = parser.parse_args(argv)
    if args.n_neighbors < 1:
        parser.error("--n-neighbors must be >= 1")
    return args


async def run(args: argparse.Namespace) -> int:
    started_s = time.monotonic()
    await asyncio.to_thread(migrate.upgrade, args.database_url)
    engine = make_engine(args.database_url)
    try:
        store = ModelStore(args.model_store_dir, make_session_factory(engine))
        if args.if_missing:
            try:
                info = await store.find(KIND)
                print(f"estimator v{info.version} exists; nothing to do (--if-missing)")
                return 0
            except VersionNotFound:
                pass
        info = await fit_from_calibration(store, n_neighbors=args.n_neighbors)
        if info is None:
            print("no calibration samples in batch_time_samples: run a worker's calibration first", file=sys.stderr)
            return 1
        print(
            f"stored estimator v{info.version} from {info.num_train_samples} calibration samples "
            f"(5-fold MAE {info.metrics.get('cv_mae_s')} s) in {time.monotonic() - started_s:.2f} s"
        )
        return 0
    finally:
        await engine.dispose()


def main(argv: list[str] | None = None) -> int:
    return asyncio.run(run(parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
