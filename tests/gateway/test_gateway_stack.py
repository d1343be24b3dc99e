"""The gateway on the real local stack: a batcher, one worker on the tiny model and the gateway as
processes, auth on (API keys of tenants acme and flood), no predictor (fallback predictions).
The official `openai` client talks to it; httpx reads raw SSE and leaves mid-stream."""

from __future__ import annotations

import asyncio
import json
import re
import time
import urllib.request

import grpc
import httpx
import openai
import pytest

from magnus.v1 import generation_pb2, generation_pb2_grpc
from services.shared.auth import api_key_entry, bearer_metadata
from tests.stack_support import assert_no_asyncio_errors, running_stack
from tools.stack import Stack, free_port

pytestmark = pytest.mark.integration

SERVICES = ("batcher", "worker", "gateway")
SERVICE_TOKEN, ACME_KEY, FLOOD_KEY = "svc-token-gw-7a1", "acme-key-gw-2b9", "flood-key-gw-c44"
PROMPT = "Translate to German: the weather is nice today."


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("gateway")
    with running_stack(workdir, SERVICES, env={
        "MAGNUS_AUTH_SERVICE_TOKEN": SERVICE_TOKEN,
        "MAGNUS_AUTH_API_KEYS": f"{api_key_entry('acme', ACME_KEY)},{api_key_entry('flood', FLOOD_KEY)}",
        "MAGNUS_BATCHER_PREDICTOR_DEADLINE_S": "0.3",  # no predictor runs: the fallback after 0.3 s
        "MAGNUS_BATCHER_HEARTBEAT_INTERVAL_S": "0.5",
        "MAGNUS_BATCHER_MAX_PENDING_PER_TENANT": "2",
        "MAGNUS_BATCHER_MAX_NEW_TOKENS_LIMIT": "3000",
        "MAGNUS_BATCHER_DRAIN_TIMEOUT_S": "5",
        "MAGNUS_WORKER_PULL_WAIT_S": "1",
        "MAGNUS_WORKER_STREAM_INTERVAL_MS": "20",
    }) as stack:
        yield stack
    assert_no_asyncio_errors(stack, SERVICES)


def client(stack: Stack, key: str = ACME_KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{stack.url('gateway')}/v1", api_key=key, max_retries=0, timeout=120)


def metric(stack: Stack, name: str, text: str) -> float:
    """The sum of the samples of metric `text` (a name, or a name with its labels) on a service."""
    body = urllib.request.urlopen(stack.metrics_url(name), timeout=5).read().decode()
    rows = [line.rsplit(" ", 1) for line in body.splitlines() if line and not line.startswith("#")]
    return sum(float(value) for key, value in rows if key == text or key.startswith(text + "{"))


def test_completion_and_chat_with_usage_and_predicted_length(stack):
    api = client(stack)
    completion = api.completions.create(model="any", prompt=PROMPT, max_tokens=8)
    choice = completion.choices[0]
    assert completion.object == "text_completion" and choice.text
    assert completion.usage.completion_tokens == 8 and choice.finish_reason == "length"
    assert completion.usage.prompt_tokens > 5
    assert completion.model_extra["magnus"]["predicted_tokens"] >= 1
    chat = api.chat.completions.create(model="any", messages=[{"role": "user", "content": PROMPT}], max_tokens=6)
    assert chat.choices[0].message.role == "assistant" and chat.choices[0].message.content
    assert chat.usage.completion_tokens == 6
    models = api.models.list()
    assert [m.id for m in models.data] == ["magnus-tiny-qwen2"]


def test_chat_stream_deltas_concatenate_to_the_unstreamed_answer(stack):
    api = client(stack)
    messages = [{"role": "user", "content": "写一首关于秋天的诗 🍂"}]
    whole = api.chat.completions.create(model="m", messages=messages, max_tokens=96).choices[0].message.content
    chunks = list(api.chat.completions.create(model="m", messages=messages, max_tokens=96, stream=True))
    deltas = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    # the static batch hands its tokens over every 16 steps (6 times here); how many of those a busy
    # machine's 20 ms stream flushes merge depends on when its event loop runs: more than one piece
    assert len(deltas) >= 2
    assert "".join(deltas) == whole
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices[0].finish_reason == "length"
    assert chunks[-1].usage.completion_tokens == 96 and chunks[-1].model_extra["magnus"]["predicted_tokens"] >= 1


def test_sse_shape_of_a_streamed_completion(stack):
    body = {"prompt": PROMPT, "max_tokens": 24, "stream": True}
    with httpx.stream("POST", f"{stack.url('gateway')}/v1/completions", json=body, timeout=120,
                      headers={"Authorization": f"Bearer {ACME_KEY}"}) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line for line in response.iter_lines() if line]
    assert all(line.startswith("data: ") for line in events)
    assert events[-1] == "data: [DONE]"
    chunks = [json.loads(line.removeprefix("data: ")) for line in events[:-1]]
    assert all(c["object"] == "text_completion" and c["id"] == chunks[0]["id"] for c in chunks)
    assert [c["choices"][0]["finish_reason"] for c in chunks][-1] == "length"
    assert sum(1 for c in chunks[:-1] if c["choices"][0]["text"]) >= 2


def test_generate_stream_sends_token_events_in_order_that_add_up_to_the_text(stack):
    async def call():
        async with grpc.aio.insecure_channel(stack.target("batcher")) as channel:
            stub = generation_pb2_grpc.GenerationServiceStub(channel)
            prompt = generation_pb2.Prompt(user_input="讲一个笑话 😀", max_new_tokens=64)
            return [e async for e in stub.GenerateStream(generation_pb2.GenerateStreamRequest(prompt=prompt),
                                                          metadata=bearer_metadata(ACME_KEY), timeout=120)]

    events = asyncio.run(call())
    phases = [e.phase for e in events]
    assert phases[:2] == [generation_pb2.REQUEST_PHASE_QUEUED, generation_pb2.REQUEST_PHASE_STARTED]
    assert phases[-1] == generation_pb2.REQUEST_PHASE_FINISHED
    tokens = events[2:-1]
    assert all(e.phase == generation_pb2.REQUEST_PHASE_TOKENS for e in tokens) and len(tokens) >= 3
    counts = [e.generated_tokens for e in tokens]
    assert counts == sorted(counts) and counts[-1] == 64 == sum(e.num_tokens for e in tokens)
    text = events[-1].result.text
    assert "".join(e.text_delta for e in tokens).encode() == text.encode()
    assert any(ord(c) > 0x7F for c in text)  # Qwen's vocabulary: multi-byte characters in the output
    assert metric(stack, "batcher", "magnus_time_to_first_token_seconds_count") >= 1
    assert metric(stack, "batcher", "magnus_time_per_output_token_seconds_count") >= 1


def test_errors_in_openai_shape(stack):
    api = client(stack)
    with pytest.raises(openai.BadRequestError) as bad:
        api.completions.create(model="m", prompt=PROMPT, max_tokens=0)
    assert bad.value.body["param"] == "max_tokens"
    with pytest.raises(openai.BadRequestError) as too_many:  # refused by the batcher, named by the gateway
        api.completions.create(model="m", prompt=PROMPT, max_tokens=5000)
    assert too_many.value.body["param"] == "max_tokens" and "3000" in too_many.value.body["message"]
    with pytest.raises(openai.BadRequestError) as no_messages:
        api.chat.completions.create(model="m", messages=[])
    assert no_messages.value.body["param"] == "messages"
    with pytest.raises(openai.AuthenticationError) as unknown:
        client(stack, key="not-a-key").completions.create(model="m", prompt=PROMPT, max_tokens=2)
    assert unknown.value.status_code == 401 and unknown.value.body["type"] == "invalid_request_error"


def test_full_tenant_gets_429_with_retry_after(stack):
    async def flood():
        headers = {"Authorization": f"Bearer {FLOOD_KEY}"}
        body = {"prompt": PROMPT, "max_tokens": 2500, "stream": True}
        async with httpx.AsyncClient(base_url=stack.url("gateway"), headers=headers, timeout=60) as http:
            streams = [http.stream("POST", "/v1/completions", json=body) for _ in range(2)]
            opened = [await s.__aenter__() for s in streams]
            assert [r.status_code for r in opened] == [200, 200]
            third = await http.post("/v1/completions", json={**body, "stream": False})
            for s in streams:
                await s.__aexit__(None, None, None)
            return third

    third = asyncio.run(flood())
    assert third.status_code == 429 and int(third.headers["Retry-After"]) >= 1
    assert third.json()["error"]["code"] == "rate_limit_exceeded"


def test_client_that_disconnects_cancels_its_request_and_frees_the_worker(stack):
    cancelled_before = metric(stack, "batcher", 'magnus_cancelled_requests_total{stage="running"}')
    body = {"messages": [{"role": "user", "content": PROMPT}], "max_tokens": 2500, "stream": True}
    with httpx.stream("POST", f"{stack.url('gateway')}/v1/chat/completions", json=body, timeout=60,
                      headers={"Authorization": f"Bearer {ACME_KEY}"}) as response:
        assert response.status_code == 200
        texts = []
        for line in response.iter_lines():
            if line.startswith("data: {") and json.loads(line[6:])["choices"][0]["delta"].get("content"):
                texts.append(line)
            if len(texts) >= 2:
                break  # leave mid-stream: the connection closes
    left_s = time.monotonic()
    deadline_s = left_s + 30
    while time.monotonic() < deadline_s:
        is_cancelled = metric(stack, "batcher", 'magnus_cancelled_requests_total{stage="running"}') > cancelled_before
        in_use = {"pending": metric(stack, "batcher", "magnus_pending_requests"),
                  "leased": metric(stack, "batcher", "magnus_leased_batches"),
                  "worker_busy": metric(stack, "worker", "magnus_worker_busy")}
        if is_cancelled and not any(in_use.values()):
            break
        time.sleep(0.2)
    assert is_cancelled and not any(in_use.values()), f"not cancelled ({is_cancelled}) or still in use: {in_use}"
    assert metric(stack, "gateway", "magnus_gateway_client_disconnects_total") >= 1
    assert re.search(r"dropped while running: its caller left", stack.log_path("batcher").read_text())


def _in_process_gateway(target: str, **settings):
    """The gateway's ASGI app in this process (httpx calls it without a socket), against `target`."""
    from services.gateway.config import GatewaySettings
    from services.gateway.server import build

    gateway, channel = build(GatewaySettings(batcher_target=target, **settings))
    http = httpx.AsyncClient(transport=httpx.ASGITransport(app=gateway.app()), base_url="http://gateway",
                             headers={"Authorization": f"Bearer {ACME_KEY}"}, timeout=60)
    return http, channel


class _SilentBatcher(generation_pb2_grpc.GenerationServiceServicer):
    """Admits every call and never answers in time: the deadline, not admission, decides (the real
    batcher's deadline-aware admission may refuse a request it cannot answer in time with 429)."""

    async def Generate(self, request, context):
        await asyncio.sleep(30)
        return generation_pb2.GenerateResponse()

    async def GenerateStream(self, request, context):
        await asyncio.sleep(30)
        yield generation_pb2.GenerateStreamResponse()


def test_deadline_is_504_and_an_unreachable_batcher_is_503():
    async def calls():
        silent = grpc.aio.server()
        generation_pb2_grpc.add_GenerationServiceServicer_to_server(_SilentBatcher(), silent)
        port = silent.add_insecure_port("127.0.0.1:0")
        await silent.start()
        http, channel = _in_process_gateway(f"127.0.0.1:{port}", request_timeout_s=0.5)
        async with http:
            late = await http.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 25})
        await channel.close()
        await silent.stop(grace=None)
        http, channel = _in_process_gateway(f"127.0.0.1:{free_port()}")
        async with http:
            down = await http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
            health = await http.get("/health")
        await channel.close()
        return late, down, health

    late, down, health = asyncio.run(calls())
    assert late.status_code == 504 and late.json()["error"]["code"] == "deadline_exceeded"
    assert down.status_code == 503 and down.json()["error"]["type"] == "service_unavailable"
    assert health.status_code == 503
