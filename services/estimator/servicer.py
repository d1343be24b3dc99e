"""EstimatorService: proto -> BatchShape -> KNN (on a worker thread) -> proto."""

from __future__ import annotations

import asyncio

from magnus.v1 import estimator_pb2
from services.estimator.config import EstimatorSettings
from services.estimator.estimate import validate_shapes
from services.core.knn_model import BatchShape
from services.shared.model_store import ModelSlot


class EstimatorServicer:
    def __init__(self, slot: ModelSlot, settings: EstimatorSettings) -> None:
        self.slot = slot
        self.settings = settings

    async def EstimateBatchTime(self, request, context) -> estimator_pb2.EstimateBatchTimeResponse:
        shapes = [BatchShape(s.batch_size, s.input_tokens_max, s.gen_tokens_max) for s in request.shapes]
        validate_shapes(shapes, self.settings)
        # Grab the model once: a LoadModel swap during this call must not mix two versions.
        loaded = self.slot.require()
        estimated_s = await asyncio.to_thread(loaded.model.predict, shapes)
        return estimator_pb2.EstimateBatchTimeResponse(
            estimated_s=[float(s) for s in estimated_s], model_version=loaded.info.version
        )
