"""Fuzzing the public RPCs over real gRPC: every call ends with a status; the server never dies.

Hypothesis builds prompts (any Unicode, sizes around the limits, the whole int32 range), raw
bytes, and valid messages with bytes flipped, and sends them to the batcher's real servicers
in-process (tests/inprocess_batcher.py: real validation, admission and scheduling; an echo
worker). Each example sends CASES_PER_EXAMPLE calls at once, so `MAGNUS_FUZZ_EXAMPLES` examples
(default 1,000) make ten times as many cases per RPC. bench/fuzz.sh-style long runs just raise
`MAGNUS_FUZZ_EXAMPLES`.
"""

from __future__ import annotations

import asyncio
import os
from collections import Counter

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from magnus.v1 import generation_pb2
from services.batcher.config import BatcherSettings
from tests.inprocess_batcher import inprocess_batcher

NUM_EXAMPLES = int(os.environ.get("MAGNUS_FUZZ_EXAMPLES", "1000"))
CASES_PER_EXAMPLE = 10
DEADLINE_S = 5.0
# What a hostile or broken request may get. INTERNAL / UNKNOWN would mean an unhandled error.
ALLOWED = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED}
SETTINGS = BatcherSettings(
    port=0, max_instruction_bytes=256, max_user_input_bytes=1024, max_new_tokens_limit=64, max_input_tokens=512
)

INT32 = st.integers(min_value=-(2**31), max_value=2**31 - 1)
# Around the limits (SETTINGS) and beyond, with every kind of code point protobuf can carry.
TEXT = st.one_of(
    st.text(max_size=40),
    st.text(st.characters(codec="utf-8"), min_size=200, max_size=1500),
    st.sampled_from(["", " ", "\n\t", "\x00", "a" * 257, "é" * 600, "\U0001f600" * 300]),
)
PLAUSIBLE = st.builds(  # mostly admissible: the admission, scheduling and response paths get fuzzed too
    generation_pb2.Prompt,
    instruction=st.text(max_size=60),
    user_input=st.text(min_size=1, max_size=300).filter(str.strip),
    max_new_tokens=st.integers(1, 64),
    client_request_id=st.text(max_size=8),
    tenant_id=st.text(max_size=8),
)
HOSTILE = st.builds(
    generation_pb2.Prompt,
    instruction=TEXT,
    user_input=TEXT,
    max_new_tokens=st.one_of(INT32, st.integers(0, 70)),
    client_request_id=st.one_of(st.just(""), st.text(max_size=140)),
    tenant_id=st.one_of(st.just(""), st.text(max_size=70)),
)
PROMPTS = st.one_of(PLAUSIBLE, HOSTILE)


@st.composite
def flipped(draw, valid: st.SearchStrategy[bytes]) -> bytes:
    data = bytearray(draw(valid))
    for _ in range(draw(st.integers(1, 4))):
        if data:
            data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    return bytes(data)


def payloads(wrap) -> st.SearchStrategy[bytes]:
    valid = PROMPTS.map(lambda p: wrap(p).SerializeToString())
    return st.one_of(valid, st.binary(max_size=300), flipped(valid), valid.map(lambda b: b + b"\xa8\x1f\x01"))


def _codes_of(futures) -> list[grpc.StatusCode]:
    codes = []
    for future in futures:
        try:
            future.result()
            codes.append(grpc.StatusCode.OK)
        except grpc.RpcError as error:
            codes.append(error.code())
    return codes


def fuzz_generate(target: str) -> Counter:
    seen: Counter = Counter()
    with grpc.insecure_channel(target) as channel:
        call = channel.unary_unary("/magnus.v1.GenerationService/Generate")

        @settings(max_examples=NUM_EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck))
        @given(st.lists(payloads(lambda p: generation_pb2.GenerateRequest(prompt=p)), min_size=CASES_PER_EXAMPLE, max_size=CASES_PER_EXAMPLE))
        def run(batch: list[bytes]) -> None:
            codes = _codes_of([call.future(body, timeout=DEADLINE_S) for body in batch])
            seen.update(codes)
            assert set(codes) <= ALLOWED, [(c, b[:80]) for c, b in zip(codes, batch) if c not in ALLOWED]

        run()
    return seen


def fuzz_generate_stream(target: str) -> Counter:
    seen: Counter = Counter()
    with grpc.insecure_channel(target) as channel:
        call = channel.unary_stream("/magnus.v1.GenerationService/GenerateStream")

        @settings(max_examples=NUM_EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck))
        @given(st.lists(payloads(lambda p: generation_pb2.GenerateStreamRequest(prompt=p)), min_size=CASES_PER_EXAMPLE, max_size=CASES_PER_EXAMPLE))
        def run(batch: list[bytes]) -> None:
            streams = [call(body, timeout=DEADLINE_S) for body in batch]
            codes = []
            for stream in streams:
                try:
                    events = [generation_pb2.GenerateStreamResponse.FromString(e) for e in stream]
                    assert events[-1].phase == generation_pb2.REQUEST_PHASE_FINISHED
                    codes.append(grpc.StatusCode.OK)
                except grpc.RpcError as error:
                    codes.append(error.code())
            seen.update(codes)
            assert set(codes) <= ALLOWED, [(c, b[:80]) for c, b in zip(codes, batch) if c not in ALLOWED]

        run()
    return seen


def _serving(target: str) -> int:
    with grpc.insecure_channel(target) as channel:
        return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5).status


@pytest.mark.asyncio
@pytest.mark.parametrize("fuzz", [fuzz_generate, fuzz_generate_stream], ids=["Generate", "GenerateStream"])
async def test_every_fuzzed_call_gets_a_status_and_the_server_lives(fuzz, caplog):
    async with inprocess_batcher(SETTINGS) as runner:
        target = f"127.0.0.1:{runner.port}"
        seen = await asyncio.to_thread(fuzz, target)  # hypothesis is synchronous; the server runs here
        print(f"{fuzz.__name__}: {dict(seen)}")
        assert sum(seen.values()) >= NUM_EXAMPLES * CASES_PER_EXAMPLE
        # both paths were exercised: requests that ran to completion and requests refused by name
        assert seen[grpc.StatusCode.OK] > 0 and seen[grpc.StatusCode.INVALID_ARGUMENT] > 0
        assert await asyncio.to_thread(_serving, target) == health_pb2.HealthCheckResponse.SERVING
    assert "unhandled error" not in caplog.text


@pytest.mark.asyncio
async def test_a_message_over_the_size_limit_is_refused():
    small = BatcherSettings(port=0, max_message_bytes=64 * 1024)
    async with inprocess_batcher(small) as runner:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{runner.port}") as channel:
            call = channel.unary_unary("/magnus.v1.GenerationService/Generate")
            prompt = generation_pb2.Prompt(user_input="x" * (128 * 1024), max_new_tokens=1)
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await call(generation_pb2.GenerateRequest(prompt=prompt).SerializeToString(), timeout=5)
            assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
