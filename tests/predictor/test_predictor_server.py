"""One predictor replica in-process on port 0, real gRPC over a socket, temp SQLite log DB."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import grpc
import pytest
import pytest_asyncio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from magnus.v1 import model_admin_pb2, model_admin_pb2_grpc, predictor_pb2, predictor_pb2_grpc
from services.predictor.config import PredictorSettings
from services.predictor.server import PredictorServer
from services.shared.tokenizer import get_token_counter, join_prompt

pytestmark = pytest.mark.asyncio

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class Replica:
    def __init__(self, server: PredictorServer, port: int) -> None:
        self.server = server
        self.channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        self.predictor = predictor_pb2_grpc.PredictorServiceStub(self.channel)
        self.admin = model_admin_pb2_grpc.ModelAdminServiceStub(self.channel)
        self.health = health_pb2_grpc.HealthStub(self.channel)

    async def health_status(self) -> int:
        response = await self.health.Check(health_pb2.HealthCheckRequest(service=""))
        return response.status

    async def wait_for(self, status: int, timeout_s: float = 5.0) -> None:
        deadline_s = asyncio.get_running_loop().time() + timeout_s
        while await self.health_status() != status:
            if asyncio.get_running_loop().time() > deadline_s:
                raise AssertionError(f"health never became {status}")
            await asyncio.sleep(0.02)


@pytest_asyncio.fixture
async def start_replica(db_url: str, store_dir: Path) -> AsyncIterator[Callable[..., object]]:
    replicas: list[Replica] = []

    async def start(**overrides) -> Replica:
        settings = PredictorSettings(
            port=0, database_url=db_url, model_store_dir=store_dir, load_retry_s=0.05, **overrides
        )
        server = PredictorServer(settings)
        replica = Replica(server, await server.start())
        replicas.append(replica)
        return replica

    yield start
    for replica in replicas:
        await replica.channel.close()
        await replica.server.stop(grace_s=0)


def query(user_input: str = "hello world", instruction: str = "A", input_tokens: int = 0):
    return predictor_pb2.LengthQuery(instruction=instruction, user_input=user_input, input_tokens=input_tokens)


async def test_predict_lengths_returns_predictions_and_model_version(start_replica, make_model, save_model) -> None:
    await save_model(make_model(slope=2.0))
    replica = await start_replica()
    await replica.wait_for(SERVING)
    prompt_tokens = get_token_counter().count(join_prompt("A", "hello world"))
    response = await replica.predictor.PredictLengths(
        predictor_pb2.PredictLengthsRequest(queries=[query(input_tokens=100), query()])
    )
    assert response.model_version == 1
    assert list(response.input_tokens) == [100, prompt_tokens]
    assert list(response.predicted_tokens) == [205, 5 + 2 * prompt_tokens]
    # a model without a spread reports its prediction as the upper estimate
    assert list(response.predicted_tokens_upper) == list(response.predicted_tokens)
    # ... and no calibrated quantiles: the fields are empty, not made up
    assert list(response.quantiles) == [] and list(response.is_out_of_distribution) == []


async def test_predict_lengths_returns_calibrated_quantiles_and_ood_flags(
    start_replica, save_model, fake_static_cache
) -> None:
    from services.core.embedding_forest import SERVED_MODEL
    from services.core.length_model import LengthSample, make_length_model

    model = make_length_model(SERVED_MODEL, num_trees=20)
    model.fit([LengthSample(i, f"text {n} " * (n % 5 + 1), n, n * (2 if i == "A" else 1) + n % 7)
               for i in ("A", "B") for n in range(10, 250)])
    await save_model(model)
    replica = await start_replica(quantile_levels=(0.9, 0.99))
    await replica.wait_for(SERVING)
    response = await replica.predictor.PredictLengths(
        predictor_pb2.PredictLengthsRequest(queries=[query("text 50 ", "A", 50), query("text 50 ", "unseen", 50)])
    )
    assert [q.level for q in response.quantiles] == [0.9, 0.99]
    p90, p99 = (list(q.tokens) for q in response.quantiles)
    assert all(point <= a <= b for point, a, b in zip(response.predicted_tokens, p90, p99, strict=True))
    assert list(response.is_out_of_distribution) == [False, True]
    assert len(response.uncertainty) == 2 and response.ood_score[1] > 1.0


@pytest.mark.parametrize(
    ("queries", "field"),
    [
        ([], "queries"),
        ([query(), query(user_input="")], "queries[1].user_input"),
        ([query(input_tokens=-1)], "queries[0].input_tokens"),
        ([query(instruction="i" * 5000)], "queries[0].instruction"),
        ([query()] * 5, "queries"),
    ],
)
async def test_malformed_requests_are_invalid_argument_naming_the_field(
    start_replica, make_model, save_model, queries, field
) -> None:
    await save_model(make_model())
    replica = await start_replica(max_batch=4)
    await replica.wait_for(SERVING)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await replica.predictor.PredictLengths(predictor_pb2.PredictLengthsRequest(queries=queries))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.details().startswith(f"{field}:")


async def test_no_model_means_not_serving_until_one_is_stored(start_replica, make_model, save_model, caplog) -> None:
    caplog.set_level(logging.WARNING)
    replica = await start_replica()
    await asyncio.sleep(0.3)  # several retry periods
    assert await replica.health_status() == NOT_SERVING
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await replica.predictor.PredictLengths(predictor_pb2.PredictLengthsRequest(queries=[query()]))
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    warnings = [r for r in caplog.records if "NOT_SERVING" in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].exc_info is None
    await save_model(make_model())
    await replica.wait_for(SERVING)


@pytest.mark.parametrize("damage", ["missing", "corrupt"])
async def test_missing_or_corrupt_artifact_means_not_serving(start_replica, make_model, save_model, damage) -> None:
    info = await save_model(make_model())
    path = Path(info.artifact_uri)
    if damage == "missing":
        path.unlink()
    else:
        path.write_bytes(path.read_bytes()[:100])
    replica = await start_replica()
    await asyncio.sleep(0.2)
    assert await replica.health_status() == NOT_SERVING
    assert replica.server.slot.current is None


async def test_load_model_swaps_while_concurrent_predictions_succeed(start_replica, make_model, save_model) -> None:
    await save_model(make_model(slope=2.0))
    await save_model(make_model(slope=3.0))  # v2: latest, so the replica starts on it
    replica = await start_replica()
    await replica.wait_for(SERVING)
    await replica.admin.LoadModel(model_admin_pb2.LoadModelRequest(version=1))

    async def predict() -> tuple[int, int]:
        response = await replica.predictor.PredictLengths(
            predictor_pb2.PredictLengthsRequest(queries=[query(input_tokens=100)] * 8)
        )
        assert len(set(response.predicted_tokens)) == 1  # one model per call, never mixed
        return response.model_version, response.predicted_tokens[0]

    async def swap_back_and_forth() -> None:
        for version in (2, 1, 2):
            loaded = await replica.admin.LoadModel(model_admin_pb2.LoadModelRequest(version=version))
            assert loaded.model.version == version
            await asyncio.sleep(0.01)

    results = await asyncio.gather(*[predict() for _ in range(150)], swap_back_and_forth())
    seen = set(results[:-1])
    assert seen <= {(1, 205), (2, 305)}
    info = await replica.admin.GetModelInfo(model_admin_pb2.GetModelInfoRequest())
    assert info.model.version == 2
    assert info.model.model_name == "per_app_linear"
    assert info.model.kind == "predictor"


async def test_load_model_errors_keep_the_old_model(start_replica, make_model, save_model) -> None:
    await save_model(make_model())
    corrupt = await save_model(make_model(slope=3.0), is_pushed=False)
    Path(corrupt.artifact_uri).write_bytes(b"not a joblib file")
    replica = await start_replica()
    await replica.wait_for(SERVING)
    assert replica.server.slot.current.info.version == 1  # v2 is not pushed: start-up skips it
    cases = [(-1, grpc.StatusCode.INVALID_ARGUMENT), (99, grpc.StatusCode.NOT_FOUND), (2, grpc.StatusCode.FAILED_PRECONDITION)]
    for version, code in cases:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await replica.admin.LoadModel(model_admin_pb2.LoadModelRequest(version=version))
        assert caught.value.code() == code
    info = await replica.admin.GetModelInfo(model_admin_pb2.GetModelInfoRequest())
    assert info.model.version == 1
    assert await replica.health_status() == SERVING


async def test_serves_the_static_embedding_forest(start_replica, store, fake_static_cache) -> None:
    from services.core.embedding_forest import SERVED_MODEL
    from services.core.length_model import LengthSample, make_length_model

    model = make_length_model(SERVED_MODEL, num_trees=10)
    model.fit([LengthSample("A", f"text {i} " * i, 3 * i, 2 * i) for i in range(1, 60)])
    await store.save("predictor", model, model_name=model.name, num_train_samples=59, is_pushed=True)
    replica = await start_replica()
    await replica.wait_for(SERVING)
    response = await replica.predictor.PredictLengths(
        predictor_pb2.PredictLengthsRequest(queries=[query("text 30 " * 30, input_tokens=90), query("hi"), query("x", "B")])
    )
    assert response.model_version == 1
    assert 40 <= response.predicted_tokens[0] <= 80
    assert all(tokens >= 1 for tokens in response.predicted_tokens)
    assert len(response.predicted_tokens_upper) == 3
    assert all(u >= p for u, p in zip(response.predicted_tokens_upper, response.predicted_tokens, strict=True))
    info = await replica.admin.GetModelInfo(model_admin_pb2.GetModelInfoRequest())
    assert info.model.model_name == SERVED_MODEL
