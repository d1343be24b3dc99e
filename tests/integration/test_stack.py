"""The five services as real processes: concurrent Generate, the log DB, batching by length."""

from __future__ import annotations

import asyncio
import sqlite3

import grpc
import pytest
from grpc_health.v1 import health_pb2

from magnus.v1 import generation_pb2, generation_pb2_grpc
from services.core.dataset import read_task_rows
from services.shared.tokenizer import get_token_counter
from tools.demo import DEFAULT_DATA_DIR as DATA_DIR
from tools.stack import SERVICES

pytestmark = pytest.mark.integration

SHORT_TASKS = ("detox", "gec")
LONG_TASKS = ("bugfix", "code_trans_java2cs")


def workload(num_per_task: int = 6) -> list[tuple[str, generation_pb2.Prompt]]:
    """Short tasks' rows with <= 20 output tokens and long tasks' rows with 120..200."""
    counter = get_token_counter()
    prompts = []
    for task in SHORT_TASKS + LONG_TASKS:
        low, high = (1, 20) if task in SHORT_TASKS else (120, 200)
        picked = 0
        for row in read_task_rows(DATA_DIR / f"{task}.jsonl", max_rows=1000)[::-1]:
            length = counter.count(row.output_text)
            if picked == num_per_task or not low <= length <= high:
                continue
            picked += 1
            prompt = generation_pb2.Prompt(
                instruction=row.instruction, user_input=row.input_text, max_new_tokens=min(length, 160)
            )
            prompts.append((task, prompt))
    return prompts


def test_every_service_reports_serving(full_stack):
    for name in SERVICES:
        assert full_stack.health(name) == health_pb2.HealthCheckResponse.SERVING, name


def test_concurrent_generate_answers_logs_and_batches_by_length(full_stack):
    prompts = workload()

    async def send_all():
        async with grpc.aio.insecure_channel(full_stack.target("batcher")) as channel:
            stub = generation_pb2_grpc.GenerationServiceStub(channel)
            return await asyncio.gather(
                *(stub.Generate(generation_pb2.GenerateRequest(prompt=p), timeout=300) for _, p in prompts)
            )

    responses = asyncio.run(send_all())
    assert len(responses) == len(prompts)
    for (task, prompt), response in zip(prompts, responses):
        assert 1 <= response.generated_tokens <= prompt.max_new_tokens, task
        assert response.predicted_tokens >= 1
        assert response.input_tokens == get_token_counter().count(f"{prompt.instruction}\n{prompt.user_input}")
        assert response.batch_id and response.batch_size >= 1
        assert not response.is_prediction_fallback
        timings = response.timings
        assert timings.queued_at.ToDatetime() <= timings.started_at.ToDatetime() <= timings.finished_at.ToDatetime()

    # the log DB: one completed request row each, one ok batch row per batch, sizes consistent
    full_stack_db = full_stack.database_url.removeprefix("sqlite+aiosqlite:///")
    ids = {r.request_id for r in responses}

    def read_rows():
        with sqlite3.connect(full_stack_db) as db:
            requests = {
                row[0]: row[1:]
                for row in db.execute("SELECT id, status, generated_tokens, predicted_tokens, batch_id FROM requests")
            }
            batches = {row[0]: row[1:] for row in db.execute("SELECT id, size, outcome, actual_s FROM batches")}
        return requests, batches

    for _ in range(50):  # the log is written off the request path; give it a moment
        requests, batches = read_rows()
        if ids <= requests.keys() and {r.batch_id for r in responses} <= batches.keys():
            break
        asyncio.run(asyncio.sleep(0.1))
    for response in responses:
        status, generated, predicted, batch_id = requests[response.request_id]
        assert (status, generated, predicted, batch_id) == (
            "completed", response.generated_tokens, response.predicted_tokens, response.batch_id
        )
        size, outcome, actual_s = batches[response.batch_id]
        assert (size, outcome) == (response.batch_size, "ok") and actual_s > 0

    # batched by predicted length: no batch mixes the short tasks with the long ones
    by_batch: dict[str, list[tuple[str, int]]] = {}
    for (task, _), response in zip(prompts, responses):
        by_batch.setdefault(response.batch_id, []).append((task, response.predicted_tokens))
    shared = [members for members in by_batch.values() if len(members) > 1]
    assert shared, "no batch held more than one request: nothing was batched"
    for members in shared:
        kinds = {task in SHORT_TASKS for task, _ in members}
        assert len(kinds) == 1, f"a batch mixed short and long tasks: {members}"


def test_generate_stream_reports_lifecycle(full_stack):
    async def stream():
        async with grpc.aio.insecure_channel(full_stack.target("batcher")) as channel:
            stub = generation_pb2_grpc.GenerationServiceStub(channel)
            prompt = generation_pb2.Prompt(instruction="Fix:", user_input="int a = 1", max_new_tokens=5)
            return [e async for e in stub.GenerateStream(generation_pb2.GenerateStreamRequest(prompt=prompt))]

    events = asyncio.run(stream())
    phases = [e.phase for e in events]
    # QUEUED, STARTED, the decoded text as TOKENS events (at least the final rest of it), FINISHED
    assert phases[:2] == [generation_pb2.REQUEST_PHASE_QUEUED, generation_pb2.REQUEST_PHASE_STARTED]
    assert phases[-1] == generation_pb2.REQUEST_PHASE_FINISHED
    assert set(phases[2:-1]) == {generation_pb2.REQUEST_PHASE_TOKENS}
    deltas = [e for e in events if e.phase == generation_pb2.REQUEST_PHASE_TOKENS]
    assert "".join(e.text_delta for e in deltas) == events[-1].result.text
    assert events[-1].result.generated_tokens <= 5 and events[-1].result.request_id == events[0].request_id


def test_retry_with_same_client_request_id_runs_once(full_stack):
    async def twice():
        async with grpc.aio.insecure_channel(full_stack.target("batcher")) as channel:
            stub = generation_pb2_grpc.GenerationServiceStub(channel)
            prompt = generation_pb2.Prompt(
                user_input="hello", max_new_tokens=3, client_request_id="retry-1", tenant_id="t"
            )
            request = generation_pb2.GenerateRequest(prompt=prompt)
            first, second = await asyncio.gather(stub.Generate(request), stub.Generate(request))
            third = await stub.Generate(request)
            return first, second, third

    first, second, third = asyncio.run(twice())
    assert first.request_id == second.request_id == third.request_id
