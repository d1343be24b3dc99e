"""The paged engine serving the worker's continuous leases (MAGNUS_WORKER_BACKEND=paged), on the tiny
Qwen2 in float32: PagedBatcher answers what transformers' generate answers alone, with a pool small
enough to preempt; and a paged worker in-process answers Generate calls through the real batcher."""

from __future__ import annotations

import asyncio

import grpc
import pytest
import torch
from prometheus_client import REGISTRY

from magnus.v1 import generation_pb2, generation_pb2_grpc
from services.batcher.config import BatcherSettings
from services.shared.server import ServiceRunner
from services.worker.config import WorkerSettings
from services.worker.engine import BatchOutOfMemory, BatchRejected, EngineItem, StaticBatchEngine
from services.worker.paged.scheduler import SchedulerConfig
from services.worker.paged.serving import PagedBatcher, build_paged_engine
from services.worker.server import serve
from tests.inprocess_batcher import inprocess_batcher

TEXTS = ["the quick brown fox", "jumps over", "a lazy dog that sleeps all day long in the sun", "hello",
         "one two three four five six", "what is the capital", "paged attention", "blocks"]


@pytest.fixture(scope="module")
def hf_engine(tiny_model_dir) -> StaticBatchEngine:
    return StaticBatchEngine(tiny_model_dir, device="cpu", dtype="float32", backend="hf")


def alone(hf_engine: StaticBatchEngine, text: str, max_new_tokens: int):
    return hf_engine.run([EngineItem("alone", text, max_new_tokens)]).items[0]


def counter(name: str) -> float:
    return REGISTRY.get_sample_value(name) or 0.0


@pytest.mark.parametrize("overlap", [False, True], ids=["serial", "overlapped"])
def test_paged_batcher_answers_as_generate_alone_with_a_pool_that_preempts(hf_engine, overlap):
    # 24 blocks of 4 tokens (Delta = 512 bytes a token in float32): 96 tokens for 8 requests of up to ~40
    config = SchedulerConfig(max_running=8, token_budget=16, admission="greedy")
    engine = build_paged_engine(hf_engine, config, block_tokens=4, cpu_kv_budget_bytes=96 * 512, cuda_reserve_bytes=0,
                                overlap=overlap)
    batcher = PagedBatcher(hf_engine, engine)
    batcher.start()
    items = [EngineItem(f"r{i}", text, 24, predicted_tokens=4) for i, text in enumerate(TEXTS)]
    futures = [batcher.submit(item) for item in items]
    too_long = batcher.submit(EngineItem("long", "x " * 30, 90))
    results = [future.result(timeout=120) for future in futures]
    with pytest.raises(BatchRejected, match="KV pool"):
        too_long.result(timeout=10)
    batcher.stop(timeout_s=10)
    for item, result in zip(items, results, strict=True):
        expected = alone(hf_engine, item.prompt, item.max_new_tokens)
        assert (result.output.text, result.output.generated_tokens) == (expected.text, expected.generated_tokens)
    assert engine.scheduler.num_preemptions > 0  # predictions of 4 tokens for 24: greedy admission overfills
    assert engine.scheduler.pool.num_free_blocks == engine.scheduler.pool.num_blocks
    assert batcher.free_slots() == 8


@pytest.mark.asyncio
@pytest.mark.parametrize(("overlap", "draft_tokens"), [(False, 0), (True, 0), (True, 4)],
                         ids=["serial", "overlapped", "overlapped-drafting"])
async def test_paged_worker_answers_through_the_batcher(hf_engine, overlap, draft_tokens):
    """Drafting (MAGNUS_WORKER_PAGED_DRAFT_TOKENS) changes the steps, never the answers."""
    batcher_settings = BatcherSettings(port=0, metrics_port=-1, policy="magnus_ccb")
    steps_before = counter("magnus_worker_continuous_steps_total")
    drafts_before = counter("magnus_worker_paged_draft_tokens_total")
    async with inprocess_batcher(batcher_settings, with_worker=False) as batcher:
        settings = WorkerSettings(
            port=0, batcher_target=f"127.0.0.1:{batcher.internal_port}", worker_id="paged-worker", pull_wait_s=0.2,
            mode="continuous", backend="paged", paged_block_tokens=4, paged_max_running=4, paged_token_budget=32,
            kv_budget_bytes=128 * 512, paged_overlap=overlap, paged_draft_tokens=draft_tokens,
        )
        worker = ServiceRunner("worker", settings)
        task = asyncio.create_task(serve(settings, engine=hf_engine, runner=worker))
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{batcher.port}") as channel:
                stub = generation_pb2_grpc.GenerationServiceStub(channel)
                calls = [stub.Generate(generation_pb2.GenerateRequest(
                    prompt=generation_pb2.Prompt(user_input=text, max_new_tokens=12)), timeout=120) for text in TEXTS]
                responses = await asyncio.gather(*calls)
        finally:
            worker.request_shutdown()
            await asyncio.wait_for(task, 30)
    for text, response in zip(TEXTS, responses, strict=True):
        expected = alone(hf_engine, text, 12)
        assert (response.text, response.generated_tokens) == (expected.text, expected.generated_tokens)
    assert counter("magnus_worker_continuous_steps_total") > steps_before
    # the tiny model repeats itself: drafting finds runs to draft, and only when asked to
    assert (counter("magnus_worker_paged_draft_tokens_total") > drafts_before) == (draft_tokens > 0)


@pytest.mark.parametrize("overlap", [False, True], ids=["serial", "overlapped"])
def test_a_failed_step_fails_the_requests_in_hand_and_the_engine_serves_the_next_ones(hf_engine, overlap, monkeypatch):
    """A step that raises (a device OOM) fails the requests in hand with the worker's error, frees their
    blocks, and later requests get exactly their tokens alone: with overlap too, where a step launched
    before the failure is still read by the next turn."""
    config = SchedulerConfig(max_running=8, token_budget=16)
    engine = build_paged_engine(hf_engine, config, block_tokens=4, cpu_kv_budget_bytes=96 * 512, cuda_reserve_bytes=0,
                                overlap=overlap)
    runner, calls = engine.runner, {"n": 0}
    name = "collect" if overlap else "step"
    real = getattr(runner, name)

    def fails_once(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (simulated)")
        return real(*args, **kwargs)

    monkeypatch.setattr(runner, name, fails_once)
    batcher = PagedBatcher(hf_engine, engine)
    batcher.start()
    try:
        first = [batcher.submit(EngineItem(f"a{i}", text, 12, predicted_tokens=12)) for i, text in enumerate(TEXTS[:3])]
        for future in first:
            with pytest.raises(BatchOutOfMemory, match="out of memory in a paged step"):
                future.result(timeout=120)
        items = [EngineItem(f"b{i}", text, 12, predicted_tokens=12) for i, text in enumerate(TEXTS[3:6])]
        results = [batcher.submit(item).result(timeout=120) for item in items]
    finally:
        batcher.stop(timeout_s=10)
    for item, result in zip(items, results, strict=True):
        expected = alone(hf_engine, item.prompt, item.max_new_tokens)
        assert (result.output.text, result.output.generated_tokens) == (expected.text, expected.generated_tokens)
    assert engine.scheduler.pool.num_free_blocks == engine.scheduler.pool.num_blocks
    assert batcher.free_slots() == 8
