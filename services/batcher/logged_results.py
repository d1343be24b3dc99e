"""Answers for retried request ids from the log DB, which outlives a batcher restart.

The in-memory idempotency index answers retries while the batcher lives; after a restart only the
log has the first call's result. Rows reach the log through the buffered writer (flushed every
~0.2 s), so a request that completed within that window before a crash can still run twice.

The logged row keeps the request itself (instruction, input, max_new_tokens), so its request hash
is computed from the row with the same function as a live request's: no column of its own, and
rows logged before idempotency keys were bound to requests are checked too.

Every Generate with a key asks, so lookups share queries: one runs at a time, and the keys asked
while it runs go together in the next (no wait when the batcher is quiet; under a burst one query
answers up to MAX_KEYS_PER_QUERY keys where each had cost an ORM session of its own).
"""

from __future__ import annotations

import asyncio

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from services.batcher.domain import RequestResult, request_sha256
from services.shared.db import find_completed_requests
from services.shared.db.models import RequestRow


MAX_KEYS_PER_QUERY = 256  # bound values of one IN (...): well under any database's limit
# Lookups wait for one another: a query that hangs (a stuck connection) must not hold every keyed
# Generate. Past this its callers hear a TimeoutError, i.e. no earlier result known: their requests run.
LOOKUP_TIMEOUT_S = 2.0


def _answer(found: tuple[RequestRow, int | None] | None) -> tuple[RequestResult, str] | None:
    if found is None:
        return None
    row, batch_size = found
    if row.output_text is None or row.started_at is None or row.finished_at is None:
        return None  # logged before results were kept: it cannot be answered, so it runs
    result = RequestResult(
        request_id=row.id,
        text=row.output_text,
        generated_tokens=row.generated_tokens or 0,
        predicted_tokens=row.predicted_tokens or 0,
        input_tokens=row.input_tokens,
        batch_id=row.batch_id or "",
        batch_size=batch_size or 0,
        queued_at=row.arrived_at,
        started_at=row.started_at,
        finished_at=row.finished_at,
        is_prediction_fallback=row.is_prediction_fallback,
    )
    return result, request_sha256(row.instruction, row.input_text, row.max_new_tokens)


class LoggedResultLookup:
    """lookup(tenant, client_request_id): the first completed result under that key and the
    request_sha256 of the request it answered, or None. Raises what the database raised."""

    def __init__(self, session_factory: async_sessionmaker[AsyncSession], timeout_s: float = LOOKUP_TIMEOUT_S) -> None:
        self._session_factory = session_factory
        self._timeout_s = timeout_s
        self._waiting: list[tuple[tuple[str, str], asyncio.Future]] = []
        self._running: asyncio.Task | None = None

    async def __call__(self, tenant_id: str, client_request_id: str) -> tuple[RequestResult, str] | None:
        future = asyncio.get_running_loop().create_future()
        self._waiting.append(((tenant_id, client_request_id), future))
        if self._running is None:
            self._start()
        return await future

    def _start(self) -> None:
        asked, self._waiting = self._waiting[:MAX_KEYS_PER_QUERY], self._waiting[MAX_KEYS_PER_QUERY:]
        self._running = asyncio.create_task(self._answer_all(asked))
        self._running.add_done_callback(self._next)

    def _next(self, _: asyncio.Task) -> None:
        self._running = None
        if self._waiting:
            self._start()

    async def _answer_all(self, asked: list[tuple[tuple[str, str], asyncio.Future]]) -> None:
        try:
            async with asyncio.timeout(self._timeout_s):
                async with self._session_factory() as session:
                    found = await find_completed_requests(session, [key for key, _ in asked])
            answers = {key: _answer(found.get(key)) for key, _ in asked}
        except Exception as error:  # noqa: BLE001 - each caller decides what a failed lookup means
            for _, future in asked:
                if not future.done():
                    future.set_exception(error)
            return
        for key, future in asked:
            if not future.done():  # its caller may have left
                future.set_result(answers[key])
