"""Keeps the estimates of queued batches fresh: one EstimateBatchTime call for all stale batches.

Runs as its own task so the scheduler never awaits the estimator; HRRN uses the cached estimate
(or the fallback guess) in the meantime, and a down estimator only costs estimate quality.
"""

from __future__ import annotations

import asyncio
import logging

import grpc

from magnus.v1 import estimator_pb2, estimator_pb2_grpc
from services.batcher.scheduler import Scheduler

log = logging.getLogger(__name__)


class EstimateRefresher:
    def __init__(self, scheduler: Scheduler, channel: grpc.aio.Channel, *, deadline_s: float, idle_s: float) -> None:
        self._scheduler = scheduler
        self._stub = estimator_pb2_grpc.EstimatorServiceStub(channel)
        self._deadline_s = deadline_s
        self._idle_s = idle_s
        self._wake = asyncio.Event()
        self.is_estimator_up = True
        scheduler.on_change = self._wake.set

    async def run(self) -> None:
        while True:
            try:
                await asyncio.wait_for(self._wake.wait(), timeout=self._idle_s)
            except TimeoutError:
                pass
            self._wake.clear()
            stale = self._scheduler.stale_estimates()
            if stale:
                await self._refresh(stale)

    async def _refresh(self, stale: list[tuple[str, int, tuple[int, int, int]]]) -> None:
        request = estimator_pb2.EstimateBatchTimeRequest(
            shapes=[
                estimator_pb2.BatchShape(batch_size=size, input_tokens_max=max(1, l), gen_tokens_max=max(1, g))
                for _, _, (size, l, g) in stale
            ]
        )
        try:
            response = await self._stub.EstimateBatchTime(request, timeout=self._deadline_s)
        except grpc.aio.AioRpcError as error:
            if self.is_estimator_up:
                log.warning("estimator unavailable (%s); HRRN uses cached or fallback estimates", error.code().name)
            self.is_estimator_up = False
            await asyncio.sleep(self._idle_s)  # do not hammer a down service
            return
        if not self.is_estimator_up:
            log.info("estimator is back (model version %d)", response.model_version)
        self.is_estimator_up = True
        for (batch_id, revision, _), estimated_s in zip(stale, response.estimated_s, strict=True):
            self._scheduler.set_estimate(batch_id, revision, float(estimated_s), response.model_version)
