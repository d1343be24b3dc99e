"""`python -m services.trainer`: run the trainer until SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio

from services.shared.logs import setup_logging
from services.trainer.config import TrainerSettings
from services.trainer.server import serve


def main() -> None:
    settings = TrainerSettings()
    setup_logging("trainer", settings.log_level)
    asyncio.run(serve(settings))


if __name__ == "__main__":
    main()
