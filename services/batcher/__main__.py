"""python -m services.batcher"""

import asyncio

from services.batcher.config import BatcherSettings
from services.batcher.server import serve
from services.shared.logs import setup_logging

if __name__ == "__main__":
    settings = BatcherSettings()
    setup_logging("batcher", settings.log_level)
    asyncio.run(serve(settings))
