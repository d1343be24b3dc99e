"""Fixtures for trainer tests: temp SQLite log DB, model store, log-row writers, replicas."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
import pytest_asyncio

from services.estimator.config import EstimatorSettings
from services.estimator.server import EstimatorServer
from services.predictor.config import PredictorSettings
from services.predictor.server import PredictorServer
from services.shared.db.models import BatchRow, RequestRow, utc_now
from services.shared.model_store import ModelStore


@pytest.fixture
def add_requests(store: ModelStore) -> Callable[..., object]:
    """Append completed request rows: tuples (input_tokens, predicted, generated[, status, fallback])."""

    async def add(rows, instruction: str = "A") -> None:
        async with store.session_factory() as session, session.begin():
            for row in rows:
                input_tokens, predicted, generated, *rest = row
                status = rest[0] if rest else "completed"
                is_fallback = rest[1] if len(rest) > 1 else False
                session.add(
                    RequestRow(
                        id=str(uuid.uuid4()), instruction=instruction, input_text=f"text of {input_tokens}",
                        input_tokens=input_tokens, max_new_tokens=4096, predicted_tokens=predicted,
                        predictor_version=1, is_prediction_fallback=is_fallback, generated_tokens=generated,
                        status=status, arrived_at=utc_now(),
                    )
                )
                await session.flush()  # one row at a time, so seq follows the list order

    return add


@pytest.fixture
def add_batches(store: ModelStore) -> Callable[..., object]:
    """Append batch rows: tuples (size, L, G_actual, estimated_s, actual_s[, outcome])."""

    async def add(rows) -> None:
        async with store.session_factory() as session, session.begin():
            for size, input_max, gen_max, estimated_s, actual_s, *rest in rows:
                session.add(
                    BatchRow(
                        id=str(uuid.uuid4()), size=size, input_tokens_max=input_max,
                        predicted_gen_tokens_max=gen_max, actual_gen_tokens_max=gen_max,
                        estimated_s=estimated_s, actual_s=actual_s, worker_id="w0", estimator_version=1,
                        outcome=rest[0] if rest else "ok",
                    )
                )
                await session.flush()

    return add


@pytest_asyncio.fixture
async def start_server(db_url: str, store_dir: Path) -> AsyncIterator[Callable[..., object]]:
    """Start a predictor or estimator replica on port 0; returns (server, "127.0.0.1:port")."""
    servers = []

    async def start(kind: str):
        common = dict(port=0, database_url=db_url, model_store_dir=store_dir, load_retry_s=0.05)
        server = PredictorServer(PredictorSettings(**common)) if kind == "predictor" else EstimatorServer(
            EstimatorSettings(**common)
        )
        port = await server.start()
        servers.append(server)
        for _ in range(250):  # a model was stored before the start: wait until it serves
            if server.slot.current is not None:
                break
            await asyncio.sleep(0.02)
        return server, f"127.0.0.1:{port}"

    yield start
    for server in servers:
        await server.stop(grace_s=0)
