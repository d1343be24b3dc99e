"""gRPC statuses from the batcher -> OpenAI's JSON error shape and HTTP status, in one place."""

from __future__ import annotations

import math

import grpc
from starlette.responses import JSONResponse

from services.gateway.requests import openai_param

# status -> (HTTP status, OpenAI error type, code)
_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: (400, "invalid_request_error", None),
    grpc.StatusCode.OUT_OF_RANGE: (400, "invalid_request_error", None),
    grpc.StatusCode.UNAUTHENTICATED: (401, "invalid_request_error", "invalid_api_key"),
    grpc.StatusCode.PERMISSION_DENIED: (403, "permission_error", None),
    grpc.StatusCode.NOT_FOUND: (404, "invalid_request_error", None),
    grpc.StatusCode.ALREADY_EXISTS: (409, "invalid_request_error", None),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (429, "rate_limit_error", "rate_limit_exceeded"),
    grpc.StatusCode.CANCELLED: (499, "invalid_request_error", "cancelled"),
    grpc.StatusCode.UNAVAILABLE: (503, "service_unavailable", "unavailable"),
    grpc.StatusCode.DEADLINE_EXCEEDED: (504, "timeout", "deadline_exceeded"),
}


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def error_response(status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                   code: str | None = None, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(message, type_, param, code), status_code=status, headers=headers)


def retry_after_s(error: grpc.aio.AioRpcError) -> float | None:
    for key, value in error.trailing_metadata() or ():
        if key == "retry-after-s":
            try:
                return float(value)
            except ValueError:
                return None
    return None


def from_rpc_error(error: grpc.aio.AioRpcError, *, is_chat: bool) -> tuple[int, dict, dict[str, str]]:
    """(HTTP status, OpenAI error body, headers) for a failed batcher call."""
    status, type_, code = _STATUS.get(error.code(), (500, "server_error", None))
    message = error.details() or error.code().name
    headers: dict[str, str] = {}
    param = None
    if error.code() == grpc.StatusCode.INVALID_ARGUMENT:
        field = message.split(":", 1)[0]
        param = openai_param(field, is_chat) or (field if " " not in field else None)
        if param and param != field:
            message = f"{param}: {message.split(':', 1)[1].strip()}"
    if error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
        wait_s = retry_after_s(error)
        if wait_s is None:  # not a full queue but a request that can never fit: retrying will not help
            status, type_, code = 400, "invalid_request_error", "request_too_large"
        else:
            headers["Retry-After"] = str(max(1, math.ceil(wait_s)))
    return status, error_body(message, type_, param, code), headers
