"""The batcher alone as a real process: bad input, a full queue, SIGTERM.

No worker runs, so admitted requests stay queued; no predictor runs, so the fallback is used.
"""

from __future__ import annotations

import asyncio
import signal

import grpc
import pytest

from magnus.v1 import generation_pb2, generation_pb2_grpc
from tools.stack import Stack, free_port

pytestmark = pytest.mark.integration

GENERATE = "/magnus.v1.GenerationService/Generate"


@pytest.fixture
def lone_batcher(tmp_path):
    stack = Stack(
        workdir=tmp_path,
        database_url=f"sqlite+aiosqlite:///{tmp_path / 'log.db'}",
        extra_env={
            "MAGNUS_BATCHER_PREDICTOR_TARGET": f"127.0.0.1:{free_port()}",  # nothing listens
            "MAGNUS_BATCHER_PREDICTOR_DEADLINE_S": "0.3",
            "MAGNUS_BATCHER_MAX_PENDING_REQUESTS": "2",
            "MAGNUS_BATCHER_MAX_USER_INPUT_BYTES": "1000",
            "MAGNUS_BATCHER_MAX_NEW_TOKENS_LIMIT": "100",
            "MAGNUS_BATCHER_MAX_INPUT_TOKENS": "50",
            "MAGNUS_BATCHER_DRAIN_TIMEOUT_S": "1",
        },
    )
    stack.start("batcher")
    try:
        stack.wait_healthy(("batcher",), timeout_s=60)
        yield stack
    finally:
        stack.stop("batcher")


def prompt(**fields) -> generation_pb2.GenerateRequest:
    values = dict(user_input="hello", max_new_tokens=4)
    values.update(fields)
    return generation_pb2.GenerateRequest(prompt=generation_pb2.Prompt(**values))


def call_status(target: str, request) -> tuple[grpc.StatusCode, str]:
    with grpc.insecure_channel(target) as channel:
        try:
            generation_pb2_grpc.GenerationServiceStub(channel).Generate(request, timeout=10)
        except grpc.RpcError as error:
            return error.code(), error.details()
    return grpc.StatusCode.OK, ""


def raw_status(target: str, payload: bytes) -> tuple[grpc.StatusCode, str]:
    with grpc.insecure_channel(target) as channel:
        try:
            channel.unary_unary(GENERATE)(payload, timeout=10)
        except grpc.RpcError as error:
            return error.code(), error.details()
    return grpc.StatusCode.OK, ""


@pytest.mark.parametrize(
    ("request_", "field"),
    [
        (generation_pb2.GenerateRequest(), "prompt"),
        (prompt(user_input=""), "prompt.user_input"),
        (prompt(user_input="   "), "prompt.user_input"),
        (prompt(user_input="x" * 1001), "prompt.user_input"),  # over the byte limit
        (prompt(user_input="word " * 200), "prompt.user_input"),  # under the byte limit, over 50 tokens
        (prompt(max_new_tokens=0), "prompt.max_new_tokens"),
        (prompt(max_new_tokens=-3), "prompt.max_new_tokens"),
        (prompt(max_new_tokens=101), "prompt.max_new_tokens"),
        (prompt(client_request_id="k" * 129), "prompt.client_request_id"),
        (prompt(tenant_id="t" * 65), "prompt.tenant_id"),
    ],
)
def test_bad_input_is_invalid_argument_naming_the_field(lone_batcher, request_, field):
    code, details = call_status(lone_batcher.target("batcher"), request_)
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert details.startswith(field), details


def test_invalid_utf8_and_unknown_fields_are_invalid_argument(lone_batcher):
    target = lone_batcher.target("batcher")
    bad_utf8 = b"\x0a\x06" + b"\x12\x02\xff\xfe\x18\x04"  # prompt { user_input: ff fe, max_new_tokens: 4 }
    code, details = raw_status(target, bad_utf8)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "prompt.user_input" in details and "UTF-8" in details
    unknown = prompt().SerializeToString() + b"\xf8\x06\x01"  # field 111, varint 1
    code, details = raw_status(target, unknown)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "unknown field" in details and "111" in details
    nested_unknown = b"\x0a\x08" + b"\x12\x01a\x18\x04\xa0\x06\x01"  # prompt { ..., field 100: 1 }
    code, details = raw_status(target, nested_unknown)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "prompt#100" in details


def test_full_queue_is_resource_exhausted_and_sigterm_gives_unavailable(lone_batcher):
    target = lone_batcher.target("batcher")

    async def scenario():
        async with grpc.aio.insecure_channel(target) as channel:
            stub = generation_pb2_grpc.GenerationServiceStub(channel)
            queued = [asyncio.ensure_future(stub.Generate(prompt(user_input=f"q{i}"), timeout=30)) for i in range(2)]
            await asyncio.sleep(1.5)  # both admitted (predictor fallback after its 0.3 s deadline)
            with pytest.raises(grpc.aio.AioRpcError) as full:
                await stub.Generate(prompt(user_input="third"), timeout=10)
            assert full.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "queue full" in full.value.details()
            assert dict(full.value.trailing_metadata()).get("retry-after-s")

            lone_batcher.processes["batcher"].send_signal(signal.SIGTERM)
            await asyncio.sleep(0.2)
            with pytest.raises(grpc.aio.AioRpcError) as after:
                await stub.Generate(prompt(user_input="late"), timeout=10)
            assert after.value.code() == grpc.StatusCode.UNAVAILABLE
            # the queued ones were never run (no worker): after the drain they are told, not dropped
            results = await asyncio.gather(*queued, return_exceptions=True)
            assert [r.code() for r in results] == [grpc.StatusCode.UNAVAILABLE] * 2

    asyncio.run(scenario())
    assert lone_batcher.processes["batcher"].wait(timeout=20) == 0
