"""The trainer process in-process on port 0: scheduled rounds, Retrain/GetStatus RPCs, the CLI."""

from __future__ import annotations

import asyncio
import json

import grpc
import pytest

from magnus.v1 import trainer_pb2, trainer_pb2_grpc
from services.core.length_model import LengthSample
from services.core.per_app_linear import PerAppLinearModel
from services.trainer import cli
from services.trainer.config import TrainerSettings
from services.trainer.server import TrainerServer

pytestmark = pytest.mark.asyncio


async def test_scheduled_round_then_retrain_and_status_over_grpc(db_url, store_dir, store, add_requests, capsys) -> None:
    model = PerAppLinearModel()
    model.fit([LengthSample("A", "base", x, 5 + 2 * x) for x in range(10, 110, 5)])
    await store.save("predictor", model, model_name=model.name, num_train_samples=20, is_pushed=True)
    await add_requests([(x, 5 + 2 * x, 5 + 3 * x) for x in range(20, 220, 4)])
    settings = TrainerSettings(
        port=0, database_url=db_url, model_store_dir=store_dir, predictor_period_s=0.2, estimator_period_s=0.2
    )
    server = TrainerServer(settings)
    port = await server.start()
    try:
        for _ in range(100):  # the scheduled predictor round runs after one period
            if "predictor" in server.trainer.last_rounds:
                break
            await asyncio.sleep(0.05)
        assert server.trainer.last_rounds["predictor"].new_version == 2
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = trainer_pb2_grpc.TrainerServiceStub(channel)
            status = await stub.GetStatus(trainer_pb2.GetStatusRequest())
            assert [(m.kind, m.version) for m in status.latest_models] == [("predictor", 2)]
            assert json.loads(status.latest_models[0].metrics_json)["num_samples_added"] == 40
            assert status.last_rounds[0].kind == "predictor" and status.last_rounds[0].new_version == 2
            response = await stub.Retrain(trainer_pb2.RetrainRequest())
            assert [(r.kind, r.new_version, r.note) for r in response.rounds] == [
                ("predictor", 0, "no new log rows"),
                ("estimator", 0, "no new log rows"),
            ]
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.Retrain(trainer_pb2.RetrainRequest(kind=7))
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert caught.value.details().startswith("kind:")
        capsys.readouterr()
        assert await cli.run(cli.parse_args(["status", "--target", f"127.0.0.1:{port}"])) == 0
        assert "predictor latest v2 (per_app_linear, 60 samples)" in capsys.readouterr().out
        assert await cli.run(cli.parse_args(["retrain", "--kind", "predictor", "--target", f"127.0.0.1:{port}"])) == 0
        assert "no new version" in capsys.readouterr().out
    finally:
        await server.stop(grace_s=0)

