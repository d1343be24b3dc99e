"""Estimator wiring: DB + model store + slot, EstimatorService + ModelAdminService, health.

NOT_SERVING until a model is loaded. At start-up it loads the latest pushed estimator version;
if none exists but the workers' calibration wrote `batch_time_samples`, it fits v1 from them.
"""

from __future__ import annotations

import asyncio
import contextlib

from magnus.v1 import estimator_pb2, model_admin_pb2
from services.estimator.calibration import KIND, fit_from_calibration
from services.estimator.config import EstimatorSettings
from services.estimator.servicer import EstimatorServicer
from services.shared.db.engine import make_engine, make_session_factory
from services.shared.model_admin import ModelAdminServicer, load_until_ready
from services.shared.model_store import LoadedModel, ModelSlot, ModelStore
from services.shared.server import ServiceRunner


class EstimatorServer:
    """One estimator replica. `start()` returns the bound port; `stop()` shuts it down."""

    def __init__(self, settings: EstimatorSettings) -> None:
        self.settings = settings
        self.engine = make_engine(settings.database_url)
        self.store = ModelStore(settings.model_store_dir, make_session_factory(self.engine))
        self.slot = ModelSlot(KIND)
        self.runner = ServiceRunner(KIND, settings)
        self.runner.add(estimator_pb2, "EstimatorService", EstimatorServicer(self.slot, settings))
        admin = ModelAdminServicer(self.slot, self.store, on_loaded=self._on_loaded)
        self.runner.add(model_admin_pb2, "ModelAdminService", admin)
        self._loader: asyncio.Task[LoadedModel] | None = None

    async def _on_loaded(self, loaded: LoadedModel) -> None:
        if not self.runner.is_shutting_down:
            await self.runner.set_serving(True)

    async def _fit_first(self) -> bool:
        info = await fit_from_calibration(
            self.store, n_neighbors=self.settings.n_neighbors, min_samples=self.settings.min_fit_samples
        )
        return info is not None

    async def start(self) -> int:
        port = await self.runner.start()
        self._loader = asyncio.create_task(
            load_until_ready(
                self.slot,
                self.store,
                retry_s=self.settings.load_retry_s,
                on_loaded=self._on_loaded,
                create_first=self._fit_first,
                missing_hint=(
                    " and batch_time_samples has no calibration rows to fit one from;"
                    " run a worker's calibration (the estimator then fits v1 itself)"
                ),
            ),
            name="estimator-loader",
        )
        return port

    async def stop(self, grace_s: float | None = None) -> None:
        if self._loader is not None:
            self._loader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loader
        await self.runner.stop(grace_s)
        await self.engine.dispose()


async def serve(settings: EstimatorSettings) -> None:
    server = EstimatorServer(settings)
    await server.start()
    try:
        await server.runner.wait_for_shutdown()
    finally:
        await server.stop()
