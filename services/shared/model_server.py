"""The frame shared by predictor and estimator replicas: a versioned model behind gRPC.

A replica owns a DB engine, a model store, a ModelSlot and a ServiceRunner; it serves its own
service plus ModelAdminService, reports NOT_SERVING until a model is loaded, and keeps trying to
load the latest pushed version in the background (`load_until_ready`).
"""

from __future__ import annotations

import asyncio
import contextlib
from types import ModuleType
from typing import Any

from magnus.v1 import model_admin_pb2
from services.shared.db.engine import make_engine, make_session_factory
from services.shared.metrics import set_model_version
from services.shared.model_admin import ModelAdminServicer, load_until_ready
from services.shared.model_store import LoadedModel, ModelSlot, ModelStore
from services.shared.server import ServiceRunner
from services.shared.settings import ServiceSettings


class VersionedModelServer:
    """Subclasses call `super().__init__` and then `add_service`; `start()` returns the port."""

    def __init__(self, kind: str, settings: ServiceSettings, model_store_dir: Any) -> None:
        self.settings = settings
        self.engine = make_engine(settings.database_url)
        self.store = ModelStore(model_store_dir, make_session_factory(self.engine))
        self.slot = ModelSlot(kind)
        self.runner = ServiceRunner(kind, settings)
        self.runner.add(
            model_admin_pb2,
            "ModelAdminService",
            ModelAdminServicer(self.slot, self.store, on_loaded=self._on_loaded),
        )
        self._loader: asyncio.Task[LoadedModel] | None = None

    def add_service(self, pb2: ModuleType, service_name: str, servicer: object) -> None:
        self.runner.add(pb2, service_name, servicer)

    async def _on_loaded(self, loaded: LoadedModel) -> None:
        set_model_version(self.slot.kind, loaded.info.version)
        if not self.runner.is_shutting_down:
            await self.runner.set_serving(True)

    async def start_loading(self, *, retry_s: float, missing_hint: str, create_first=None) -> int:
        """Start the server, then load the model in the background. Returns the bound port."""
        port = await self.runner.start()
        self._loader = asyncio.create_task(
            load_until_ready(
                self.slot,
                self.store,
                retry_s=retry_s,
                on_loaded=self._on_loaded,
                create_first=create_first,
                missing_hint=missing_hint,
            ),
            name=f"{self.slot.kind}-loader",
        )
        return port

    async def stop(self, grace_s: float | None = None) -> None:
        if self._loader is not None:
            self._loader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loader
        await self.runner.stop(grace_s)
        await self.engine.dispose()

    async def serve_until_shutdown(self) -> None:
        await self.start()
        try:
            await self.runner.wait_for_shutdown()
        finally:
            await self.stop()

    async def start(self) -> int:  # pragma: no cover - every subclass defines it
        raise NotImplementedError
