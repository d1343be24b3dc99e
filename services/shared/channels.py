"""Client channels between services, with the same message limits and keepalives everywhere."""

from __future__ import annotations

import grpc

from services.shared.auth import AuthSettings, service_credential_interceptors
from services.shared.tls import TlsSettings, channel_credentials


def channel_options(max_message_bytes: int = 4 * 1024 * 1024) -> list[tuple[str, int]]:
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.keepalive_permit_without_calls", 1),
        # A peer that restarted (a redeployed predictor or estimator) is reconnected within seconds:
        # gRPC's default backoff grows to 120 s, and calls fail fast as UNAVAILABLE meanwhile.
        ("grpc.initial_reconnect_backoff_ms", 500),
        ("grpc.max_reconnect_backoff_ms", 5_000),
    ]


def open_channel(
    target: str,
    max_message_bytes: int = 4 * 1024 * 1024,
    *,
    tls: TlsSettings | None = None,
    auth: AuthSettings | None = None,
) -> grpc.aio.Channel:
    """An aio channel to `target` ("host:port", or "dns:///host:port" for every address).

    TLS (and the client certificate for mutual TLS) and the service credential come from `tls` /
    `auth`, by default the MAGNUS_TLS_* / MAGNUS_AUTH_* environment: every internal caller
    (batcher, worker, trainer) gets them without code of its own. Plaintext when TLS is off.

    round_robin spreads RPCs over all addresses the name resolves to (a Kubernetes headless
    Service lists every replica); with one address it behaves like the default pick_first.
    """
    options = [*channel_options(max_message_bytes), ("grpc.lb_policy_name", "round_robin")]
    tls = tls or TlsSettings()
    interceptors = service_credential_interceptors(auth)
    credentials = channel_credentials(tls)
    if credentials is None:
        return grpc.aio.insecure_channel(target, options=options, interceptors=interceptors)
    if tls.server_name:
        options.append(("grpc.ssl_target_name_override", tls.server_name))
    return grpc.aio.secure_channel(target, credentials, options=options, interceptors=interceptors)
