"""`python -m services.gateway`: serve the OpenAI-compatible HTTP API until SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio

from services.gateway.config import GatewaySettings
from services.gateway.server import serve
from services.shared.logs import setup_logging


def main() -> None:
    settings = GatewaySettings()
    setup_logging("gateway", settings.log_level)
    asyncio.run(serve(settings))


if __name__ == "__main__":
    main()
