"""One estimator replica in-process on port 0, real gRPC, temp SQLite log DB."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
import pytest_asyncio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from magnus.v1 import estimator_pb2, estimator_pb2_grpc, model_admin_pb2, model_admin_pb2_grpc
from services.estimator import bootstrap
from services.estimator.config import EstimatorSettings
from services.estimator.server import EstimatorServer

pytestmark = pytest.mark.asyncio

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@pytest_asyncio.fixture
async def replica(db_url: str, store_dir: Path) -> AsyncIterator[tuple[EstimatorServer, grpc.aio.Channel]]:
    settings = EstimatorSettings(port=0, database_url=db_url, model_store_dir=store_dir, load_retry_s=0.05)
    server = EstimatorServer(settings)
    port = await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    yield server, channel
    await channel.close()
    await server.stop(grace_s=0)


async def health(channel: grpc.aio.Channel) -> int:
    return (await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())).status


async def wait_serving(channel: grpc.aio.Channel, timeout_s: float = 5.0) -> None:
    for _ in range(int(timeout_s / 0.02)):
        if await health(channel) == SERVING:
            return
        await asyncio.sleep(0.02)
    raise AssertionError("estimator never became SERVING")


def shape(b: int, l: int, g: int) -> estimator_pb2.BatchShape:
    return estimator_pb2.BatchShape(batch_size=b, input_tokens_max=l, gen_tokens_max=g)


async def test_fits_v1_from_calibration_samples_and_answers(replica, add_calibration, duration_s) -> None:
    server, channel = replica
    await asyncio.sleep(0.15)
    assert await health(channel) == NOT_SERVING  # nothing to fit from yet
    await add_calibration(source="log")
    await asyncio.sleep(0.15)
    assert await health(channel) == NOT_SERVING  # only calibration samples count for v1
    await add_calibration()
    await wait_serving(channel)
    stub = estimator_pb2_grpc.EstimatorServiceStub(channel)
    response = await stub.EstimateBatchTime(
        estimator_pb2.EstimateBatchTimeRequest(shapes=[shape(4, 256, 128), shape(2, 100, 50)])
    )
    assert response.model_version == 1
    assert response.estimated_s[0] == pytest.approx(duration_s(4, 256, 128))
    assert 0 < response.estimated_s[1] < response.estimated_s[0]
    info = await model_admin_pb2_grpc.ModelAdminServiceStub(channel).GetModelInfo(model_admin_pb2.GetModelInfoRequest())
    assert (info.model.kind, info.model.version, info.model.model_name) == ("estimator", 1, "knn")
    assert info.model.num_train_samples == 27


async def test_bad_shapes_are_invalid_argument(replica, add_calibration) -> None:
    _, channel = replica
    await add_calibration()
    await wait_serving(channel)
    stub = estimator_pb2_grpc.EstimatorServiceStub(channel)
    for shapes, field in [([], "shapes"), ([shape(1, 1, 1), shape(1, 1, 0)], "shapes[1].gen_tokens_max")]:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.EstimateBatchTime(estimator_pb2.EstimateBatchTimeRequest(shapes=shapes))
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert caught.value.details().startswith(f"{field}:")


async def test_bootstrap_cli_fits_from_samples(db_url, store_dir, store, add_calibration, capsys) -> None:
    argv = ["--database-url", db_url, "--model-store-dir", str(store_dir)]
    assert await bootstrap.run(bootstrap.parse_args(argv)) == 1
    assert "no calibration samples" in capsys.readouterr().err
    await add_calibration()
    assert await bootstrap.run(bootstrap.parse_args(argv)) == 0
    assert await bootstrap.run(bootstrap.parse_args([*argv, "--if-missing"])) == 0
    assert "nothing to do" in capsys.readouterr().out
    loaded = await store.load("estimator", only_pushed=True)
    assert loaded.info.version == 1
    assert loaded.info.metrics["cv_mae_s"] is not None
    assert len(loaded.model.samples) == 27
