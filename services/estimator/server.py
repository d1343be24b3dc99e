"""Estimator wiring: EstimatorService + ModelAdminService on a versioned-model replica.

NOT_SERVING until a model is loaded. At start-up it loads the latest pushed estimator version;
if none exists but the workers' calibration wrote `batch_time_samples`, it fits v1 from them.
"""

from __future__ import annotations

from magnus.v1 import estimator_pb2
from services.estimator.calibration import KIND, fit_from_calibration
from services.estimator.config import EstimatorSettings
from services.estimator.servicer import EstimatorServicer
from services.shared.model_server import VersionedModelServer


class EstimatorServer(VersionedModelServer):
    """One estimator replica. `start()` returns the bound port; `stop()` shuts it down."""

    def __init__(self, settings: EstimatorSettings) -> None:
        super().__init__(KIND, settings, settings.model_store_dir)
        self.add_service(estimator_pb2, "EstimatorService", EstimatorServicer(self.slot, settings))

    async def _fit_first(self) -> bool:
        info = await fit_from_calibration(
            self.store, n_neighbors=self.settings.n_neighbors, min_samples=self.settings.min_fit_samples
        )
        return info is not None

    async def start(self) -> int:
        return await self.start_loading(
            retry_s=self.settings.load_retry_s,
            create_first=self._fit_first,
            missing_hint=(
                " and batch_time_samples has no calibration rows to fit one from;"
                " run a worker's calibration (the estimator then fits v1 itself)"
            ),
        )


async def serve(settings: EstimatorSettings) -> None:
    await EstimatorServer(settings).serve_until_shutdown()
