"""The batcher as a real process: the worker API lives only on the internal port, so a forged worker
on the client port cannot register, pull or complete; on the internal port an API key is refused
too. A plain (unhashed) API key in the config stops the batcher at start."""

from __future__ import annotations

import subprocess

import grpc
import pytest

from magnus.v1 import generation_pb2, generation_pb2_grpc
from magnus.v1 import worker_queue_pb2 as wq
from magnus.v1 import worker_queue_pb2_grpc
from services.shared.auth import api_key_entry, bearer_metadata
from tools.stack import BATCHER_INTERNAL, Stack, free_port

pytestmark = pytest.mark.integration

SERVICE_TOKEN, API_KEY = "svc-token-int-5d0c", "acme-key-int-93b1"
SERVICE, CLIENT = bearer_metadata(SERVICE_TOKEN), bearer_metadata(API_KEY)
WORKER_CALLS = {
    "RegisterWorker": wq.RegisterWorkerRequest(worker_id="forged", kv_bytes_per_token=1, free_kv_bytes=1 << 30),
    "PullBatch": wq.PullBatchRequest(worker_id="forged", wait_s=0.01),
    "CompleteBatch": wq.CompleteBatchRequest(worker_id="forged", batch_id="b"),
    "CompleteBatches": wq.CompleteBatchesRequest(
        worker_id="forged", completions=[wq.CompleteBatchRequest(worker_id="forged", batch_id="b")]
    ),
    "Heartbeat": wq.HeartbeatRequest(worker_id="forged"),
    "StreamTokens": wq.StreamTokensRequest(worker_id="forged"),
}


def _batcher(tmp_path, api_keys: str) -> Stack:
    return Stack(
        workdir=tmp_path,
        database_url=f"sqlite+aiosqlite:///{tmp_path / 'log.db'}",
        extra_env={
            "MAGNUS_BATCHER_PREDICTOR_TARGET": f"127.0.0.1:{free_port()}",  # nothing listens: fallback
            "MAGNUS_BATCHER_PREDICTOR_DEADLINE_S": "0.3",
            "MAGNUS_AUTH_SERVICE_TOKEN": SERVICE_TOKEN,
            "MAGNUS_AUTH_API_KEYS": api_keys,
        },
    )


def _code(stub, name: str, request, metadata) -> grpc.StatusCode:
    try:
        getattr(stub, name)(request, metadata=metadata, timeout=5)
    except grpc.RpcError as error:
        return error.code()
    return grpc.StatusCode.OK


def test_a_forged_worker_on_the_client_port_reaches_nothing(tmp_path):
    stack = _batcher(tmp_path, api_key_entry("acme", API_KEY))
    stack.start("batcher")
    try:
        stack.wait_healthy(("batcher",), timeout_s=60)
        client_port, internal_port = stack.target("batcher"), stack.target(BATCHER_INTERNAL)
        with grpc.insecure_channel(client_port) as client, grpc.insecure_channel(internal_port) as internal:
            on_client_port = worker_queue_pb2_grpc.WorkerQueueServiceStub(client)
            on_internal_port = worker_queue_pb2_grpc.WorkerQueueServiceStub(internal)
            for name, request in WORKER_CALLS.items():
                for metadata in (SERVICE, CLIENT, None):  # not even with the service token
                    assert _code(on_client_port, name, request, metadata) == grpc.StatusCode.UNIMPLEMENTED, name
                assert _code(on_internal_port, name, request, CLIENT) == grpc.StatusCode.PERMISSION_DENIED, name
                assert _code(on_internal_port, name, request, None) == grpc.StatusCode.UNAUTHENTICATED, name
            assert _code(on_internal_port, "RegisterWorker", WORKER_CALLS["RegisterWorker"], SERVICE) == grpc.StatusCode.OK
            generate = generation_pb2.GenerateRequest(prompt=generation_pb2.Prompt(user_input="hi", max_new_tokens=1))
            public_on_internal = generation_pb2_grpc.GenerationServiceStub(internal)
            assert _code(public_on_internal, "Generate", generate, CLIENT) == grpc.StatusCode.UNIMPLEMENTED
        log = stack.log_path("batcher").read_text()
        assert f"internal API (magnus.v1.WorkerQueueService) listening on 127.0.0.1:{stack.ports[BATCHER_INTERNAL]}" in log
        assert SERVICE_TOKEN not in log and API_KEY not in log
    finally:
        stack.stop("batcher")


def test_a_plain_api_key_in_the_config_stops_the_batcher_at_start(tmp_path):
    stack = _batcher(tmp_path, f"{api_key_entry('acme', API_KEY)},{API_KEY}")
    stack.start("batcher")
    try:
        exit_code = stack.processes["batcher"].wait(60)
    except subprocess.TimeoutExpired:
        stack.stop("batcher")
        pytest.fail("the batcher started with a plain API key in MAGNUS_AUTH_API_KEYS")
    log = stack.log_path("batcher").read_text()
    assert exit_code != 0
    assert "MAGNUS_AUTH_API_KEYS entry 2 is not TENANT:sha256:HEX" in log
    assert "python -m services.shared.auth hash-key --tenant TENANT" in log
    assert API_KEY not in log, "the refused entry may be a real key: it is never echoed"
