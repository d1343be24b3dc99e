"""Trainer wiring: DB + model store, TrainerService, health, and the periodic rounds.

Rounds run on their own schedule per kind (predictor every `predictor_period_s`, estimator
every `estimator_period_s`); a Retrain call runs one at once. A failing round is logged and the
schedule goes on: the trainer must never take serving down with it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from magnus.v1 import trainer_pb2
from services.shared.db.engine import make_engine, make_session_factory
from services.shared.db.models import ModelKind
from services.shared.model_store import ModelStore
from services.shared.server import ServiceRunner
from services.trainer.config import TrainerSettings
from services.trainer.rounds import Trainer
from services.trainer.servicer import TrainerServicer

log = logging.getLogger(__name__)


async def run_periodically(trainer: Trainer, kind: str, period_s: float) -> None:
    """Run a round of `kind` every `period_s` seconds (the first one after one period)."""
    while True:
        await asyncio.sleep(period_s)
        try:
            await trainer.run_round(kind)
        except Exception:  # noqa: BLE001 - logged with its traceback; the next round may work
            log.exception("%s round failed", kind)


class TrainerServer:
    """The trainer process. `start()` returns the bound port; `stop()` shuts it down."""

    def __init__(self, settings: TrainerSettings) -> None:
        self.settings = settings
        self.engine = make_engine(settings.database_url)
        self.store = ModelStore(settings.model_store_dir, make_session_factory(self.engine))
        self.trainer = Trainer(settings, self.store)
        self.runner = ServiceRunner("trainer", settings)
        self.runner.add(trainer_pb2, "TrainerService", TrainerServicer(self.trainer))
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> int:
        await self.trainer.load_last_rounds()
        port = await self.runner.start()
        if self.settings.is_schedule_enabled:
            periods_s = {
                ModelKind.PREDICTOR: self.settings.predictor_period_s,
                ModelKind.ESTIMATOR: self.settings.estimator_period_s,
            }
            self._tasks = [
                asyncio.create_task(run_periodically(self.trainer, kind, period_s), name=f"trainer-{kind}")
                for kind, period_s in periods_s.items()
            ]
        await self.runner.set_serving(True)
        return port

    async def stop(self, grace_s: float | None = None) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self.runner.stop(grace_s)
        await self.engine.dispose()


async def serve(settings: TrainerSettings) -> None:
    server = TrainerServer(settings)
    await server.start()
    try:
        await server.runner.wait_for_shutdown()
    finally:
        await server.stop()
