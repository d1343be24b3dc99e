"""The OpenAI-compatible routes: HTTP JSON <-> the batcher's GenerationService, nothing more.

A request is validated (400 naming the field), sent to the batcher with the caller's Authorization
header as gRPC `authorization` metadata (the batcher binds the API key's tenant), and answered in
OpenAI's shape; `stream: true` answers with server-sent events from GenerateStream's TOKENS events.
Errors come back as OpenAI error bodies (errors.py). Whatever way the client leaves (closed socket,
timeout), a watcher on the ASGI receive channel cancels its batcher call, and the batcher drops the
request (queued) or tells the worker to stop its row (running). `stop` sequences are cut here
(stops.py), and the batcher call is cancelled at the first one.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from magnus.v1 import generation_pb2, generation_pb2_grpc
from services.gateway import metrics
from services.gateway.chat import ChatRenderer
from services.gateway.config import GatewaySettings
from services.gateway.errors import error_response, from_rpc_error
from services.gateway.requests import BadRequest, Job, parse
from services.gateway.responses import ChunkWriter, finish_reason, full_response, magnus_extension
from services.gateway.stops import StopMatcher

log = logging.getLogger(__name__)


class Gateway:
    def __init__(self, settings: GatewaySettings, channel: grpc.aio.Channel, renderer: ChatRenderer) -> None:
        self.settings = settings
        self.model = settings.served_model_name()
        self.renderer = renderer
        self.stub = generation_pb2_grpc.GenerationServiceStub(channel)
        self.health_stub = health_pb2_grpc.HealthStub(channel)

    def app(self) -> Starlette:
        return Starlette(routes=[
            Route("/v1/completions", self.completions, methods=["POST"]),
            Route("/v1/chat/completions", self.chat_completions, methods=["POST"]),
            Route("/v1/models", self.models, methods=["GET"]),
            Route("/health", self.health, methods=["GET"]),
            Route("/health/live", self.live, methods=["GET"]),
            Route("/metrics", self.metrics, methods=["GET"]),
        ])

    # ---- small routes ------------------------------------------------------------------------
    async def models(self, request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [
            {"id": self.model, "object": "model", "created": 0, "owned_by": "magnus"}]})

    async def live(self, request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def health(self, request: Request) -> Response:
        """Ready while the batcher reports SERVING (it does not while starting or draining)."""
        try:
            reply = await self.health_stub.Check(health_pb2.HealthCheckRequest(), timeout=self.settings.health_timeout_s)
            is_serving = reply.status == health_pb2.HealthCheckResponse.SERVING
        except grpc.aio.AioRpcError:
            is_serving = False
        return JSONResponse({"status": "ok" if is_serving else "unavailable", "batcher": self.settings.batcher_target},
                            status_code=200 if is_serving else 503)

    async def metrics(self, request: Request) -> Response:
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    # ---- completions -------------------------------------------------------------------------
    async def completions(self, request: Request) -> Response:
        return await self._answer(request, is_chat=False)

    async def chat_completions(self, request: Request) -> Response:
        return await self._answer(request, is_chat=True)

    async def _answer(self, request: Request, *, is_chat: bool) -> Response:
        route = request.url.path
        started_s = time.monotonic()
        response = await self._respond(request, is_chat)
        metrics.REQUESTS.labels(route=route, status=str(response.status_code)).inc()
        if not isinstance(response, StreamingResponse):
            metrics.REQUEST_SECONDS.labels(route=route, stream="false").observe(time.monotonic() - started_s)
        return response

    async def _respond(self, request: Request, is_chat: bool) -> Response:
        body = await request.body()
        if len(body) > self.settings.max_body_bytes:
            return error_response(413, f"request body over {self.settings.max_body_bytes} bytes")
        try:
            job = parse(json.loads(body or b"null"), is_chat=is_chat, renderer=self.renderer, model=self.model,
                        default_max_tokens=(self.settings.default_chat_max_tokens if is_chat
                                            else self.settings.default_max_tokens))
        except json.JSONDecodeError as error:
            return error_response(400, f"the body is not JSON: {error}")
        except BadRequest as error:
            return error_response(400, error.message, param=error.param)
        prompt = generation_pb2.Prompt(user_input=job.prompt, max_new_tokens=job.max_tokens, tenant_id=job.tenant_id)
        metadata = _forwarded_auth(request)
        if job.is_stream:
            return await self._stream(request, job, prompt, metadata)
        if job.stops:  # cut at a stop: streamed inside, so the batcher call ends there
            return await self._stream(request, job, prompt, metadata, is_collected=True)
        call = self.stub.Generate(generation_pb2.GenerateRequest(prompt=prompt), metadata=metadata,
                                  timeout=self.settings.request_timeout_s)
        watcher = asyncio.create_task(_cancel_on_disconnect(request, call))
        try:
            result = await call
        except grpc.aio.AioRpcError as error:
            return self._rpc_error(error, job)
        finally:
            watcher.cancel()
        reason = finish_reason(job, result.generated_tokens, is_stopped=False)
        return JSONResponse(full_response(job, result.request_id, result.text, reason, result.input_tokens,
                                          result.generated_tokens,
                                          magnus_extension(result, result.request_id, result.predicted_tokens)))

    def _rpc_error(self, error: grpc.aio.AioRpcError, job: Job) -> Response:
        status, body, headers = from_rpc_error(error, is_chat=job.is_chat)
        return JSONResponse(body, status_code=status, headers=headers)

    async def _stream(self, request: Request, job: Job, prompt, metadata, is_collected: bool = False) -> Response:
        """Open GenerateStream and read its first event before answering, so that a refusal at
        admission (400, 401, 429, 503) is an HTTP status, not an event in a 200 stream."""
        started_s = time.monotonic()
        call = self.stub.GenerateStream(generation_pb2.GenerateStreamRequest(prompt=prompt), metadata=metadata,
                                        timeout=self.settings.request_timeout_s)
        watcher = asyncio.create_task(_cancel_on_disconnect(request, call))
        events = call.__aiter__()
        try:
            first = await events.__anext__()
        except grpc.aio.AioRpcError as error:
            watcher.cancel()
            return self._rpc_error(error, job)
        except StopAsyncIteration:
            watcher.cancel()
            return error_response(502, "the batcher ended the stream without an answer", "server_error")
        answer = _Answer(job, first.request_id, first.predicted_tokens)
        if is_collected:
            try:
                async for _ in answer.read(first, events, call):
                    pass
            except grpc.aio.AioRpcError as error:
                return self._rpc_error(error, job)
            finally:
                watcher.cancel()
            return JSONResponse(answer.full_response())
        return StreamingResponse(self._sse(answer, first, events, call, watcher, started_s),
                                 media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    async def _sse(self, answer: _Answer, first, events: AsyncIterator, call, watcher: asyncio.Task,
                   started_s: float) -> AsyncIterator[str]:
        writer = ChunkWriter(answer.job, answer.request_id)
        is_first_text = True
        try:
            if answer.job.is_chat:
                yield writer.role()
            async for text in answer.read(first, events, call):
                if is_first_text:
                    metrics.TIME_TO_FIRST_TOKEN.observe(time.monotonic() - started_s)
                    is_first_text = False
                yield writer.chunk(text)
            yield writer.chunk(None if answer.job.is_chat else "", answer.reason(), usage=answer.usage(),
                               magnus=answer.extension())
        except grpc.aio.AioRpcError as error:
            if error.code() != grpc.StatusCode.CANCELLED:
                yield writer.error(from_rpc_error(error, is_chat=answer.job.is_chat)[1])
        finally:
            watcher.cancel()
            call.cancel()  # a client gone mid-stream: the batcher drops its request
            route = "/v1/chat/completions" if answer.job.is_chat else "/v1/completions"
            metrics.REQUEST_SECONDS.labels(route=route, stream="true").observe(time.monotonic() - started_s)
        yield writer.done()


class _Answer:
    """One request's answer as its events arrive: text through the stop matcher, tokens, result."""

    def __init__(self, job: Job, request_id: str, predicted_tokens: int) -> None:
        self.job = job
        self.request_id = request_id
        self.predicted_tokens = predicted_tokens
        self.matcher = StopMatcher(job.stops)
        self.text = ""
        self.num_tokens = 0
        self.result: generation_pb2.GenerateResponse | None = None

    async def read(self, first, events: AsyncIterator, call) -> AsyncIterator[str]:
        """The text to send, delta by delta; ends at FINISHED or at a stop sequence (cancelling the call)."""
        event = first
        while True:
            if event.phase == generation_pb2.REQUEST_PHASE_TOKENS:
                self.num_tokens = event.generated_tokens
                text = self.matcher.feed(event.text_delta)
                if text:
                    self.text += text
                    yield text
                if self.matcher.is_stopped:
                    metrics.STOPPED_BY_SEQUENCE.inc()
                    call.cancel()
                    return
            elif event.phase == generation_pb2.REQUEST_PHASE_FINISHED:
                self.result = event.result
                self.num_tokens = event.result.generated_tokens
                break
            try:
                event = await events.__anext__()
            except StopAsyncIteration:
                break
        held = self.matcher.finish()
        if held:
            self.text += held
            yield held

    def reason(self) -> str:
        return finish_reason(self.job, self.num_tokens, self.matcher.is_stopped)

    def usage(self) -> dict:
        prompt_tokens = self.result.input_tokens if self.result is not None else 0
        return {"prompt_tokens": prompt_tokens, "completion_tokens": self.num_tokens,
                "total_tokens": prompt_tokens + self.num_tokens}

    def extension(self) -> dict:
        return magnus_extension(self.result, self.request_id, self.predicted_tokens)

    def full_response(self) -> dict:
        usage = self.usage()
        return full_response(self.job, self.request_id, self.text, self.reason(), usage["prompt_tokens"],
                             usage["completion_tokens"], self.extension())


def _forwarded_auth(request: Request) -> tuple[tuple[str, str], ...]:
    """The caller's `Authorization: Bearer <API key>` as gRPC metadata (the batcher checks it)."""
    value = request.headers.get("authorization", "")
    return (("authorization", value),) if value else ()


async def _cancel_on_disconnect(request: Request, call) -> None:
    """Cancel the batcher call once the HTTP client is gone (the ASGI receive channel says so)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            break
    if not call.done():
        metrics.CLIENT_DISCONNECTS.inc()
        log.info("client left: cancelling its batcher call")
        call.cancel()
