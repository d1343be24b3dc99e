"""Who may call what: API keys (hashed, bound to tenants), the service credential, and no credential,
over real gRPC; the batcher's worker API only on its internal port."""

from __future__ import annotations

import logging

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from magnus.v1 import (
    generation_pb2,
    generation_pb2_grpc,
    model_admin_pb2,
    model_admin_pb2_grpc,
    trainer_pb2,
    trainer_pb2_grpc,
    worker_queue_pb2 as wq,
    worker_queue_pb2_grpc,
)
from services.batcher.config import BatcherSettings
from services.shared.auth import (
    INTERNAL_METHODS,
    AuthSettings,
    Authorizer,
    Caller,
    Role,
    api_key_entry,
    bearer_metadata,
    main,
    make_authorizer,
)
from services.shared.channels import open_channel
from services.shared.errors import InvalidArgument
from services.shared.server import ServiceRunner
from services.shared.settings import ServiceSettings
from services.shared.tls import TlsSettings
from tests.inprocess_batcher import inprocess_batcher

SERVICE_TOKEN = "svc-token-7f3a9c"
API_KEY = "client-key-51b2e0"
AUTH = AuthSettings(
    service_token=SERVICE_TOKEN, api_keys=f"{api_key_entry('other', 'other-key')}, {api_key_entry('acme', API_KEY)}"
)
CLIENT = bearer_metadata(API_KEY)
SERVICE = bearer_metadata(SERVICE_TOKEN)
WRONG = bearer_metadata("not-a-key")


def test_authorizer_roles_and_internal_methods():
    authorizer = Authorizer(AUTH)
    assert authorizer.role_of(SERVICE) is Role.SERVICE
    assert authorizer.role_of(CLIENT) is Role.CLIENT
    assert authorizer.identify(CLIENT) == Caller(Role.CLIENT, "acme"), "a key acts for its entry's tenant"
    assert authorizer.identify(bearer_metadata("other-key")) == Caller(Role.CLIENT, "other")
    assert authorizer.identify(SERVICE) == Caller(Role.SERVICE)
    digest_as_key = bearer_metadata(api_key_entry("acme", API_KEY).rsplit(":", 1)[1])
    assert authorizer.identify(digest_as_key) is None, "the configured digest is not itself a key"
    assert authorizer.role_of(WRONG) is None
    assert authorizer.role_of((("authorization", API_KEY),)) is None, "the Bearer scheme is required"
    assert authorizer.role_of(None) is None
    for method in INTERNAL_METHODS:
        assert authorizer.check(method, SERVICE) == Caller(Role.SERVICE)
        with pytest.raises(Exception) as denied:
            authorizer.check(method, CLIENT)
        assert denied.value.code == grpc.StatusCode.PERMISSION_DENIED
    assert authorizer.check("/magnus.v1.GenerationService/Generate", CLIENT) == Caller(Role.CLIENT, "acme")


def test_secrets_never_show_in_settings_reprs():
    text = f"{AUTH!r} {AUTH} {AUTH.model_dump()}"
    assert SERVICE_TOKEN not in text and API_KEY not in text


def test_auth_is_off_by_default():
    assert not AuthSettings().is_enabled
    assert make_authorizer(AuthSettings()) is None
    with pytest.raises(ValueError):
        Authorizer(AuthSettings(service_token="same", api_keys=api_key_entry("t", "same")))


@pytest.mark.parametrize(
    ("api_keys", "says"),
    [
        ("raw-client-key-123", "python -m services.shared.auth hash-key"),  # a plain key: refused, command shown
        ("acme:raw-client-key-123", "python -m services.shared.auth hash-key"),
        (f"{api_key_entry('a', 'k')},acme:sha256:abc", "entry 2 (tenant 'acme'): the sha256 digest must be 64 hex"),
        ("bad tenant:sha256:" + "0" * 64, "entry 1: tenant 'bad tenant' must be"),
        (":sha256:" + "0" * 64, "entry 1: tenant '' must be"),
        (f"{api_key_entry('a', 'k')},{api_key_entry('b', 'k')}", "same key is listed for tenants 'a' (entry 1) and 'b'"),
    ],
)
def test_malformed_api_key_entries_are_refused_at_start_without_quoting_them(api_keys, says):
    with pytest.raises(ValueError) as refused:
        make_authorizer(AuthSettings(service_token=SERVICE_TOKEN, api_keys=api_keys))
    assert says in str(refused.value)
    assert "raw-client-key-123" not in str(refused.value), "a mistaken plain entry may be a real key"


def test_api_keys_without_a_service_token_are_refused_rather_than_silently_ignored():
    with pytest.raises(ValueError, match="MAGNUS_AUTH_SERVICE_TOKEN is empty"):
        make_authorizer(AuthSettings(api_keys=api_key_entry("acme", API_KEY)))


def test_hash_key_command_prints_a_new_key_and_the_entry_that_admits_it(capsys):
    assert main(["hash-key", "--tenant", "acme"]) == 0
    lines = dict(line.split(": ", 1) for line in capsys.readouterr().out.splitlines())
    raw_key = lines["api key (give it to the client; the services never store it)"]
    entry = lines["MAGNUS_AUTH_API_KEYS entry"]
    assert len(raw_key) >= 40 and raw_key not in entry and entry.startswith("acme:sha256:")
    authorizer = Authorizer(AuthSettings(service_token=SERVICE_TOKEN, api_keys=entry))
    assert authorizer.identify(bearer_metadata(raw_key)) == Caller(Role.CLIENT, "acme")
    assert main(["hash-key", "--tenant", "acme", "--key", API_KEY]) == 0
    assert api_key_entry("acme", API_KEY) in capsys.readouterr().out


def _code(call) -> grpc.StatusCode:
    try:
        call()
    except grpc.RpcError as error:
        return error.code()
    return grpc.StatusCode.OK


INTERNAL_CALLS = {
    "RegisterWorker": wq.RegisterWorkerRequest(worker_id="w", kv_bytes_per_token=1, free_kv_bytes=1 << 30),
    "PullBatch": wq.PullBatchRequest(worker_id="w", wait_s=0.01),
    "CompleteBatch": wq.CompleteBatchRequest(worker_id="w", batch_id="b"),
    "CompleteBatches": wq.CompleteBatchesRequest(
        worker_id="w", completions=[wq.CompleteBatchRequest(worker_id="w", batch_id="b")]
    ),
    "ReportBatchFailure": wq.ReportBatchFailureRequest(worker_id="w", batch_id="b", kind=wq.FAILURE_KIND_OTHER),
    "Heartbeat": wq.HeartbeatRequest(worker_id="w"),
    "StreamTokens": wq.StreamTokensRequest(worker_id="w"),
}


@pytest.mark.asyncio
async def test_batcher_api_key_cannot_pull_batches_and_strangers_are_unauthenticated(caplog):
    caplog.set_level(logging.DEBUG)
    async with inprocess_batcher(BatcherSettings(port=0), auth=AUTH) as runner:
        target = f"127.0.0.1:{runner.port}"
        internal = f"127.0.0.1:{runner.internal_port}"

        def calls() -> dict:
            with grpc.insecure_channel(target) as channel, grpc.insecure_channel(internal) as internal_channel:
                queue = worker_queue_pb2_grpc.WorkerQueueServiceStub(internal_channel)
                queue_on_client_port = worker_queue_pb2_grpc.WorkerQueueServiceStub(channel)
                generation = generation_pb2_grpc.GenerationServiceStub(channel)
                bad_prompt = generation_pb2.GenerateRequest(prompt=generation_pb2.Prompt(max_new_tokens=0))
                good_prompt = generation_pb2.GenerateRequest(
                    prompt=generation_pb2.Prompt(user_input="hello there", max_new_tokens=2)
                )
                codes = {}
                for who, metadata in (("client", CLIENT), ("service", SERVICE), ("wrong", WRONG), ("none", None)):
                    for name, request in INTERNAL_CALLS.items():
                        rpc = getattr(queue, name)
                        codes[who, name] = _code(lambda: rpc(request, metadata=metadata, timeout=5))
                        rpc = getattr(queue_on_client_port, name)
                        codes[who, name, "client port"] = _code(lambda: rpc(request, metadata=metadata, timeout=5))
                    codes[who, "Generate(bad)"] = _code(lambda: generation.Generate(bad_prompt, metadata=metadata, timeout=5))
                    codes[who, "Generate"] = _code(lambda: generation.Generate(good_prompt, metadata=metadata, timeout=5))
                health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
                codes["health"] = health.status
                return codes

        import asyncio

        codes = await asyncio.to_thread(calls)
    for name in INTERNAL_CALLS:
        for who in ("client", "service", "wrong", "none"):
            assert codes[who, name, "client port"] == grpc.StatusCode.UNIMPLEMENTED, (who, name)
        assert codes["client", name] == grpc.StatusCode.PERMISSION_DENIED, name
        assert codes["wrong", name] == grpc.StatusCode.UNAUTHENTICATED, name
        assert codes["none", name] == grpc.StatusCode.UNAUTHENTICATED, name
        assert codes["service", name] not in (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED), name
    assert codes["service", "RegisterWorker"] == grpc.StatusCode.OK
    assert codes["client", "Generate"] == grpc.StatusCode.OK, "an API key may generate"
    assert codes["client", "Generate(bad)"] == grpc.StatusCode.INVALID_ARGUMENT, "authorized, then validated"
    assert codes["none", "Generate"] == grpc.StatusCode.UNAUTHENTICATED
    assert codes["wrong", "Generate(bad)"] == grpc.StatusCode.UNAUTHENTICATED, "strangers learn nothing about the request"
    assert codes["health"] == health_pb2.HealthCheckResponse.SERVING, "probes need no secret"
    assert SERVICE_TOKEN not in caplog.text and API_KEY not in caplog.text


class _ModelAdmin:
    async def LoadModel(self, request, context):
        return model_admin_pb2.LoadModelResponse()

    async def GetModelInfo(self, request, context):
        return model_admin_pb2.GetModelInfoResponse()


class _Trainer:
    async def Retrain(self, request, context):
        return trainer_pb2.RetrainResponse()

    async def GetStatus(self, request, context):
        raise InvalidArgument("x", "reached the servicer")


@pytest.mark.asyncio
async def test_api_key_cannot_push_a_model_or_retrain_and_the_service_channel_can():
    runner = ServiceRunner("admin", ServiceSettings(port=0), auth=AUTH, tls=TlsSettings())
    runner.add(model_admin_pb2, "ModelAdminService", _ModelAdmin())
    runner.add(trainer_pb2, "TrainerService", _Trainer())
    await runner.start()
    target = f"127.0.0.1:{runner.port}"
    try:
        async with grpc.aio.insecure_channel(target) as channel:
            admin = model_admin_pb2_grpc.ModelAdminServiceStub(channel)
            trainer = trainer_pb2_grpc.TrainerServiceStub(channel)
            for call in (
                admin.LoadModel(model_admin_pb2.LoadModelRequest(), metadata=CLIENT, timeout=5),
                trainer.Retrain(trainer_pb2.RetrainRequest(), metadata=CLIENT, timeout=5),
            ):
                with pytest.raises(grpc.aio.AioRpcError) as denied:
                    await call
                assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
            await admin.GetModelInfo(model_admin_pb2.GetModelInfoRequest(), metadata=CLIENT, timeout=5)  # read-only
            with pytest.raises(grpc.aio.AioRpcError) as reached:
                await trainer.GetStatus(trainer_pb2.GetStatusRequest(), metadata=CLIENT, timeout=5)
            assert reached.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        # open_channel, as the trainer and workers use it, sends the service credential by itself
        async with open_channel(target, auth=AUTH, tls=TlsSettings()) as channel:
            await model_admin_pb2_grpc.ModelAdminServiceStub(channel).LoadModel(model_admin_pb2.LoadModelRequest(), timeout=5)
            await trainer_pb2_grpc.TrainerServiceStub(channel).Retrain(trainer_pb2.RetrainRequest(), timeout=5)
    finally:
        await runner.stop(0)
