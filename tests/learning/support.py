"""Traffic, log reads and waits for the continuous-learning tests (a real stack, a real log DB)."""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from sqlalchemy import select

from magnus.v1 import generation_pb2, generation_pb2_grpc, model_admin_pb2, model_admin_pb2_grpc
from services.core.dataset import read_task_rows
from services.shared.db.engine import make_engine, make_session_factory
from services.shared.db.models import BatchRow, ModelVersion, RequestRow
from services.shared.db.queries import fetch_batches, fetch_requests, get_state
from services.shared.model_store import ModelStore, VersionInfo
from services.shared.tokenizer import get_token_counter
from services.trainer.rounds import watermark_key
from tools.demo import DEFAULT_DATA_DIR as DATA_DIR
from tools.stack import Stack

MAX_OUTPUT_TOKENS = 32  # short generations keep the CPU worker quick
MAX_INPUT_CHARS = 1200
TRAINER_PERIOD_S = 2.0
# A tiny CPU batch takes about a second, so the paper's 2 s floor would never call a miss bad.
TIME_MISS_ABS_S = 0.2
VALIDATION_WINDOW_ROWS = 10
NORMAL_WORKER_ID = "worker-normal"
# Generous: the batcher refuses (RESOURCE_EXHAUSTED) a request whose estimated queue wait and run
# exceed its deadline, and a busy 2-core machine runs the slow worker's backlog slowly.
REQUEST_DEADLINE_S = 300.0


@dataclass
class LearningStack:
    """A running stack and what the tests need to read its log DB and model store."""

    stack: Stack
    backend: str
    database_url: str
    store_dir: Path


def short_prompts(task: str, count: int) -> list[generation_pb2.Prompt]:
    """The first `count` rows of a task file whose reference output is short, as prompts.

    max_new_tokens is the reference output's token length: the tiny random model never stops by
    itself, so the cap is where a real model would stop (trace replay).
    """
    counter = get_token_counter()
    rows = [r for r in read_task_rows(DATA_DIR / f"{task}.jsonl", max_rows=600) if len(r.input_text) <= MAX_INPUT_CHARS]
    lengths = counter.count_many([r.output_text for r in rows])
    prompts = [
        generation_pb2.Prompt(instruction=r.instruction, user_input=r.input_text, max_new_tokens=n, tenant_id=task)
        for r, n in zip(rows, lengths, strict=True)
        if 1 <= n <= MAX_OUTPUT_TOKENS
    ][:count]
    assert len(prompts) == count, f"not enough short {task} rows"
    return prompts


def capped(prompts: Sequence[generation_pb2.Prompt], max_new_tokens: int) -> list[generation_pb2.Prompt]:
    """Copies of `prompts` generating at most `max_new_tokens` each."""
    copies = []
    for prompt in prompts:
        copy = generation_pb2.Prompt()
        copy.CopyFrom(prompt)
        copy.max_new_tokens = min(prompt.max_new_tokens, max_new_tokens)
        copies.append(copy)
    return copies


def interleave(*lists: list[generation_pb2.Prompt]) -> list[generation_pb2.Prompt]:
    return [p for group in zip(*lists, strict=True) for p in group]


@dataclass
class Outcome:
    prompt: generation_pb2.Prompt
    response: generation_pb2.GenerateResponse | None
    error: str | None


async def send_spaced(target: str, prompts: Sequence[generation_pb2.Prompt], spacing_s: float) -> list[Outcome]:
    """Send one Generate per prompt, `spacing_s` apart, all in flight together; never raises."""

    async def one(stub, prompt: generation_pb2.Prompt, delay_s: float) -> Outcome:
        await asyncio.sleep(delay_s)
        try:
            response = await stub.Generate(generation_pb2.GenerateRequest(prompt=prompt), timeout=REQUEST_DEADLINE_S)
            return Outcome(prompt, response, None)
        except grpc.aio.AioRpcError as error:
            return Outcome(prompt, None, f"{error.code().name}: {error.details()}")

    async with grpc.aio.insecure_channel(target) as channel:
        stub = generation_pb2_grpc.GenerationServiceStub(channel)
        return list(await asyncio.gather(*(one(stub, p, i * spacing_s) for i, p in enumerate(prompts))))


def failures(outcomes: Sequence[Outcome]) -> list[str]:
    return [o.error for o in outcomes if o.error is not None]


async def serving_version(target: str) -> int:
    """The version a predictor/estimator replica serves now (0 if it cannot say)."""
    async with grpc.aio.insecure_channel(target) as channel:
        stub = model_admin_pb2_grpc.ModelAdminServiceStub(channel)
        try:
            return (await stub.GetModelInfo(model_admin_pb2.GetModelInfoRequest(), timeout=5)).model.version
        except grpc.aio.AioRpcError:
            return 0


@dataclass
class VersionWatch:
    """Polls each replica's serving version in the background; `seen[target]` in time order."""

    targets: Sequence[str]
    period_s: float = 0.2
    seen: dict[str, list[int]] = field(default_factory=dict)
    _task: asyncio.Task | None = None

    async def _run(self) -> None:
        while True:
            for target in self.targets:
                version = await serving_version(target)
                if version:
                    self.seen.setdefault(target, []).append(version)
            await asyncio.sleep(self.period_s)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)


class LogView:
    """Reads the stack's log DB and model versions the way an operator would."""

    def __init__(self, database_url: str, store_dir) -> None:
        self.engine = make_engine(database_url)
        self.store = ModelStore(store_dir, make_session_factory(self.engine))

    async def close(self) -> None:
        await self.engine.dispose()

    async def requests(self) -> list[RequestRow]:
        async with self.store.session_factory() as session:
            return await fetch_requests(session)

    async def batches(self) -> list[BatchRow]:
        async with self.store.session_factory() as session:
            return await fetch_batches(session)

    async def watermark(self, kind: str) -> int:
        async with self.store.session_factory() as session:
            return int(((await get_state(session, watermark_key(kind))) or {}).get("seq", 0))

    async def versions(self, kind: str) -> list[VersionInfo]:
        """Every stored version of `kind`, oldest first."""
        query = select(ModelVersion).where(ModelVersion.kind == kind).order_by(ModelVersion.version)
        async with self.store.session_factory() as session:
            return [VersionInfo.from_row(row) for row in await session.scalars(query)]


async def wait_for(condition: Callable[[], Awaitable[bool]], timeout_s: float, what: str) -> None:
    deadline_s = time.monotonic() + timeout_s
    while not await condition():
        if time.monotonic() > deadline_s:
            raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        await asyncio.sleep(0.2)


def mean_abs(pairs: Sequence[tuple[float, float]]) -> float:
    return statistics.fmean(abs(a - b) for a, b in pairs)
