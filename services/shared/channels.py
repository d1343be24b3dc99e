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
    """An insecure aio channel to `target` ("host:port")."""
    return grpc.aio.insecure_channel(target, options=channel_options(max_message_bytes))
