"""Client side of the fault tests: send requests, sort every outcome, read the log DB."""

from __future__ import annotations

import asyncio
import sqlite3
import time
import uuid
from dataclasses import dataclass, field

import grpc

from magnus.v1 import generation_pb2, generation_pb2_grpc

PROMPT_TEXT = "She go to school yesterday and buy three apple for his mother ."


def prompt(client_request_id: str, max_new_tokens: int = 24, tenant_id: str = "faults") -> generation_pb2.Prompt:
    return generation_pb2.Prompt(
        instruction="Correct the grammatical errors in the following text:",
        user_input=PROMPT_TEXT,
        max_new_tokens=max_new_tokens,
        client_request_id=client_request_id,
        tenant_id=tenant_id,
    )


def new_ids(num: int, tag: str) -> list[str]:
    return [f"{tag}-{i}-{uuid.uuid4().hex[:8]}" for i in range(num)]


@dataclass
class Outcomes:
    """Per client_request_id: the response, or the status code the call ended with."""

    responses: dict[str, generation_pb2.GenerateResponse] = field(default_factory=dict)
    errors: dict[str, grpc.StatusCode] = field(default_factory=dict)

    def record(self, client_id: str, outcome: generation_pb2.GenerateResponse | grpc.StatusCode) -> None:
        assert client_id not in self.responses and client_id not in self.errors, f"{client_id} answered twice"
        if isinstance(outcome, grpc.StatusCode):
            self.errors[client_id] = outcome
        else:
            self.responses[client_id] = outcome

    @property
    def num_answered(self) -> int:
        return len(self.responses) + len(self.errors)


async def generate(stub, client_id: str, timeout_s: float = 60.0, **kwargs):
    """A Generate call's response, or the status code it failed with (never an exception)."""
    try:
        return await stub.Generate(generation_pb2.GenerateRequest(prompt=prompt(client_id, **kwargs)), timeout=timeout_s)
    except grpc.aio.AioRpcError as error:
        return error.code()


async def generate_all(target: str, client_ids: list[str], **kwargs) -> Outcomes:
    outcomes = Outcomes()
    async with grpc.aio.insecure_channel(target) as channel:
        stub = generation_pb2_grpc.GenerationServiceStub(channel)
        results = await asyncio.gather(*(generate(stub, cid, **kwargs) for cid in client_ids))
    for client_id, result in zip(client_ids, results, strict=True):
        outcomes.record(client_id, result)
    return outcomes


def sqlite_path(database_url: str) -> str:
    return database_url.removeprefix("sqlite+aiosqlite:///")


def request_rows(database_url: str, client_ids: list[str]) -> list[tuple[str, str, str]]:
    """(client_request_id, request id, status) of every logged row of these client ids."""
    marks = ",".join("?" * len(client_ids))
    with sqlite3.connect(sqlite_path(database_url), timeout=30) as db:
        return list(
            db.execute(f"SELECT client_request_id, id, status FROM requests WHERE client_request_id IN ({marks})", client_ids)
        )


def wait_for_rows(database_url: str, client_ids: list[str], num_rows: int, timeout_s: float = 30.0):
    """The log rows of `client_ids` once at least `num_rows` are written (buffered writes lag)."""
    deadline_s = time.monotonic() + timeout_s
    while True:
        rows = request_rows(database_url, client_ids)
        if len(rows) >= num_rows or time.monotonic() > deadline_s:
            return rows
        time.sleep(0.2)


def batch_outcomes(database_url: str, batch_ids: set[str] | None = None) -> list[tuple[str, str]]:
    with sqlite3.connect(sqlite_path(database_url), timeout=30) as db:
        rows = list(db.execute("SELECT id, outcome FROM batches"))
    return [r for r in rows if batch_ids is None or r[0] in batch_ids]


def assert_completed_exactly_once(database_url: str, outcomes: Outcomes) -> None:
    """Each answered request has one `completed` log row, with the request id the client got."""
    client_ids = list(outcomes.responses)
    rows = wait_for_rows(database_url, client_ids, len(client_ids))
    completed = [r for r in rows if r[2] == "completed"]
    by_client = {}
    for client_id, request_id, _ in completed:
        assert client_id not in by_client, f"{client_id} completed twice: {by_client[client_id]} and {request_id}"
        by_client[client_id] = request_id
    assert by_client == {cid: r.request_id for cid, r in outcomes.responses.items()}


def metric_value(url: str, name: str) -> float:
    """One unlabelled sample from a /metrics page (0 if absent)."""
    import urllib.request

    with urllib.request.urlopen(url, timeout=5) as page:
        for line in page.read().decode().splitlines():
            if line.startswith(f"{name} "):
                return float(line.split()[1])
    return 0.0


async def wait_for_metric(url: str, name: str, at_least: float, timeout_s: float = 30.0) -> float:
    deadline_s = time.monotonic() + timeout_s
    while True:
        value = await asyncio.to_thread(metric_value, url, name)
        if value >= at_least or time.monotonic() > deadline_s:
            return value
        await asyncio.sleep(0.05)
