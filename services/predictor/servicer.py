"""PredictorService: proto -> LengthQuery -> model (on a worker thread) -> proto."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from magnus.v1 import predictor_pb2
from services.predictor.config import PredictorSettings
from services.predictor.predict import LengthPredictions, LengthQuery, predict_lengths, validate_queries
from services.shared.model_store import ModelSlot
from services.shared.tokenizer import TokenCounter, get_token_counter


class PredictorServicer:
    def __init__(
        self,
        slot: ModelSlot,
        settings: PredictorSettings,
        counter_factory: Callable[[], TokenCounter] = get_token_counter,
    ) -> None:
        self.slot = slot
        self.settings = settings
        self.counter_factory = counter_factory

    async def PredictLengths(self, request, context) -> predictor_pb2.PredictLengthsResponse:
        queries = [
            LengthQuery(q.instruction, q.user_input, q.input_tokens) for q in request.queries
        ]
        validate_queries(queries, self.settings)
        # Grab the model once: a LoadModel swap during this call must not mix two versions.
        loaded = self.slot.require()
        result = await asyncio.to_thread(self._predict, loaded.model, queries)
        return predictor_pb2.PredictLengthsResponse(
            predicted_tokens=result.predicted_tokens,
            input_tokens=result.input_tokens,
            model_version=loaded.info.version,
            predicted_tokens_upper=result.upper_tokens,
            quantiles=[
                predictor_pb2.LengthQuantile(level=level, tokens=tokens) for level, tokens in result.quantiles.items()
            ],
            uncertainty=result.uncertainty,
            ood_score=result.ood_score,
            is_out_of_distribution=result.is_ood,
        )

    def _predict(self, model, queries: list[LengthQuery]) -> LengthPredictions:
        # The counter is built lazily on first use (loading a vocabulary), so off the loop too.
        return predict_lengths(
            model, queries, self.counter_factory(), self.settings.upper_quantile, self.settings.quantile_levels
        )
