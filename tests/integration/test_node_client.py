"""The Node.js client (clients/node) against the running batcher: the polyglot API, tested.

`make test` installs its packages first (`make node-deps`, i.e. `npm ci`); a missing `node` or
missing packages fail this test rather than skip it. Its TLS and API-key options are tested
against the TLS stack in tests/security/test_tls_stack.py.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import uuid

import pytest

from tools.stack import REPO_ROOT

pytestmark = pytest.mark.integration

CLIENT_DIR = REPO_ROOT / "clients" / "node"
INSTRUCTION = "Correct the grammatical errors in the following text:"


def run_client(stack, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """generate.js against the stack's batcher; `env` replaces the environment (MAGNUS_API_KEY)."""
    node = shutil.which("node")
    assert node, "node is not installed (the client test needs Node.js >= 18)"
    assert (CLIENT_DIR / "node_modules" / "@grpc" / "grpc-js").is_dir(), "run `make node-deps` first"
    return subprocess.run(
        [node, str(CLIENT_DIR / "generate.js"), "--target", stack.target("batcher"), *args],
        capture_output=True,
        text=True,
        timeout=180,
        env=env,
    )


def test_node_generate_returns_a_result(full_stack):
    result = run_client(
        full_stack, "--instruction", INSTRUCTION, "--input", "She go to school yesterday .", "--max-new-tokens", "8"
    )
    assert result.returncode == 0, result.stderr
    response = json.loads(result.stdout)
    uuid.UUID(response["request_id"])
    assert 1 <= response["generated_tokens"] <= 8
    assert response["predicted_tokens"] >= 1
    assert response["input_tokens"] > 5
    assert response["batch_id"] and response["batch_size"] >= 1
    assert isinstance(response["text"], str)


def test_node_generate_stream_reports_every_phase(full_stack):
    result = run_client(
        full_stack, "--stream", "--instruction", INSTRUCTION, "--input", "He have two cat .", "--max-new-tokens", "4"
    )
    assert result.returncode == 0, result.stderr
    events = [json.loads(line) for line in result.stdout.splitlines()]
    phases = [e["phase"] for e in events]
    # QUEUED, STARTED, the text as TOKENS events, FINISHED
    assert phases[:2] == ["REQUEST_PHASE_QUEUED", "REQUEST_PHASE_STARTED"] and phases[-1] == "REQUEST_PHASE_FINISHED"
    assert set(phases[2:-1]) == {"REQUEST_PHASE_TOKENS"}
    deltas = "".join(e.get("textDelta", e.get("text_delta", "")) for e in events if e["phase"] == "REQUEST_PHASE_TOKENS")
    assert deltas == events[-1]["result"]["text"]
    assert len({e["request_id"] for e in events}) == 1
    assert 1 <= events[-1]["result"]["generated_tokens"] <= 4


def test_node_client_sees_status_codes(full_stack):
    result = run_client(full_stack, "--input", "", "--max-new-tokens", "4")
    assert result.returncode == 1
    error = json.loads(result.stderr)["error"]
    assert error["code"] == "INVALID_ARGUMENT"
    assert error["details"].startswith("prompt.user_input")
