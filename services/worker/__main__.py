"""`python -m services.worker`: run one worker (settings from MAGNUS_WORKER_* and MAGNUS_MODEL)."""

from __future__ import annotations

import asyncio
import sys

from services.shared.logs import setup_logging
from services.worker.config import WorkerSettings
from services.worker.server import serve


def main() -> None:
    settings = WorkerSettings()
    setup_logging("worker", settings.log_level)
    if settings.gil_switch_interval_s:
        sys.setswitchinterval(settings.gil_switch_interval_s)
    asyncio.run(serve(settings))


if __name__ == "__main__":
    main()
