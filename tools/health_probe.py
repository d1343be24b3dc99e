"""Kubernetes probe for a TLS-only service: the kubelet's own gRPC probes speak plaintext only.

    python -m tools.health_probe --port 50051 [--service liveness] [--server-name NAME]

Checks the standard grpc.health.v1 service on 127.0.0.1 with the pod's MAGNUS_TLS_* settings
(verifying against MAGNUS_TLS_CA_FILE, presenting the certificate for mutual TLS); `--server-name`
is the name the certificate carries (the pod's Service name or MAGNUS_TLS_SERVER_NAME). Exit 0 when
SERVING, 1 otherwise, with one line on stderr saying why.
"""

from __future__ import annotations

import argparse
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.shared.tls import TlsSettings, channel_credentials


def check(port: int, service: str, server_name: str, timeout_s: float, tls: TlsSettings) -> str | None:
    """None when `service` reports SERVING on 127.0.0.1:`port`, else why not."""
    target = f"127.0.0.1:{port}"
    credentials = channel_credentials(tls)
    name = server_name or tls.server_name
    options = [("grpc.ssl_target_name_override", name)] if credentials is not None and name else []
    channel = grpc.insecure_channel(target) if credentials is None else grpc.secure_channel(target, credentials, options)
    try:
        with channel:
            request = health_pb2.HealthCheckRequest(service=service)
            status = health_pb2_grpc.HealthStub(channel).Check(request, timeout=timeout_s).status
    except grpc.RpcError as error:
        return f"{target} health({service!r}): {error.code().name}: {error.details()}"
    if status != health_pb2.HealthCheckResponse.SERVING:
        return f"{target} health({service!r}): {health_pb2.HealthCheckResponse.ServingStatus.Name(status)}"
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--service", default="", help='health service name ("" = readiness, "liveness")')
    parser.add_argument("--server-name", default="", help="name to verify in the server certificate")
    parser.add_argument("--timeout-s", type=float, default=5.0)
    args = parser.parse_args(argv)
    problem = check(args.port, args.service, args.server_name, args.timeout_s, TlsSettings())
    if problem:
        print(problem, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
