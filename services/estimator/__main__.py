"""`python -m services.estimator`: run one estimator replica until SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio

from services.estimator.config import EstimatorSettings
from services.estimator.server import serve
from services.shared.logs import setup_logging


def main() -> None:
    settings = EstimatorSettings()
    setup_logging("estimator", settings.log_level)
    asyncio.run(serve(settings))


if __name__ == "__main__":
    main()
