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
# ALREADY_EXISTS: a client_request_id drawn twice for two different prompts of one tenant.
ALLOWED = {
    grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.ALREADY_EXISTS,
}
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


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        low, value = value & 0x7F, value >> 7
        out.append(low | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _in_prompt(prompt_fields: bytes) -> bytes:
    """A GenerateRequest whose prompt (field 1) is the given raw field bytes after a valid user_input."""
    inner = b"\x12\x05hello" + prompt_fields  # user_input = "hello"
    return b"\x0a" + _varint(len(inner)) + inner


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("payload", "says"),
    [
        # max_new_tokens (#3, int32) sent length-delimited: protobuf would call it an unknown field
        (_in_prompt(b"\x1a\x02ab"), "prompt.max_new_tokens: sent with wire type length-delimited, but the field is int32"),
        # ... or as a fixed 32-bit value
        (_in_prompt(b"\x1d\x04\x00\x00\x00"), "prompt.max_new_tokens: sent with wire type 32-bit"),
        # 2**32 + 4 would be cut to 4 (and 2**32 to 0: "got 0"): the value sent is named
        (_in_prompt(b"\x18" + _varint(2**32 + 4)), "prompt.max_new_tokens: 4294967300 does not fit in int32"),
        (_in_prompt(b"\x18" + _varint(2**32)), "prompt.max_new_tokens: 4294967296 does not fit in int32"),
        # tenant_id (#5, string) sent as a varint
        (_in_prompt(b"\x18\x04\x28\x01"), "prompt.tenant_id: sent with wire type varint, but the field is string"),
        # a field this version does not know is still called that
        (_in_prompt(b"\x18\x04\xf8\x01\x01"), "unknown field prompt#31"),
    ],
    ids=["len-for-int32", "fixed32-for-int32", "overflow", "overflow-to-zero", "varint-for-string", "unknown"],
)
async def test_wire_errors_are_named_for_what_they_are(payload, says):
    async with inprocess_batcher(SETTINGS) as runner:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{runner.port}") as channel:
            for method in ("Generate", "GenerateStream"):
                if method == "Generate":
                    call = channel.unary_unary(f"/magnus.v1.GenerationService/{method}")(payload, timeout=5)
                else:
                    call = channel.unary_stream(f"/magnus.v1.GenerationService/{method}")(payload, timeout=5).read()
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await call
                assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                assert says in refused.value.details(), refused.value.details()


def test_valid_encodings_are_not_wire_problems():
    """Negative int32s (10-byte varints), packed and unpacked repeated scalars and nested messages pass."""
    from magnus.v1 import predictor_pb2
    from services.shared.validation import find_wire_problem

    request = generation_pb2.GenerateRequest(prompt=generation_pb2.Prompt(user_input="x", max_new_tokens=-(2**31)))
    assert find_wire_problem(generation_pb2.GenerateRequest, request.SerializeToString()) is None
    packed = predictor_pb2.PredictLengthsResponse(predicted_tokens=[1, 2**31 - 1, -5]).SerializeToString()
    assert find_wire_problem(predictor_pb2.PredictLengthsResponse, packed) is None
    unpacked = b"".join(b"\x08" + _varint(v) for v in (1, 2, 3))
    assert find_wire_problem(predictor_pb2.PredictLengthsResponse, unpacked) is None
