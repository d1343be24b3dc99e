"""TLS-only servers refuse plaintext; mutual TLS refuses clients without a certificate."""

from __future__ import annotations

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from magnus.v1 import worker_queue_pb2 as wq
from magnus.v1 import worker_queue_pb2_grpc
from services.batcher.config import BatcherSettings
from services.shared.auth import AuthSettings, api_key_entry
from services.shared.channels import open_channel
from services.shared.tls import TlsSettings
from tests.inprocess_batcher import inprocess_batcher
from tests.security.certs import make_certs


async def _health(channel: grpc.aio.Channel) -> grpc.StatusCode:
    try:
        await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=3)
    except grpc.aio.AioRpcError as error:
        return error.code()
    return grpc.StatusCode.OK


@pytest.mark.asyncio
async def test_tls_server_rejects_plaintext_and_serves_tls(tmp_path):
    certs = make_certs(tmp_path)
    server_tls = TlsSettings(cert_file=certs.server_cert, key_file=certs.server_key)
    async with inprocess_batcher(BatcherSettings(port=0), tls=server_tls) as runner:
        target = f"127.0.0.1:{runner.port}"
        async with grpc.aio.insecure_channel(target) as plaintext:
            assert await _health(plaintext) == grpc.StatusCode.UNAVAILABLE
        async with open_channel(target, tls=TlsSettings(ca_file=certs.ca), auth=AuthSettings()) as channel:
            assert await _health(channel) == grpc.StatusCode.OK
        untrusting = grpc.aio.secure_channel(target, grpc.ssl_channel_credentials(certs.client_cert.read_bytes()))
        async with untrusting:
            assert await _health(untrusting) == grpc.StatusCode.UNAVAILABLE, "a certificate from an unknown CA fails"


@pytest.mark.asyncio
async def test_mutual_tls_needs_a_client_certificate_and_carries_the_service_credential(tmp_path):
    certs = make_certs(tmp_path)
    server_tls = TlsSettings(
        cert_file=certs.server_cert, key_file=certs.server_key, ca_file=certs.ca, require_client_cert=True
    )
    auth = AuthSettings(service_token="svc-secret", api_keys=api_key_entry("acme", "client-key"))
    async with inprocess_batcher(BatcherSettings(port=0), tls=server_tls, auth=auth) as runner:
        target = f"127.0.0.1:{runner.port}"
        async with open_channel(target, tls=TlsSettings(ca_file=certs.ca), auth=auth) as no_cert:
            assert await _health(no_cert) == grpc.StatusCode.UNAVAILABLE
        worker_tls = TlsSettings(
            cert_file=certs.client_cert, key_file=certs.client_key, ca_file=certs.ca, require_client_cert=True
        )
        async with open_channel(target, tls=worker_tls, auth=auth) as channel:
            assert await _health(channel) == grpc.StatusCode.OK
        internal = f"127.0.0.1:{runner.internal_port}"  # the workers' listener: TLS alike
        async with open_channel(internal, tls=TlsSettings(ca_file=certs.ca), auth=auth) as no_cert:
            assert await _health(no_cert) == grpc.StatusCode.UNAVAILABLE
        async with open_channel(internal, tls=worker_tls, auth=auth) as channel:
            response = await worker_queue_pb2_grpc.WorkerQueueServiceStub(channel).RegisterWorker(
                wq.RegisterWorkerRequest(worker_id="w1", kv_bytes_per_token=1, free_kv_bytes=1 << 30), timeout=5
            )
            assert response.lease_s > 0


def test_tls_settings_refuse_half_configurations(tmp_path):
    with pytest.raises(ValueError):
        TlsSettings(cert_file=tmp_path / "a.pem")
    with pytest.raises(ValueError):
        TlsSettings(require_client_cert=True)
