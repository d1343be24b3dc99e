"""The whole stack as real processes with TLS and API keys on, driven by the project's own tools.

tools/stack.py must see health through TLS, the demo must get answers with an API key (and none
without one, or over plaintext), and the supervisor of `make serve` must bring a killed service
back to SERVING.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import shutil
import time

import pytest
from grpc_health.v1 import health_pb2

from magnus.v1 import model_admin_pb2, model_admin_pb2_grpc
from services.shared.auth import api_key_entry
from services.shared.tls import TlsSettings
from tests.integration.test_node_client import INSTRUCTION, run_client
from tests.security.certs import make_certs
from tools import demo
from tools.stack import SERVICES, Stack
from tools.supervise import BackoffPolicy, Supervisor

pytestmark = pytest.mark.integration

TENANT = "acme"


@pytest.fixture(scope="module")
def secure_stack(tmp_path_factory, prepared_stack_db):
    workdir = tmp_path_factory.mktemp("secure-stack")
    certs = make_certs(workdir / "certs")
    shutil.copy(prepared_stack_db[0], workdir / "log.db")
    api_key = secrets.token_urlsafe(32)
    stack = Stack(
        workdir=workdir,
        database_url=f"sqlite+aiosqlite:///{workdir / 'log.db'}",
        model_store_dir=prepared_stack_db[1],
        extra_env={
            "MAGNUS_TLS_CERT_FILE": str(certs.server_cert),
            "MAGNUS_TLS_KEY_FILE": str(certs.server_key),
            "MAGNUS_TLS_CA_FILE": str(certs.ca),
            "MAGNUS_AUTH_SERVICE_TOKEN": secrets.token_urlsafe(32),
            "MAGNUS_AUTH_API_KEYS": api_key_entry(TENANT, api_key),
        },
    )
    stack.start_all()
    try:
        stack.wait_healthy(timeout_s=180)  # through TLS: a plaintext health check never succeeds
        yield stack, certs, api_key
    finally:
        stack.stop_all()


def run_demo(stack: Stack, access: demo.ClientAccess, num_requests: int) -> dict:
    requests = demo.load_requests(demo.DEFAULT_DATA_DIR, num_requests, max_new_tokens_cap=8, seed=1)
    outcomes = asyncio.run(demo.run_workload(stack.target("batcher"), requests, rate_per_s=50.0, seed=1, access=access))
    return demo.summarize(outcomes)


def test_demo_gets_answers_over_tls_with_an_api_key(secure_stack):
    stack, certs, api_key = secure_stack
    assert stack.tls_settings().is_enabled and stack.auth_settings().is_enabled
    access = demo.ClientAccess(tls=TlsSettings(ca_file=certs.ca), api_key=api_key, tenant_id="")
    summary = run_demo(stack, access, num_requests=8)
    assert (summary["num_answered"], summary["errors"]) == (8, [])


def test_without_a_key_or_over_plaintext_nothing_is_answered(secure_stack):
    stack, certs, api_key = secure_stack
    no_key = run_demo(stack, demo.ClientAccess(tls=TlsSettings(ca_file=certs.ca), tenant_id=""), num_requests=2)
    assert no_key["num_answered"] == 0
    assert all(e.startswith("UNAUTHENTICATED") for e in no_key["errors"]), no_key["errors"]
    plaintext = run_demo(stack, demo.ClientAccess(api_key=api_key, tenant_id=""), num_requests=2)
    assert plaintext["num_answered"] == 0
    assert all(e.startswith("UNAVAILABLE") for e in plaintext["errors"]), plaintext["errors"]
    other_tenant = demo.ClientAccess(tls=TlsSettings(ca_file=certs.ca), api_key=api_key, tenant_id="someone-else")
    assert run_demo(stack, other_tenant, num_requests=1)["num_answered"] == 0


def test_node_client_with_tls_ca_and_an_api_key(secure_stack):
    stack, certs, api_key = secure_stack
    prompt = ("--instruction", INSTRUCTION, "--input", "She go to school yesterday .", "--max-new-tokens", "4")
    answered = run_client(stack, *prompt, "--tls-ca", str(certs.ca), "--api-key", api_key)
    assert answered.returncode == 0, answered.stderr
    assert 1 <= json.loads(answered.stdout)["generated_tokens"] <= 4
    from_env = run_client(stack, *prompt, "--tls-ca", str(certs.ca), env={**os.environ, "MAGNUS_API_KEY": api_key})
    assert from_env.returncode == 0, from_env.stderr
    no_key = run_client(stack, *prompt, "--tls-ca", str(certs.ca), env={k: v for k, v in os.environ.items() if k != "MAGNUS_API_KEY"})
    assert no_key.returncode == 1, (no_key.stdout, no_key.stderr)
    assert json.loads(no_key.stderr)["error"]["code"] == "UNAUTHENTICATED"
    plaintext = run_client(stack, *prompt, "--api-key", api_key)
    assert json.loads(plaintext.stderr)["error"]["code"] == "UNAVAILABLE"


def test_stack_channel_carries_tls_and_the_service_token(secure_stack):
    stack, _, _ = secure_stack

    async def model_version() -> int:
        async with stack.open_channel("predictor") as channel:
            stub = model_admin_pb2_grpc.ModelAdminServiceStub(channel)
            return (await stub.GetModelInfo(model_admin_pb2.GetModelInfoRequest(), timeout=10)).model.version

    assert asyncio.run(model_version()) >= 1


def test_supervisor_restarts_a_killed_service_until_it_serves_again(secure_stack):
    stack, _, _ = secure_stack
    said: list[str] = []
    supervisor = Supervisor(stack, BackoffPolicy(initial_delay_s=0.5, max_restarts=3), say=said.append, poll_interval_s=0.2)
    supervisor.start()
    try:
        old_pid = stack.processes["estimator"].pid
        stack.kill("estimator")
        deadline_s = time.monotonic() + 60
        while time.monotonic() < deadline_s and not any("estimator is SERVING again" in line for line in said):
            time.sleep(0.2)
    finally:
        supervisor.stop()
    assert any(line.startswith("supervisor: estimator exited with -9") for line in said), said
    assert any("restarted estimator" in line for line in said), said
    assert any("estimator is SERVING again" in line for line in said), said
    assert stack.processes["estimator"].pid != old_pid
    assert all(stack.health(name) == health_pb2.HealthCheckResponse.SERVING for name in SERVICES)
    assert supervisor.records["estimator"].num_restarts == 1
