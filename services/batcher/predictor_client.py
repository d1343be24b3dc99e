"""Length predictions for admitted requests: many concurrent requests, one PredictLengths RPC.

When the predictor is down, slow or not serving, requests are not held up: they get the
input-length fallback (generation length ~ input length, which holds for the paper's
translation-like tasks) and are marked, and the next coalesced call tries the predictor again.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

import grpc

from magnus.v1 import predictor_pb2, predictor_pb2_grpc
from services.batcher.domain import Prediction

log = logging.getLogger(__name__)


def fallback_prediction(input_tokens: int, max_new_tokens: int) -> Prediction:
    """Input-length heuristic: predict as many tokens out as came in (at least 1), as a predictor would
    without knowing the cap; the policy decides the planned length (Policy.planned_gen_tokens clamps
    it to max_new_tokens). `max_new_tokens` is kept for the callers' signature; it does not change
    the prediction."""
    return Prediction(input_tokens, max(1, input_tokens), 0, True)


def plan_quantile_tokens(response: predictor_pb2.PredictLengthsResponse, level: float | None) -> list[int] | None:
    """The response's calibrated quantile at `level`, tokens per query; None when no level is asked
    for or the predictor did not give it (an older predictor, a model without calibration)."""
    if level is None:
        return None
    for quantile in response.quantiles:
        if abs(quantile.level - level) < 1e-6 and len(quantile.tokens) == len(response.predicted_tokens):
            return list(quantile.tokens)
    return None


@dataclass
class _Query:
    instruction: str
    user_input: str
    input_tokens: int
    max_new_tokens: int
    future: asyncio.Future[Prediction]


class PredictionCoalescer:
    """Collects queries for up to `window_s` (or `max_batch` queries) and predicts them at once."""

    def __init__(
        self,
        channel: grpc.aio.Channel,
        *,
        window_s: float,
        max_batch: int,
        deadline_s: float,
        plan_quantile: float | None = None,
    ) -> None:
        self._plan_quantile = plan_quantile  # level whose calibrated quantile requests are planned at
        self._stub = predictor_pb2_grpc.PredictorServiceStub(channel)
        self._window_s = window_s
        self._max_batch = max_batch
        self._deadline_s = deadline_s
        self._queries: list[_Query] = []
        self._flush_handle: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.is_predictor_up = True

    async def predict(self, instruction: str, user_input: str, input_tokens: int, max_new_tokens: int) -> Prediction:
        future: asyncio.Future[Prediction] = asyncio.get_running_loop().create_future()
        self._queries.append(_Query(instruction, user_input, input_tokens, max_new_tokens, future))
        if len(self._queries) >= self._max_batch:
            self._flush()
        elif self._flush_handle is None:
            self._flush_handle = asyncio.get_running_loop().call_later(self._window_s, self._flush)
        return await future

    def _flush(self) -> None:
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        queries, self._queries = self._queries, []
        if queries:
            task = asyncio.create_task(self._call(queries))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _call(self, queries: list[_Query]) -> None:
        request = predictor_pb2.PredictLengthsRequest(
            queries=[
                predictor_pb2.LengthQuery(instruction=q.instruction, user_input=q.user_input, input_tokens=q.input_tokens)
                for q in queries
            ]
        )
        try:
            response = await self._stub.PredictLengths(request, timeout=self._deadline_s)
            # a predictor older than the upper field sends none: plan with the point prediction
            uppers = list(response.predicted_tokens_upper) or [None] * len(queries)
            quantiles = plan_quantile_tokens(response, self._plan_quantile) or [None] * len(queries)
            predictions = [
                Prediction(q.input_tokens, max(1, int(tokens)), response.model_version, False,
                           None if upper is None else max(1, int(upper)),
                           None if quantile is None else max(1, int(quantile)))
                for q, tokens, upper, quantile in zip(queries, response.predicted_tokens, uppers, quantiles, strict=True)
            ]
            if not self.is_predictor_up:
                log.info("predictor is back (model version %d)", response.model_version)
            self.is_predictor_up = True
        except (grpc.aio.AioRpcError, ValueError) as error:
            if self.is_predictor_up:
                detail = error.code().name if isinstance(error, grpc.aio.AioRpcError) else str(error)
                log.warning("predictor unavailable (%s); using the input-length fallback", detail)
            self.is_predictor_up = False
            predictions = [fallback_prediction(q.input_tokens, q.max_new_tokens) for q in queries]
        for query, prediction in zip(queries, predictions, strict=True):
            if not query.future.done():
                query.future.set_result(prediction)

    async def close(self) -> None:
        self._flush()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
