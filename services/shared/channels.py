"""Client channels between services, with the same message limits and keepalives everywhere."""

from __future__ import annotations

import grpc


def channel_options(max_message_bytes: int = 4 * 1024 * 1024) -> list[tuple[str, int]]:
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.keepalive_permit_without_calls", 1),
    ]


def open_channel(target: str, max_message_bytes: int = 4 * 1024 * 1024) -> grpc.aio.Channel:
    """An insecure aio channel to `target` ("host:port", or "dns:///host:port" for every address).

    round_robin spreads RPCs over all addresses the name resolves to (a Kubernetes headless
    Service lists every replica); with one address it behaves like the default pick_first.
    """
    options = [*channel_options(max_message_bytes), ("grpc.lb_policy_name", "round_robin")]
    return grpc.aio.insecure_channel(target, options=options)
