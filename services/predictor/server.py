"""Predictor wiring: PredictorService + ModelAdminService on a versioned-model replica.

The replica reports NOT_SERVING until a model is loaded: at start-up it loads the latest pushed
predictor version, retrying every `load_retry_s` while there is none (or its file is bad).
"""

from __future__ import annotations

import asyncio
import logging

from magnus.v1 import predictor_pb2
from services.predictor.config import PredictorSettings
from services.predictor.servicer import PredictorServicer
from services.shared.db.models import ModelKind
from services.shared.model_server import VersionedModelServer
from services.shared.tokenizer import get_token_counter

log = logging.getLogger(__name__)

KIND = ModelKind.PREDICTOR


class PredictorServer(VersionedModelServer):
    """One predictor replica. `start()` returns the bound port; `stop()` shuts it down."""

    def __init__(self, settings: PredictorSettings) -> None:
        super().__init__(KIND, settings, settings.model_store_dir)
        self.add_service(predictor_pb2, "PredictorService", PredictorServicer(self.slot, settings))

    async def start(self) -> int:
        # Load the tokenizer vocabulary before the first request, not inside it.
        await asyncio.to_thread(get_token_counter)
        return await self.start_loading(
            retry_s=self.settings.load_retry_s,
            missing_hint="; create one with `python -m services.predictor.bootstrap --data ../shared/data`",
        )


async def serve(settings: PredictorSettings) -> None:
    await PredictorServer(settings).serve_until_shutdown()
