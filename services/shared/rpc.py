"""Registering servicers on a grpc.aio server with one error mapping for every RPC.

Generated `add_*Servicer_to_server` helpers deserialize before our code runs, so a bad payload
would surface as an opaque INTERNAL error. Here each method gets a tolerant deserializer and a
wrapper that turns malformed payloads, unknown fields and `RpcError`s into their status codes.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import grpc
from google.protobuf import message_factory
from google.protobuf.message import DecodeError, Message

from services.shared.auth import Authorizer, set_current_caller
from services.shared.errors import RpcError
from services.shared.metrics import instrument_stream, instrument_unary
from services.shared.validation import explain_decode_error, find_unknown_field, find_wire_problem

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MalformedRequest:
    """Stands in for a request whose bytes did not parse; the handler rejects it."""

    reason: str


def _tolerant_deserializer(message_class: type[Message]) -> Callable[[bytes], Any]:
    def deserialize(data: bytes) -> Message | MalformedRequest:
        try:
            message = message_class.FromString(data)
        except DecodeError:
            return MalformedRequest(explain_decode_error(message_class, data))
        # protobuf parses a known field sent with the wrong wire type as an unknown field and cuts an
        # oversized varint down to 32 bits: both would be reported as something else further on
        problem = find_wire_problem(message_class, data)
        return message if problem is None else MalformedRequest(problem)

    return deserialize


async def _reject_bad_request(request: Any, context: grpc.aio.ServicerContext) -> None:
    if isinstance(request, MalformedRequest):
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.reason)
    unknown = find_unknown_field(request)
    if unknown:
        await context.abort(
            grpc.StatusCode.INVALID_ARGUMENT, f"unknown field {unknown}: not part of this API version"
        )


async def _abort_for(error: Exception, method: str, context: grpc.aio.ServicerContext) -> None:
    if isinstance(error, RpcError):
        retry_after_s = getattr(error, "retry_after_s", None)
        if retry_after_s is not None:
            context.set_trailing_metadata((("retry-after-s", f"{retry_after_s:.3f}"),))
        await context.abort(error.code, error.message)
    log.exception("unhandled error in %s", method)
    await context.abort(grpc.StatusCode.INTERNAL, f"internal error in {method}: {type(error).__name__}")


async def _authorize(authorizer: Authorizer | None, method: str, context: grpc.aio.ServicerContext) -> None:
    """Before anything else looks at the request: unknown callers learn nothing about it.

    The caller (its role and, for an API key, its tenant) is then what `auth.current_caller()`
    returns to the servicer.
    """
    if authorizer is None:
        set_current_caller(None)
        return
    try:
        set_current_caller(authorizer.check(method, context.invocation_metadata()))
    except RpcError as error:
        await context.abort(error.code, error.message)


def _wrap_unary(method: str, fn: Callable[..., Awaitable[Message]], authorizer: Authorizer | None = None):
    async def handler(request: Any, context: grpc.aio.ServicerContext) -> Message:
        await _authorize(authorizer, method, context)
        await _reject_bad_request(request, context)
        try:
            return await fn(request, context)
        except Exception as error:  # noqa: BLE001 - mapped to a status, never swallowed
            if isinstance(error, grpc.aio.AbortError):
                raise
            await _abort_for(error, method, context)
            raise  # unreachable: abort raises

    return handler


def _wrap_stream(method: str, fn: Callable[..., AsyncIterator[Message]], authorizer: Authorizer | None = None):
    async def handler(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Message]:
        await _authorize(authorizer, method, context)
        await _reject_bad_request(request, context)
        try:
            async for response in fn(request, context):
                yield response
        except Exception as error:  # noqa: BLE001
            if isinstance(error, grpc.aio.AbortError):
                raise
            await _abort_for(error, method, context)

    return handler


def add_servicer(
    server: grpc.aio.Server, pb2: ModuleType, service_name: str, servicer: object, authorizer: Authorizer | None = None
) -> str:
    """Register `servicer` (methods named as in the proto) for `service_name` of module `pb2`.

    With an `authorizer`, every call is checked against it first (services.shared.auth).

    Returns the service's full name (e.g. "magnus.v1.PredictorService") for health/reflection.
    Only unary-unary and unary-stream methods are supported; that is all the contracts use.
    """
    service = pb2.DESCRIPTOR.services_by_name[service_name]
    handlers = {}
    for method in service.methods:
        request_class = message_factory.GetMessageClass(method.input_type)
        response_class = message_factory.GetMessageClass(method.output_type)
        fn = getattr(servicer, method.name)
        kwargs = dict(
            request_deserializer=_tolerant_deserializer(request_class),
            response_serializer=response_class.SerializeToString,
        )
        full = f"/{service.full_name}/{method.name}"
        if method.client_streaming:
            raise ValueError(f"{full}: client streaming is not supported")
        if method.server_streaming:
            handler = instrument_stream(full, _wrap_stream(full, fn, authorizer))
            handlers[method.name] = grpc.unary_stream_rpc_method_handler(handler, **kwargs)
        else:
            handler = instrument_unary(full, _wrap_unary(full, fn, authorizer))
            handlers[method.name] = grpc.unary_unary_rpc_method_handler(handler, **kwargs)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service.full_name, handlers),))
    return service.full_name
