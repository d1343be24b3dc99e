"""Predictor wiring: DB + model store + slot, PredictorService + ModelAdminService, health.

The replica reports NOT_SERVING until a model is loaded: at start-up it loads the latest pushed
predictor version, retrying every `load_retry_s` while there is none (or its file is bad).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from magnus.v1 import model_admin_pb2, predictor_pb2
from services.predictor.config import PredictorSettings
from services.predictor.servicer import PredictorServicer
from services.shared.db.engine import make_engine, make_session_factory
from services.shared.model_admin import ModelAdminServicer, load_until_ready
from services.shared.model_store import LoadedModel, ModelSlot, ModelStore
from services.shared.server import ServiceRunner
from services.shared.tokenizer import get_token_counter

log = logging.getLogger(__name__)

KIND = "predictor"


class PredictorServer:
    """One predictor replica. `start()` returns the bound port; `stop()` shuts it down."""

    def __init__(self, settings: PredictorSettings) -> None:
        self.settings = settings
        self.engine = make_engine(settings.database_url)
        self.store = ModelStore(settings.model_store_dir, make_session_factory(self.engine))
        self.slot = ModelSlot(KIND)
        self.runner = ServiceRunner(KIND, settings)
        self.runner.add(predictor_pb2, "PredictorService", PredictorServicer(self.slot, settings))
        admin = ModelAdminServicer(self.slot, self.store, on_loaded=self._on_loaded)
        self.runner.add(model_admin_pb2, "ModelAdminService", admin)
        self._loader: asyncio.Task[LoadedModel] | None = None

    async def _on_loaded(self, loaded: LoadedModel) -> None:
        if not self.runner.is_shutting_down:
            await self.runner.set_serving(True)

    async def start(self) -> int:
        port = await self.runner.start()
        # Load the tokenizer vocabulary now rather than inside the first request.
        await asyncio.to_thread(get_token_counter)
        self._loader = asyncio.create_task(
            load_until_ready(
                self.slot,
                self.store,
                retry_s=self.settings.load_retry_s,
                on_loaded=self._on_loaded,
                missing_hint="; create one with `python -m services.predictor.bootstrap --data ../shared/data`",
            ),
            name="predictor-loader",
        )
        return port

    async def stop(self, grace_s: float | None = None) -> None:
        if self._loader is not None:
            self._loader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loader
        await self.runner.stop(grace_s)
        await self.engine.dispose()


async def serve(settings: PredictorSettings) -> None:
    server = PredictorServer(settings)
    await server.start()
    try:
        await server.runner.wait_for_shutdown()
    finally:
        await server.stop()
