"""Prometheus metrics shared by every service: per-RPC counts and latency, model versions, /metrics.

One place for the cross-cutting ones: `add_servicer` (rpc.py) wraps every handler with
`instrument_unary` / `instrument_stream`, `ServiceRunner` starts the HTTP endpoint when
`metrics_port` is set, and model-serving replicas report their version with `set_model_version`.
Service-specific (domain) metrics live beside the code they describe (services/batcher/metrics.py,
services/worker/metrics.py) and register into the same default registry, so one scrape of a
process returns all of them. Names follow Prometheus conventions: `magnus_` prefix, base units
(seconds, tokens) in the name, `_total` on counters.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from threading import Thread
from typing import Any
from wsgiref.simple_server import WSGIServer

import grpc
from prometheus_client import REGISTRY, Counter, Gauge, Histogram, start_http_server

log = logging.getLogger(__name__)

# RPCs range from sub-millisecond (Heartbeat) to minutes (Generate on a long batch, PullBatch's
# long-poll), so the buckets span 1 ms .. 10 min.
RPC_BUCKETS_S = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)

RPC_REQUESTS = Counter(
    "magnus_rpc_requests_total",
    "RPCs handled, by gRPC service, method and status code.",
    ["grpc_service", "grpc_method", "grpc_code"],
)
RPC_DURATION = Histogram(
    "magnus_rpc_duration_seconds",
    "Time from the request's arrival to the handler's last response, seconds.",
    ["grpc_service", "grpc_method", "grpc_code"],
    buckets=RPC_BUCKETS_S,
)
MODEL_VERSION = Gauge(
    "magnus_model_version",
    "Version of the model this replica serves (0 = none loaded yet), by model kind.",
    ["kind"],
)
MODEL_LOADS = Counter("magnus_model_loads_total", "Model versions loaded (start-up and pushes), by kind.", ["kind"])


def set_model_version(kind: str, version: int) -> None:
    """A predictor/estimator replica swapped in `version` of its `kind` model."""
    MODEL_VERSION.labels(kind=kind).set(version)
    MODEL_LOADS.labels(kind=kind).inc()


# ---- per-RPC metrics ----------------------------------------------------------------------------


def _split_method(full_method: str) -> tuple[str, str]:
    """'/magnus.v1.GenerationService/Generate' -> ('magnus.v1.GenerationService', 'Generate')."""
    service, _, method = full_method.lstrip("/").rpartition("/")
    return service, method


def _code_after(context: grpc.aio.ServicerContext, error: BaseException | None) -> grpc.StatusCode:
    """The status the client sees: aborts set it on the context; anything else escaping is UNKNOWN."""
    if isinstance(error, (asyncio.CancelledError, GeneratorExit)):
        return grpc.StatusCode.CANCELLED  # the caller went away or the server is stopping
    code = context.code()
    if isinstance(code, grpc.StatusCode):
        return code
    return grpc.StatusCode.OK if error is None else grpc.StatusCode.UNKNOWN


@dataclass
class _RpcTimer:
    service: str
    method: str
    started_s: float

    def finish(self, context: grpc.aio.ServicerContext, error: BaseException | None) -> None:
        code = _code_after(context, error).name
        RPC_REQUESTS.labels(self.service, self.method, code).inc()
        RPC_DURATION.labels(self.service, self.method, code).observe(time.monotonic() - self.started_s)


def _start_timer(full_method: str) -> _RpcTimer:
    service, method = _split_method(full_method)
    return _RpcTimer(service, method, time.monotonic())


def instrument_unary(full_method: str, handler: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    """Count and time a unary handler by its final status code."""

    async def instrumented(request: Any, context: grpc.aio.ServicerContext) -> Any:
        timer = _start_timer(full_method)
        try:
            response = await handler(request, context)
        except BaseException as error:
            timer.finish(context, error)
            raise
        timer.finish(context, None)
        return response

    return instrumented


def instrument_stream(
    full_method: str, handler: Callable[..., AsyncIterator[Any]]
) -> Callable[..., AsyncIterator[Any]]:
    """Count and time a server-streaming handler over its whole stream."""

    async def instrumented(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        timer = _start_timer(full_method)
        try:
            async for response in handler(request, context):
                yield response
        except BaseException as error:
            timer.finish(context, error)
            raise
        timer.finish(context, None)

    return instrumented


# ---- the /metrics endpoint ----------------------------------------------------------------------


@dataclass
class MetricsEndpoint:
    """A running /metrics HTTP server (prometheus_client's, on its own thread)."""

    server: WSGIServer
    thread: Thread

    @property
    def port(self) -> int:
        return self.server.server_port

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def start_metrics_endpoint(host: str, port: int) -> MetricsEndpoint:
    """Serve the default registry on http://host:port/metrics (port 0 picks a free one)."""
    server, thread = start_http_server(port, addr=host, registry=REGISTRY)
    endpoint = MetricsEndpoint(server, thread)
    log.info("metrics on http://%s:%d/metrics", host, endpoint.port)
    return endpoint
