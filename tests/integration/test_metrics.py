"""Every service's /metrics during a real run: the RPC and domain metrics move with the workload."""

from __future__ import annotations

import asyncio
import time
import urllib.request

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from magnus.v1 import generation_pb2, generation_pb2_grpc, trainer_pb2, trainer_pb2_grpc
from tests.integration.test_stack import workload
from tools.stack import SERVICES

pytestmark = pytest.mark.integration

Samples = dict[tuple[str, frozenset], float]


def scrape(url: str) -> Samples:
    with urllib.request.urlopen(url, timeout=5) as response:
        text = response.read().decode()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    """Sum of the samples of `name` whose labels include `labels` (0 when absent)."""
    wanted = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and wanted <= ls)


def rpcs(samples: Samples, method: str, code: str = "OK") -> float:
    return value(samples, "magnus_rpc_requests_total", grpc_method=method, grpc_code=code)


def scrape_all(stack) -> dict[str, Samples]:
    return {name: scrape(stack.metrics_url(name)) for name in SERVICES}


def test_every_service_exports_rpc_and_domain_metrics_that_move(full_stack):
    before = scrape_all(full_stack)
    prompts = [p for _, p in workload(num_per_task=2)]

    async def send_all():
        async with grpc.aio.insecure_channel(full_stack.target("batcher")) as channel:
            stub = generation_pb2_grpc.GenerationServiceStub(channel)
            responses = await asyncio.gather(
                *(stub.Generate(generation_pb2.GenerateRequest(prompt=p), timeout=300) for p in prompts)
            )
            # one malformed request, so a non-OK status code is counted too
            with pytest.raises(grpc.aio.AioRpcError):
                await stub.Generate(generation_pb2.GenerateRequest(prompt=generation_pb2.Prompt()), timeout=10)
        async with grpc.aio.insecure_channel(full_stack.target("trainer")) as channel:
            await trainer_pb2_grpc.TrainerServiceStub(channel).GetStatus(trainer_pb2.GetStatusRequest(), timeout=30)
        return responses

    responses = asyncio.run(send_all())
    num = len(responses)
    time.sleep(0.5)  # the worker counts its batch after CompleteBatch returns
    after = scrape_all(full_stack)

    def moved(service: str, name: str, **labels: str) -> float:
        return value(after[service], name, **labels) - value(before[service], name, **labels)

    # batcher: per-RPC counts by status, and the domain metrics of every completed request/batch
    assert rpcs(after["batcher"], "Generate") - rpcs(before["batcher"], "Generate") == num
    assert rpcs(after["batcher"], "Generate", "INVALID_ARGUMENT") - rpcs(before["batcher"], "Generate", "INVALID_ARGUMENT") == 1
    assert moved("batcher", "magnus_rpc_duration_seconds_count", grpc_method="Generate") == num + 1
    assert moved("batcher", "magnus_length_prediction_error_tokens_count") == num
    assert moved("batcher", "magnus_generated_tokens_total") == sum(r.generated_tokens for r in responses)
    assert moved("batcher", "magnus_predicted_tokens_total") == sum(r.predicted_tokens for r in responses)
    num_batches = len({r.batch_id for r in responses})
    assert moved("batcher", "magnus_batches_total", outcome="ok") == num_batches
    assert moved("batcher", "magnus_batch_size_requests_count") >= num_batches
    assert moved("batcher", "magnus_batch_size_requests_sum") >= num
    assert moved("batcher", "magnus_batch_wma_token_reads_count") >= num_batches
    assert moved("batcher", "magnus_batch_padding_ratio_count") == num_batches
    assert moved("batcher", "magnus_request_queue_wait_seconds_count") >= num
    assert value(after["batcher"], "magnus_workers") == 1
    assert value(after["batcher"], "magnus_queue_requests") == 0  # everything answered
    assert value(after["batcher"], "magnus_pending_requests") == 0
    assert moved("batcher", "magnus_rpc_requests_total", grpc_method="CompleteBatch", grpc_code="OK") == num_batches

    # predictor and estimator: asked by the batcher, serving a stored model version
    assert moved("predictor", "magnus_rpc_requests_total", grpc_method="PredictLengths", grpc_code="OK") >= 1
    assert value(after["predictor"], "magnus_model_version", kind="predictor") >= 1
    assert value(after["estimator"], "magnus_model_version", kind="estimator") >= 1
    assert value(after["estimator"], "magnus_rpc_requests_total", grpc_method="EstimateBatchTime") >= 1

    # worker: batches, tokens and busy time
    assert moved("worker", "magnus_worker_batches_total", outcome="ok") == num_batches
    assert moved("worker", "magnus_worker_valid_tokens_total") == sum(r.generated_tokens for r in responses)
    assert moved("worker", "magnus_worker_slot_tokens_total") >= moved("worker", "magnus_worker_valid_tokens_total")
    assert moved("worker", "magnus_worker_busy_seconds_total") > 0
    assert moved("worker", "magnus_worker_batch_run_seconds_count") == num_batches

    # trainer: its own RPCs are counted like everyone's
    assert moved("trainer", "magnus_rpc_requests_total", grpc_method="GetStatus", grpc_code="OK") == 1

    # trainer: its training metrics are exported from the start, for both kinds
    names = {n for n, _ in after["trainer"]}
    for name in ("magnus_trainer_rounds_total", "magnus_trainer_samples_added_total", "magnus_trainer_versions_total"):
        assert name in names, name
    for kind in ("predictor", "estimator"):
        assert (
            "magnus_trainer_rounds_total", frozenset({"kind": kind, "outcome": "trained"}.items())
        ) in after["trainer"], kind
