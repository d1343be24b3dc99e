"""The chart's TLS probe (tools/health_probe.py) against a TLS-only health server."""

from __future__ import annotations

from concurrent import futures

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from services.shared.tls import TlsSettings
from tests.security.certs import make_certs
from tools.health_probe import check, main


@pytest.fixture
def tls_health_server(tmp_path):
    certs = make_certs(tmp_path)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    servicer.set("loading", health_pb2.HealthCheckResponse.NOT_SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    credentials = grpc.ssl_server_credentials([(certs.server_key.read_bytes(), certs.server_cert.read_bytes())])
    port = server.add_secure_port("127.0.0.1:0", credentials)
    server.start()
    yield port, certs
    server.stop(None)


def test_probe_passes_over_tls_and_reports_why_it_fails(tls_health_server):
    port, certs = tls_health_server
    tls = TlsSettings(ca_file=certs.ca)
    assert check(port, "", "localhost", 5.0, tls) is None
    assert "NOT_SERVING" in check(port, "loading", "localhost", 5.0, tls)
    assert "UNAVAILABLE" in check(port, "", "magnus-batcher", 5.0, tls), "a name the certificate lacks"
    assert "UNAVAILABLE" in check(port, "", "", 2.0, TlsSettings()), "plaintext cannot reach a TLS port"


def test_exit_codes(tls_health_server, monkeypatch, capsys):
    port, certs = tls_health_server
    monkeypatch.setenv("MAGNUS_TLS_CA_FILE", str(certs.ca))
    assert main(["--port", str(port), "--server-name", "localhost"]) == 0
    assert main(["--port", str(port), "--server-name", "localhost", "--service", "loading"]) == 1
    assert "NOT_SERVING" in capsys.readouterr().err
