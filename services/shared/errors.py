"""Domain errors and their gRPC status codes: the one place where errors map to statuses.

Servicers and core code raise these; `services.shared.rpc` turns them into `context.abort` calls.
"""

from __future__ import annotations

import grpc


class RpcError(Exception):
    """An error with a gRPC status code and a message safe to show the caller."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidArgument(RpcError):
    """The caller sent something wrong; the message names the field."""

    code = grpc.StatusCode.INVALID_ARGUMENT

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field


class ResourceExhausted(RpcError):
    """A bounded resource (queue, tenant quota) is full; retrying later may succeed."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED

    def __init__(self, message: str, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class Unavailable(RpcError):
    """The service cannot serve now (starting, shutting down, dependency down)."""

    code = grpc.StatusCode.UNAVAILABLE


class NotFound(RpcError):
    code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(RpcError):
    """An idempotency key is already taken by a different request."""

    code = grpc.StatusCode.ALREADY_EXISTS


class FailedPrecondition(RpcError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class DeadlineExceeded(RpcError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Internal(RpcError):
    code = grpc.StatusCode.INTERNAL
