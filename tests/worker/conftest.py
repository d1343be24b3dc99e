"""Worker test fixtures: the tiny model is built once (idempotently, under var/) and loaded once."""

from __future__ import annotations

import pytest

from services.shared.settings import DEFAULT_MODEL_DIR
from services.worker.engine import StaticBatchEngine
from services.worker.model_builder import build_tiny_qwen2


@pytest.fixture(scope="session")
def tiny_model_dir():
    return build_tiny_qwen2(DEFAULT_MODEL_DIR)


@pytest.fixture(scope="session")
def engine(tiny_model_dir) -> StaticBatchEngine:
    # float32 on CPU: padded and unpadded rows then agree to the last greedy token.
    return StaticBatchEngine(tiny_model_dir, device="cpu", dtype="float32", cpu_kv_budget_bytes=3 * 1024**3)
