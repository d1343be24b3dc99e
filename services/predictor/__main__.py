"""`python -m services.predictor`: run one predictor replica until SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio

from services.predictor.config import PredictorSettings
from services.predictor.server import serve
from services.shared.logs import setup_logging


def main() -> None:
    settings = PredictorSettings()
    setup_logging("predictor", settings.log_level)
    asyncio.run(serve(settings))


if __name__ == "__main__":
    main()
