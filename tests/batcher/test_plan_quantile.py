"""MAGNUS_BATCHER_PLAN_QUANTILE: the predictor client reads the calibrated quantile it names and
requests are planned with it; unset, or absent from the response, the point prediction is used."""

from __future__ import annotations

import grpc
import pytest

from magnus.v1 import predictor_pb2, predictor_pb2_grpc
from services.batcher.config import BatcherSettings
from services.batcher.domain import Prediction
from services.batcher.predictor_client import PredictionCoalescer, plan_quantile_tokens




def response(with_quantiles: bool) -> predictor_pb2.PredictLengthsResponse:
    return predictor_pb2.PredictLengthsResponse(
        predicted_tokens=[10], input_tokens=[4], model_version=3, predicted_tokens_upper=[12],
        quantiles=[predictor_pb2.LengthQuantile(level=0.5, tokens=[10]), predictor_pb2.LengthQuantile(level=0.9, tokens=[30])]
        if with_quantiles else [],
    )


def test_plan_quantile_tokens_picks_the_named_level_or_none() -> None:
    assert plan_quantile_tokens(response(True), 0.9) == [30]
    assert plan_quantile_tokens(response(True), None) is None
    assert plan_quantile_tokens(response(True), 0.95) is None  # a level the predictor does not serve
    assert plan_quantile_tokens(response(False), 0.9) is None  # an older predictor


def test_planning_tokens_is_the_quantile_when_there_is_one() -> None:
    assert Prediction(4, 10, 1, False, 12).planning_tokens == 10
    assert Prediction(4, 10, 1, False, 12, 30).planning_tokens == 30


def test_setting_is_unset_by_default_and_validated() -> None:
    assert BatcherSettings().plan_quantile is None
    assert BatcherSettings(plan_quantile=0.9).plan_quantile == 0.9
    with pytest.raises(ValueError):
        BatcherSettings(plan_quantile=1.5)


class FakePredictor(predictor_pb2_grpc.PredictorServiceServicer):
    def __init__(self, with_quantiles: bool) -> None:
        self.with_quantiles = with_quantiles

    async def PredictLengths(self, request, context):
        return response(self.with_quantiles)


@pytest.mark.asyncio
@pytest.mark.parametrize(("plan_quantile", "with_quantiles", "planned"), [(0.9, True, 30), (None, True, 10), (0.9, False, 10)])
async def test_coalescer_plans_at_the_quantile_over_grpc(plan_quantile, with_quantiles, planned) -> None:
    server = grpc.aio.server()
    predictor_pb2_grpc.add_PredictorServiceServicer_to_server(FakePredictor(with_quantiles), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            coalescer = PredictionCoalescer(channel, window_s=0.0, max_batch=8, deadline_s=5.0, plan_quantile=plan_quantile)
            prediction = await coalescer.predict("A", "hello", 4, 100)
            await coalescer.close()
    finally:
        await server.stop(0)
    assert prediction.predicted_tokens == 10 and not prediction.is_fallback  # the point stays what is logged
    assert prediction.planning_tokens == planned
