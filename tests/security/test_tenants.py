"""Tenants bound to API keys, over real gRPC: a key acts for its own tenant only (quotas, idempotency
keys), and an idempotency key is bound to the request it was first used for, also after a restart
(the log DB on SQLite and on PostgreSQL)."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import grpc
import pytest
import pytest_asyncio

from magnus.v1 import generation_pb2, generation_pb2_grpc
from services.batcher.config import BatcherSettings
from services.batcher.logged_results import LoggedResultLookup
from services.shared.auth import AuthSettings, api_key_entry, bearer_metadata
from services.shared.db import RequestRow
from tests.databases import migrated_log_db
from tests.inprocess_batcher import inprocess_batcher

ACME_KEY, BETA_KEY = "acme-key-0c1d", "beta-key-77e2"
AUTH = AuthSettings(
    service_token="svc-token-e41f", api_keys=f"{api_key_entry('acme', ACME_KEY)},{api_key_entry('beta', BETA_KEY)}"
)
ACME, BETA = bearer_metadata(ACME_KEY), bearer_metadata(BETA_KEY)


def _prompt(user_input: str = "fix this sentence please", *, tenant: str = "", request_id: str = "", max_new_tokens=4):
    return generation_pb2.Prompt(
        user_input=user_input, max_new_tokens=max_new_tokens, tenant_id=tenant, client_request_id=request_id
    )


async def _generate(stub, prompt, metadata) -> generation_pb2.GenerateResponse | grpc.aio.AioRpcError:
    try:
        return await stub.Generate(generation_pb2.GenerateRequest(prompt=prompt), metadata=metadata, timeout=10)
    except grpc.aio.AioRpcError as error:
        return error


async def _queued(stub, prompt, metadata):
    """Open a stream and wait until the request is admitted (QUEUED); returns the live call."""
    call = stub.GenerateStream(generation_pb2.GenerateStreamRequest(prompt=prompt), metadata=metadata, timeout=30)
    assert (await call.read()).phase == generation_pb2.REQUEST_PHASE_QUEUED
    return call


@pytest.mark.asyncio
async def test_a_key_cannot_spend_another_tenants_quota():
    settings = BatcherSettings(port=0, max_pending_per_tenant=2)
    async with inprocess_batcher(settings, auth=AUTH, with_worker=False) as runner:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{runner.port}") as channel:
            stub = generation_pb2_grpc.GenerationServiceStub(channel)
            # empty tenant_id = the key's tenant; naming it explicitly is the same
            beta = [await _queued(stub, _prompt(), BETA), await _queued(stub, _prompt(tenant="beta"), BETA)]
            assert dict(runner.scheduler.pending_by_tenant) == {"beta": 2}
            full = await _generate(stub, _prompt(), BETA)
            assert full.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "tenant 'beta'" in full.details()
            # beta's key may not queue on acme's (or anyone's) quota by naming it
            for other in ("acme", "nobody"):
                spoofed = await _generate(stub, _prompt(tenant=other), BETA)
                assert spoofed.code() == grpc.StatusCode.PERMISSION_DENIED, other
                assert "belongs to tenant 'beta'" in spoofed.details()
            assert dict(runner.scheduler.pending_by_tenant) == {"beta": 2}, "nothing was admitted for acme"
            acme = await _queued(stub, _prompt(), ACME)  # acme's quota is untouched
            assert dict(runner.scheduler.pending_by_tenant) == {"beta": 2, "acme": 1}
            for call in [*beta, acme]:
                call.cancel()


@pytest.mark.asyncio
async def test_idempotency_keys_are_per_tenant_and_bound_to_the_request():
    async with inprocess_batcher(BatcherSettings(port=0), auth=AUTH) as runner:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{runner.port}") as channel:
            stub = generation_pb2_grpc.GenerationServiceStub(channel)
            first = await _generate(stub, _prompt(request_id="r1"), ACME)
            assert isinstance(first, generation_pb2.GenerateResponse)
            again = await _generate(stub, _prompt(request_id="r1", tenant="acme"), ACME)
            assert again.request_id == first.request_id, "a retry gets the first answer, not a second run"

            # the holder of beta's key can neither read nor block acme's id
            stolen = await _generate(stub, _prompt(request_id="r1", tenant="acme"), BETA)
            assert stolen.code() == grpc.StatusCode.PERMISSION_DENIED
            beta_own = await _generate(stub, _prompt("something else entirely", request_id="r1"), BETA)
            assert isinstance(beta_own, generation_pb2.GenerateResponse)
            assert beta_own.request_id != first.request_id, "the same id of another tenant is another request"

            # the same tenant and id with another prompt, or another length cap, is refused by name
            for changed in (_prompt("a different prompt", request_id="r1"), _prompt(request_id="r1", max_new_tokens=5)):
                refused = await _generate(stub, changed, ACME)
                assert refused.code() == grpc.StatusCode.ALREADY_EXISTS
                assert "'r1' was already used for a different request" in refused.details()
            stream = stub.GenerateStream(
                generation_pb2.GenerateStreamRequest(prompt=_prompt("other", request_id="r1")), metadata=ACME, timeout=10
            )
            with pytest.raises(grpc.aio.AioRpcError) as streamed:
                await stream.read()
            assert streamed.value.code() == grpc.StatusCode.ALREADY_EXISTS


@pytest.mark.asyncio
async def test_an_in_flight_idempotency_key_refuses_another_request_and_joins_a_retry():
    async with inprocess_batcher(BatcherSettings(port=0), auth=AUTH, with_worker=False) as runner:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{runner.port}") as channel:
            stub = generation_pb2_grpc.GenerationServiceStub(channel)
            first = await _queued(stub, _prompt(request_id="r2"), ACME)
            refused = await _generate(stub, _prompt("not the same", request_id="r2"), ACME)
            assert refused.code() == grpc.StatusCode.ALREADY_EXISTS
            retry = asyncio.ensure_future(_generate(stub, _prompt(request_id="r2"), ACME))
            await asyncio.sleep(0.2)
            assert not retry.done() and len(runner.scheduler.pending) == 1, "the retry waits on the first call"
            retry.cancel()
            first.cancel()


@pytest_asyncio.fixture(params=["sqlite", "postgresql"])
async def log_db(request, tmp_path):
    """A migrated log DB with one completed request of tenant acme under id "logged"."""
    async with migrated_log_db(request.param, tmp_path) as (_, session_factory):
        now = datetime.now(UTC)
        async with session_factory() as session, session.begin():
            session.add(
                RequestRow(
                    id="00000000-0000-0000-0000-00000000beef", client_request_id="logged", tenant_id="acme",
                    instruction="", input_text="fix this sentence please", input_tokens=5, max_new_tokens=4,
                    predicted_tokens=3, is_prediction_fallback=False, generated_tokens=2, output_text="answered",
                    batch_id=None, status="completed", arrived_at=now - timedelta(seconds=2),
                    started_at=now - timedelta(seconds=1), finished_at=now,
                )
            )
        yield session_factory


@pytest.mark.asyncio
async def test_after_a_restart_the_log_answers_the_same_request_and_refuses_another(log_db):
    lookup = LoggedResultLookup(log_db)
    async with inprocess_batcher(BatcherSettings(port=0), auth=AUTH, logged_result=lookup) as runner:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{runner.port}") as channel:
            stub = generation_pb2_grpc.GenerationServiceStub(channel)
            again = await _generate(stub, _prompt(request_id="logged"), ACME)
            assert (again.request_id, again.text) == ("00000000-0000-0000-0000-00000000beef", "answered")
            refused = await _generate(stub, _prompt("another prompt", request_id="logged"), ACME)
            assert refused.code() == grpc.StatusCode.ALREADY_EXISTS
            refused = await _generate(stub, _prompt(request_id="logged", max_new_tokens=8), ACME)
            assert refused.code() == grpc.StatusCode.ALREADY_EXISTS
            beta = await _generate(stub, _prompt("another prompt", request_id="logged"), BETA)
            assert beta.text == "ok", "beta's id 'logged' is its own: it runs (echo worker)"
            assert not runner.scheduler.pending
