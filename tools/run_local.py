"""`make run`: start every service on localhost, wait for health, send the demo, print a summary.

Expects the set-up steps of the Makefile to have run (environment, generated code, migrations,
default model, first predictor and estimator versions). Ctrl-C stops everything cleanly.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
from pathlib import Path

from services.shared.settings import VAR_DIR, default_database_url
from tools import demo
from tools.stack import BATCHER_INTERNAL, SERVICES, Stack


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=demo.DEFAULT_DATA_DIR, help="task folder or one JSONL file")
    parser.add_argument("--num-requests", type=int, default=48)
    parser.add_argument("--rate", type=float, default=8.0, help="Poisson arrivals, requests/s")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--serve", action="store_true", help="keep the stack running after the demo")
    args = parser.parse_args()

    ports = dict(zip(("batcher", "predictor", "estimator", "trainer", "worker"), range(50051, 50056)))
    ports[BATCHER_INTERNAL] = 50061  # the batcher's worker-only listener, its default port
    stack = Stack(
        workdir=VAR_DIR / "run",
        database_url=os.environ.get("MAGNUS_DATABASE_URL", default_database_url()),
        model_store_dir=Path(os.environ.get("MAGNUS_MODEL_STORE_DIR", VAR_DIR / "model-store")),
        ports=ports,
    )
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        print(f"starting {', '.join(SERVICES)}; logs in {stack.workdir / 'logs'}")
        stack.start_all()
        stack.wait_healthy(timeout_s=180)
        print("all services SERVING: " + ", ".join(f"{n}={stack.target(n)}" for n in SERVICES))
        requests = demo.load_requests(args.data, args.num_requests, args.max_new_tokens, seed=0)
        print(f"sending {len(requests)} requests at {args.rate:g}/s ...")
        outcomes = asyncio.run(demo.run_workload(stack.target("batcher"), requests, args.rate, seed=0))
        summary = demo.summarize(outcomes)
        demo.print_summary(summary)
        if args.serve:
            print(f"\nstack running; batcher at {stack.target('batcher')}. Ctrl-C to stop.")
            signal.pause()
        return 0 if summary["num_failed"] == 0 else 1
    except KeyboardInterrupt:
        print("\nstopping ...")
        return 130
    finally:
        stack.stop_all()
        print("stopped.")


if __name__ == "__main__":
    sys.exit(main())
